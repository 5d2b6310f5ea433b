"""The Qwen2.5-VL chat template, image-pad expansion and the X-Reasoner prompt templates.

`render_chat` is a plain-Python rendering of `QWEN2_5_VL_CHAT_TEMPLATE` (the Jinja template shipped with the
Qwen2.5-VL-Instruct checkpoints); tests/test_data_templates.py checks it against transformers'
`apply_chat_template` with that Jinja text. Prompt templates are named and configurable: `PROMPT_TEMPLATES`
holds the paper's three (App. C) and `register_prompt_template` adds more.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# Verbatim from Qwen2.5-VL-7B-Instruct's chat_template.json (newlines are real newlines).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _is_image(item: Mapping) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video(item: Mapping) -> bool:
    return item.get("type") == "video" or "video" in item


def render_chat(
    messages: Sequence[Mapping], add_generation_prompt: bool = False, add_vision_id: bool = False
) -> str:
    """Render messages exactly as the Qwen2.5-VL Jinja template does.

    A message is `{"role": str, "content": str | list[item]}`; an item is `{"type": "image", ...}`,
    `{"type": "video", ...}` or `{"type": "text", "text": str}`. Each image becomes ONE `<|image_pad|>`.
    """
    out: list[str] = []
    n_images = n_videos = 0
    for i, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}") from e
        if i == 0 and role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n")
        out.append(f"<|im_start|>{role}\n")
        if isinstance(content, str):
            out.append(content)
        else:
            for item in content:
                if _is_image(item):
                    n_images += 1
                    out.append((f"Picture {n_images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
                elif _is_video(item):
                    n_videos += 1
                    out.append((f"Video {n_videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
                elif "text" in item:
                    out.append(item["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def expand_image_pads(text: str, pads_per_image: Sequence[int]) -> str:
    """Replace the k-th `<|image_pad|>` with `pads_per_image[k]` copies (t*h*w/4 from image_grid_thw).

    This is what the Qwen2.5-VL processor does before tokenising; counts must match the images exactly.
    """
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(pads_per_image):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(pads_per_image)} images were given"
        )
    out = [pieces[0]]
    for n, rest in zip(pads_per_image, pieces[1:]):
        out.append(IMAGE_PAD * int(n))
        out.append(rest)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A user-turn template: `text` holds `{{ question }}`; `options` (holding `{{ options }}`) is appended
    only when the example has options."""

    name: str
    text: str
    options: Optional[str] = None

    def format(self, question: str, choices: Optional[Mapping[str, str]] = None) -> str:
        # Plain substitution, not Jinja/str.format: questions contain braces (LaTeX) and must stay verbatim.
        prompt = self.text.replace("{{ question }}", question)
        if choices and self.options is not None:
            prompt += self.options.replace("{{ options }}", format_options(choices))
        return prompt


def format_options(choices: Mapping[str, str]) -> str:
    """`A: text` one per line, in the given order ([xr_jax default]; the paper leaves it unspecified)."""
    return "\n".join(f"{letter}: {text}" for letter, text in choices.items())


_OPTIONS_BLOCK = "\n\nOptions:\n\n{{ options }}"  # separator before `Options:` is [xr_jax default] "\n\n"

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {}


def register_prompt_template(template: PromptTemplate) -> PromptTemplate:
    if template.name in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template.name!r} is already registered")
    if "{{ question }}" not in template.text:
        raise ValueError(f"prompt template {template.name!r} must contain '{{{{ question }}}}'")
    PROMPT_TEMPLATES[template.name] = template
    return template


def get_prompt_template(name_or_template: "str | PromptTemplate") -> PromptTemplate:
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if name_or_template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {name_or_template!r}; known: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[name_or_template]


# The paper's templates (App. C), `\n` read as a newline and ASCII quotes.
X_REASONER_TRAIN = register_prompt_template(PromptTemplate(
    name="x_reasoner_train",
    text=(
        "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before "
        "providing the answer.\nWrite your final answer within <answer> </answer> tags. Here is the question: "
        "{{ question }}"
    ),
    options=_OPTIONS_BLOCK,
))
X_REASONER_EVAL_MC = register_prompt_template(PromptTemplate(
    name="x_reasoner_eval_mc",
    text=(
        "You should provide your thoughts within <think> </think> tags, then answer with just one of the options "
        "below within <answer> </answer> tags (For example, if the question is \n'Is the earth flat?\n A: Yes \n"
        "B: No', you should answer with <think>...</think> <answer>B: No </answer>). Here is the question: "
        "{{ question }}"
    ),
    options=_OPTIONS_BLOCK,
))
X_REASONER_EVAL_MATH = register_prompt_template(PromptTemplate(
    name="x_reasoner_eval_math",
    text=(
        "A conversation between User and Assistant. The user asks a question, and you as the assistant solves it. "
        "You should first think about the reasoning process in the mind and then provide the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> the final answer as the option letter "
        "or the number depending on the question </answer> (For example, if the question is \n'Is the earth flat?\n"
        " A: Yes \nB: No', you should answer with <think> your reasoning </think> <answer>B: No</answer>. If the "
        "question is 'What is 1+1?', you should answer with <think> your reasoning </think> <answer>2 </answer>)."
        "\n\nHere is the question: {{ question }}"
    ),
    options=_OPTIONS_BLOCK,
))
# The bare question (e.g. a short prompt for the tiny CPU demo).
PLAIN = register_prompt_template(PromptTemplate(name="plain", text="{{ question }}", options=_OPTIONS_BLOCK))
# A short reasoning instruction (the tiny CPU demo's stand-in for x_reasoner_train: same role, far fewer tokens).
THINK = register_prompt_template(PromptTemplate(name="think", text="Think step by step. {{ question }}",
                                                options=_OPTIONS_BLOCK))


def format_trace(thinking: str, answer: str) -> str:
    """An SFT target in the X-Reasoner format, spaced like rewritten OpenThoughts traces."""
    return f"<think>\n{thinking}\n</think>\n\n<answer>{answer}</answer>"


def build_messages(
    prompt: str, n_images: int = 0, system: Optional[str] = None, response: Optional[str] = None
) -> list[dict]:
    """System (optional; the template adds the default one), user turn (images first, then text as in the
    model card), and optionally the assistant response."""
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    if n_images:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
