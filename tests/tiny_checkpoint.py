"""A tiny Hugging Face Qwen2.5-VL checkpoint directory for command-line tests, built offline.

The model has the `tiny` tokenizer's vocabulary (278: bytes + the 22 Qwen2.5 added tokens) and its
vision ids; the directory gets the `tiny` tokenizer's own Hugging Face files (byte-level BPE, no merges:
exactly its ids), so `load_tokenizer(dir)` goes through transformers like a real checkpoint's.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tests import hf_reference as ref
from xr_jax.data.tokenizer import load_tokenizer

TINY = load_tokenizer("tiny")


def tiny_vl_model(seed: int = 0, spiky: float = 4.0) -> Qwen2_5_VLForConditionalGeneration:
    """fp32 eager tiny Qwen2.5-VL over the `tiny` vocabulary; `spiky` scales the LM head (clear argmaxes)."""
    s = TINY.special
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(ref.TEXT, vocab_size=TINY.vocab_size, max_position_embeddings=2048, bos_token_id=s.im_start,
                         eos_token_id=s.im_end, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=ref.VISION, image_token_id=s.image_pad, video_token_id=s.video_pad,
        vision_start_token_id=s.vision_start, vision_end_token_id=s.vision_end, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(spiky)
    return model


def write_tiny_checkpoint(out_dir: str, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Save the model and its tokenizer to `out_dir`; returns the (torch) model for reference runs."""
    model = tiny_vl_model(seed)
    model.save_pretrained(out_dir)
    TINY.save_pretrained(out_dir)
    return model
