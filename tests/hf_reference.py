"""Tiny random transformers models (built offline from configs) used as the parity reference."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

TEXT = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
    bos_token_id=0, eos_token_id=1,
)
VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2,
)
IMAGE_TOKEN, VSTART, VEND = 60, 62, 63


def tiny_vl(seed: int = 0, tie: bool = False, spiky: float = 1.0) -> Qwen2_5_VLForConditionalGeneration:
    """Eager-attention fp32 tiny Qwen2.5-VL. `spiky` scales the LM head so greedy argmax has no near-ties."""
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=VISION, image_token_id=IMAGE_TOKEN, video_token_id=61,
        vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if spiky != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(spiky)
    return model


def tiny_text(seed: int = 0, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**TEXT, tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    return Qwen2ForCausalLM(cfg).eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, input_ids, attention_mask, position_ids=None, pixel_values=None, image_grid_thw=None):
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(np.asarray(input_ids)), attention_mask=torch.tensor(np.asarray(attention_mask)))
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids))
        if pixel_values is not None:
            kw["pixel_values"] = torch.tensor(np.asarray(pixel_values))
            kw["image_grid_thw"] = torch.tensor(np.asarray(image_grid_thw))
        return model(**kw).logits.float().numpy()


def image_prompt(rng: np.random.RandomState, grids, text_lens, vocab: int = 60) -> list[int]:
    """Random text runs around `<|vision_start|> pads <|vision_end|>` blocks, one per grid."""
    ids: list[int] = list(rng.randint(2, vocab, size=text_lens[0]))
    for g, n in zip(grids, text_lens[1:]):
        ids += [VSTART] + [IMAGE_TOKEN] * (int(np.prod(g)) // 4) + [VEND]
        ids += list(rng.randint(2, vocab, size=n))
    return ids
