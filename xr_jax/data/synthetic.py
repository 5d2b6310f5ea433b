"""A synthetic task family with verifiable answers: multi-step arithmetic, as text or rendered into images.

It drives the built-in demo and the tests (no download needed). Example i is a pure function of
(seed, i): `(7 + 5) * 3 - 4` with the trace `7 + 5 = 12\\n12 * 3 = 36\\n36 - 4 = 32` and the answer `32`.
With `images=True` the expression is drawn without spaces (PIL's default FreeType font, black on white, one
large glyph size for the task) into a fixed-size image and the question asks for the value of the expression in the image; a fixed size keeps
`image_grid_thw`, and so the batch shapes, static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xr_jax.data import templates
from xr_jax.data.sources import Example, Format, Source

OPS = ("+", "-", "*")
IMAGE_QUESTION = "What is the value of the expression in the image?"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """num_examples: size of the task; steps: min/max operations; operands are 1..max_operand.
    images: render the expression into an image of image_size (height, width) pixels (multiples of 28).
    direct: responses give the answer alone (`<answer>…</answer>`, no thinking) — the demo's "base" model."""

    num_examples: int = 1000
    seed: int = 0
    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 9
    images: bool = False
    image_size: tuple[int, int] = (112, 224)
    direct: bool = False

    def validate(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1 or self.num_examples < 1:
            raise ValueError("max_operand and num_examples must be >= 1")
        if any(s % 28 or s <= 0 for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be positive multiples of 28 (no resize then)")


@dataclasses.dataclass(frozen=True)
class Problem:
    expression: str
    steps: tuple[str, ...]
    answer: int


def make_problem(config: SyntheticConfig, index: int) -> Problem:
    """Problem `index` of the task: a left-to-right chain of operations, parenthesised where needed."""
    rng = np.random.default_rng([config.seed, index])
    n_steps = int(rng.integers(config.min_steps, config.max_steps + 1))
    value = int(rng.integers(1, config.max_operand + 1))
    expression, steps, last_op = str(value), [], None
    for _ in range(n_steps):
        op = OPS[int(rng.integers(len(OPS)))]
        operand = int(rng.integers(1, config.max_operand + 1))
        if op == "-" and operand > value:  # keep every intermediate value non-negative
            op = "+"
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        if op == "*" and last_op in ("+", "-"):
            expression = f"({expression})"
        expression = f"{expression} {op} {operand}"
        steps.append(f"{value} {op} {operand} = {result}")
        value, last_op = result, op
    return Problem(expression, tuple(steps), value)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def fit_font_size(text: str, size: tuple[int, int]) -> int:
    """The largest font size at which `text` fits in 90% x 80% of an image of `size` (height, width)."""
    height, width = size
    draw = ImageDraw.Draw(Image.new("RGB", (width, height)))
    font_size = height
    while font_size > 8:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(font_size))
        if right - left <= 0.9 * width and bottom - top <= 0.8 * height:
            break
        font_size -= 1
    return font_size


def render_expression(text: str, size: tuple[int, int] = (112, 224), font_size: Optional[int] = None) -> np.ndarray:
    """Draw `text` centred, black on white, as an HxWx3 uint8 array (font size: given, or the largest fit)."""
    height, width = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(font_size or fit_font_size(text, size))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text, fill="black", font=font)
    return np.asarray(image)


def _longest_expression(config: SyntheticConfig) -> str:
    """A worst-case rendered expression: every step parenthesised, operands of max width."""
    digit = "8" * len(str(config.max_operand))
    return "(" * config.max_steps + digit + "".join(f"+{digit})" for _ in range(config.max_steps))


def synthetic_source(config: SyntheticConfig = SyntheticConfig(), name: str = "synthetic") -> Source:
    """The task as a `Source`: example i has `question`, a `response` trace and the `answer`."""
    config.validate()
    # One glyph size for the whole task (what the longest expression allows): easier for a tiny VLM to read.
    font_size = fit_font_size(_longest_expression(config), config.image_size) if config.images else 0

    def to_example(index: int, rid: str) -> Example:
        problem = make_problem(config, index)
        answer = str(problem.answer)
        response = f"<answer>{answer}</answer>" if config.direct else templates.format_trace("\n".join(problem.steps), answer)
        meta = {"expression": problem.expression, "steps": len(problem.steps)}
        if config.images:
            image = render_expression(problem.expression.replace(" ", ""), config.image_size, font_size)
            return Example(id=rid, question=IMAGE_QUESTION, response=response, answer=answer, images=(image,), meta=meta)
        return Example(id=rid, question=f"What is {problem.expression}?", response=response, answer=answer, meta=meta)

    return Source(name, range(config.num_examples), Format("synthetic", (), to_example), has_images=config.images)
