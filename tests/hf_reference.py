"""The references the parity tests compare against: tiny random transformers models (built offline from
configs) and transformers' vision-tower index arrays and parameter tree, from ours; and our model decoded
token by token through the sampler's cached path (`cached_logits`), to compare with its full forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from xr_jax.models import hf_tree, naming, vision
from xr_jax.models.config import ModelConfig, VisionConfig
from xr_jax.models.layers import as_dtype
from xr_jax.models.qwen2 import decode_weights, extend_layer_cache
from xr_jax.models.qwen2_5_vl import decode_step, prefill

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


def swap_rope_axes(positions) -> np.ndarray:
    """M-RoPE positions between transformers' [3, B, T] and ours [B, 3, T] (either way)."""
    return np.swapaxes(np.asarray(positions), 0, 1)


def hf_logits(model, input_ids, attention_mask, position_ids=None, pixel_values=None, image_grid_thw=None):
    """transformers' logits; `position_ids` ours ([B, 3, T] M-RoPE or [B, T])."""
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(np.asarray(input_ids)), attention_mask=torch.tensor(np.asarray(attention_mask)))
        if position_ids is not None:
            pos = np.asarray(position_ids)
            kw["position_ids"] = torch.tensor(swap_rope_axes(pos) if pos.ndim == 3 else pos)
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


def hf_window_index(grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `(window_index, cu_window_seqlens)` from our windows: the merged-token permutation into
    window order and the cumulative window lengths in patches (int32, starting at 0)."""
    windows = vision._windows(vision._check_grid(grid_thw, cfg), cfg)
    lengths = np.array([len(w) for w in windows]) * cfg.merge_unit
    return np.concatenate(windows), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def hf_cu_seqlens(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """transformers' full-attention `cu_seqlens`: one segment of h*w patches per image per frame."""
    grid = vision._check_grid(grid_thw, cfg)
    lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def vision_params_from_hf(tensors: dict[str, np.ndarray], prefix: str = "visual.") -> dict:
    """The tower's param tree from HF tensors named `{prefix}...` (either naming scheme); other tensors (e.g.
    the language model's) are ignored, so a whole state dict can be passed."""
    picked = {n: w for n, w in tensors.items() if naming.canonical_hf_name(n).startswith(prefix)}
    if not picked:
        raise ValueError(f"no tensor named {prefix}* (or model.{prefix}*) among {len(tensors)} tensors")
    tree = hf_tree.tree_from_hf(picked)
    for key in prefix.rstrip(".").split("."):
        tree = tree[key]
    return tree



def cached_logits(cfg: ModelConfig, tree, ids, positions, am, prompt: int, pixel_values=None, vision_layout=None):
    """Logits [B, L, V] of every token of ids [B, L], decoded as the sampler decodes: `prefill` of the first
    `prompt` tokens (left padding per `am`), then one `decode_step` per later token (text: its three M-RoPE
    axes equal). Also returns the per-layer KV buffers after the last token."""
    weights = decode_weights(tree, as_dtype(cfg.dtype))
    cache, logits = prefill(weights, ids[:, :prompt], positions[..., :prompt], am[:, :prompt], pixel_values,
                            vision_layout, model=cfg, all_logits=True)
    kv, outs = extend_layer_cache(cache["kv"], ids.shape[1] - prompt), [np.asarray(logits)]
    step = jax.jit(functools.partial(decode_step, model=cfg))
    for t in range(prompt, ids.shape[1]):
        assert (positions[:, :, t] == positions[:, :1, t]).all()
        bounds = (cache["start"], jnp.full_like(cache["start"], t + 1))
        lg, kv = step(weights, ids[:, t], positions[:, 0, t], bounds, kv, t)
        outs.append(np.asarray(lg)[:, None])
    return np.concatenate(outs, axis=1), kv
