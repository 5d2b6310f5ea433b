"""Sampling from chat conversations (`xr-jax sample`): messages -> prompt ids + images -> sampler -> records.

A conversation is a list of messages in the transformers chat format: `{"role": ..., "content": str | [item]}`
with items `{"type": "text", "text": ...}` and `{"type": "image", "image": PATH}`. The chat template is the
tokenizer's (the checkpoint's own, or the built-in Qwen2.5-VL one), each image's single `<|image_pad|>` is
expanded to its patch count, and generation runs through `xr_jax.sampling.sampler.Sampler` (forced exit when a
thinking budget is given).

Every (prompt, sample) row gets its own PRNG key, `fold_in(fold_in(key(seed), prompt_index), sample)`, so
which batch a prompt lands in does not choose its random stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from xr_jax.data import templates
from xr_jax.errors import UserError


class ChatError(UserError, ValueError):
    """A conversation or an input file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Chat:
    """One conversation to continue: its messages, its images in order of appearance, and where it came from."""

    messages: tuple[dict, ...]
    images: tuple[str, ...]
    name: str


def chat_images(messages: Sequence[dict], name: str, base_dir: Optional[str] = None) -> tuple[str, ...]:
    """Image paths of the image items, in order (relative paths are taken from `base_dir`)."""
    images = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatError(f"{name}: message {i} must be an object with 'role' and 'content', got {message!r}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ChatError(f"{name}: message {i} content must be a string or a list of items")
        for item in content:
            if not isinstance(item, dict):
                raise ChatError(f"{name}: message {i} has a content item that is not an object: {item!r}")
            if item.get("type") == "video" or "video" in item:
                raise ChatError(f"{name}: message {i} has a video item; only images are supported")
            if item.get("type") == "image" or "image" in item:
                path = item.get("image")
                if not isinstance(path, str) or not path:
                    raise ChatError(f"{name}: message {i} has an image item without an 'image' path: {item!r}")
                path = path if base_dir is None or os.path.isabs(path) else os.path.join(base_dir, path)
                if not os.path.isfile(path):  # checked before the model loads, not hours into a run
                    raise ChatError(f"{name}: image {path!r} does not exist")
                images.append(path)
            elif not isinstance(item.get("text"), str):
                raise ChatError(f"{name}: message {i} has an item that is neither text nor image: {item!r}")
    return tuple(images)


def prompt_chat(text: str, images: Sequence[str] = (), system: Optional[str] = None) -> Chat:
    """A single user turn: the images first, then the text (as in the Qwen2.5-VL model card); `system` is
    the system message (None: the chat template's default)."""
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
    messages = ({"role": "user", "content": content if images else text},)
    if system is not None:
        messages = ({"role": "system", "content": system},) + messages
    return Chat(messages, chat_images(messages, "--prompt"), "--prompt")


def read_chats(path: str) -> list[Chat]:
    """A JSONL file of `{"messages": [...]}` lines (blank lines skipped); image paths are relative to the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"messages file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    chats = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            name = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatError(f"{name}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
                raise ChatError(f'{name}: expected {{"messages": [...]}} with a non-empty list of messages')
            chats.append(Chat(tuple(row["messages"]), chat_images(row["messages"], name, base), name))
    if not chats:
        raise ChatError(f"{path}: no conversations")
    return chats


def encode_chat(tokenizer, messages: Sequence[dict], images: Sequence[Any], image_config=None, name: str = "prompt"):
    """The sampler's `Prompt`: chat template with the generation prompt, image pads expanded, token ids."""
    from xr_jax.data import images as images_lib
    from xr_jax.sampling.sampler import Prompt

    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    if not images:
        return Prompt(tokenizer.encode(text))
    image_config = image_config or images_lib.ImageConfig()
    pixel_values, grid = images_lib.preprocess_images(list(images), image_config, name)
    try:
        text = templates.expand_image_pads(text, images_lib.image_pad_counts(grid, image_config.merge_size))
    except ValueError as e:
        raise ChatError(f"{name}: {e}") from None
    return Prompt(tokenizer.encode(text), pixel_values, grid)


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One output line. token_ids: the generated ids (a produced stop id included, padding not)."""

    index: int
    sample: int
    token_ids: list[int]
    text: str
    finish_reason: str
    forced_exit: bool

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def row_keys(seed: int, prompt_indices: Sequence[int], group_size: int):
    """Keys of rows p*G+g: fold_in(fold_in(key(seed), prompt_index), g)."""
    import jax
    import jax.numpy as jnp

    base = jax.random.key(seed)
    per_prompt = jax.vmap(lambda p: jax.random.fold_in(base, p))(jnp.asarray(prompt_indices, jnp.uint32))
    return jax.vmap(lambda k: jax.vmap(lambda g: jax.random.fold_in(k, g))(jnp.arange(group_size, dtype=jnp.uint32)))(
        per_prompt).reshape(-1)


def sample_chats(
    sampler, params, tokenizer, chats: Sequence[Chat], *, num_samples: int = 1, seed: int = 0, batch_size: int = 8,
    image_config=None,
) -> Iterator[list[SampleRecord]]:
    """Per conversation, in input order, its `num_samples` records. Batches are padded to `batch_size`
    prompts (copies of the last one, outputs dropped) so that one compiled program serves every batch."""
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_samples ({num_samples}) must be >= 1")
    for start in range(0, len(chats), batch_size):
        batch = list(chats[start:start + batch_size])
        prompts = [encode_chat(tokenizer, c.messages, c.images, image_config, c.name) for c in batch]
        indices = list(range(start, start + len(batch)))
        while len(prompts) < min(batch_size, len(chats)):
            prompts.append(prompts[-1])
            indices.append(indices[-1])
        out = sampler.generate(params, prompts, rng=row_keys(seed, indices, num_samples), group_size=num_samples)
        names = out.finish_names()
        for p in range(len(batch)):
            records = []
            for g in range(num_samples):
                r = p * num_samples + g
                ids = out.row_ids(r)
                records.append(SampleRecord(
                    start + p, g, ids, tokenizer.decode(ids, skip_special_tokens=True), names[r],
                    bool(np.asarray(out.forced[r]).any())))
            yield records
