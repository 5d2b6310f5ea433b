"""A synthetic task family with verifiable answers: multi-step arithmetic, as text or rendered into images.

It drives the built-in demo and the tests (no download needed). Example i is a pure function of
(seed, i): `(7 + 5) * 3 - 4` with the trace `7 + 5 = 12\\n12 * 3 = 36\\n36 - 4 = 32` and the answer `32`.
Example i is posed as task `tasks[i % len(tasks)]` (see `TASKS`): as text or as an image, answered with a
chain of thought, directly, or (`image-read`) by transcribing the image. Images show the expression drawn
without spaces (PIL's default FreeType font, black on white, one large glyph size for the task) in a fixed-size
image; a fixed size keeps `image_grid_thw`, and so the batch shapes, static.
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
READ_QUESTION = "What is the expression in the image?"
# task name -> (shown as an image?, response style). "read" answers with `statement(problem)` alone: the
# transcription (OCR) skill a real VLM's pre-training gives it, which lets text-learned reasoning reach images.
TASKS = {
    "text-cot": (False, "cot"), "text-direct": (False, "direct"),
    "image-cot": (True, "cot"), "image-direct": (True, "direct"), "image-read": (True, "read"),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """num_examples: size of the task; steps: min/max operations; operands are 1..max_operand.
    tasks: example i is posed as `tasks[i % len(tasks)]` (names in `TASKS`); with a mix of text and image tasks,
    an unshuffled pipeline whose batch size is a multiple of len(tasks) sees the same mix (and shapes) every batch.
    image_size: (height, width) pixels of a rendered image (multiples of 28).
    restate: chain-of-thought traces open with `statement(problem)` ("The expression is 7 + 5."), the line a
    model that can read the image writes for an image problem too."""

    num_examples: int = 1000
    seed: int = 0
    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 9
    tasks: tuple[str, ...] = ("text-cot",)
    image_size: tuple[int, int] = (112, 224)
    restate: bool = False

    @property
    def has_images(self) -> bool:
        return any(TASKS[t][0] for t in self.tasks)

    def validate(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1 or self.num_examples < 1:
            raise ValueError("max_operand and num_examples must be >= 1")
        if any(s % 28 or s <= 0 for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be positive multiples of 28 (no resize then)")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown synthetic task(s) {unknown} in tasks {list(self.tasks)}; known: {list(TASKS)}")


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


def statement(problem: Problem) -> str:
    """The problem restated in words: the `image-read` response, and the first line of a restating trace."""
    return f"The expression is {problem.expression}."


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
    """The task as a `Source`: example i has `question`, a `response` and the `answer` (for `image-read`: the
    expression); `meta` holds its expression, step count and task."""
    config.validate()
    # One glyph size for the whole task (what the longest expression allows): easier for a tiny VLM to read.
    font_size = fit_font_size(_longest_expression(config), config.image_size) if config.has_images else 0

    def to_example(index: int, rid: str) -> Example:
        problem = make_problem(config, index)
        task = config.tasks[index % len(config.tasks)]
        image, style = TASKS[task]
        answer = problem.expression if style == "read" else str(problem.answer)
        if style == "read":
            response = statement(problem)
        elif style == "direct":
            response = f"<answer>{answer}</answer>"
        else:
            steps = ((statement(problem),) if config.restate else ()) + problem.steps
            response = templates.format_trace("\n".join(steps), answer)
        meta = {"expression": problem.expression, "steps": len(problem.steps), "task": task}
        if not image:
            return Example(id=rid, question=f"What is {problem.expression}?", response=response, answer=answer, meta=meta)
        pixels = render_expression(problem.expression.replace(" ", ""), config.image_size, font_size)
        question = READ_QUESTION if style == "read" else IMAGE_QUESTION
        return Example(id=rid, question=question, response=response, answer=answer, images=(pixels,), meta=meta)

    return Source(name, range(config.num_examples), Format("synthetic", (), to_example), has_images=config.has_images)
