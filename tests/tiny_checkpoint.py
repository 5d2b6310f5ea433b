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


def tiny_vl_model(seed: int = 0, spiky: float = 4.0, tokenizer=TINY) -> Qwen2_5_VLForConditionalGeneration:
    """fp32 eager tiny Qwen2.5-VL over `tokenizer`'s vocabulary and special ids (default: the `tiny` one);
    `spiky` scales the LM head (clear argmaxes)."""
    s = tokenizer.special
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(ref.TEXT, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048,
                         bos_token_id=s.im_start,
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


def write_bpe_checkpoint(out_dir: str, texts, vocab_size: int = 512, seed: int = 0):
    """A tiny Qwen2.5-VL checkpoint as a user downloads one, with a REAL tokenizer: a byte-level BPE trained
    on `texts` (Qwen2 pre-tokenisation, `vocab_size` ranks, then the 22 Qwen2.5 added tokens), saved as a
    transformers `Qwen2TokenizerFast` with the Qwen2.5-VL chat template, the image processor settings of the
    released checkpoints, and the model; returns the (torch) model."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2VLImageProcessor

    from xr_jax.data.images import ImageConfig
    from xr_jax.data.tokenizer import QWEN2_PRETOKENIZE_REGEX, qwen_fast_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    qwen_fast_tokenizer(trained["vocab"], trained["merges"]).save_pretrained(out_dir)
    image = ImageConfig()
    Qwen2VLImageProcessor(min_pixels=image.min_pixels, max_pixels=image.max_pixels).save_pretrained(out_dir)
    model = tiny_vl_model(seed, tokenizer=load_tokenizer(out_dir))
    model.save_pretrained(out_dir)
    return model
