"""Model FLOPs of a training step (for MFU) and per-device peak FLOP/s.

Counted as in PaLM (Chowdhury et al. 2022, app. B): a matmul with N weights costs 2N FLOPs per token
forward and 4N backward; attention adds 2 x 2 x T x d per token and layer forward (scores and
weighted sum over the full T, causality not discounted). A frozen vision tower runs forward only.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from xr_jax.models.config import ModelConfig

# dense bf16 peak FLOP/s per device (vendor datasheets); CPU: an estimate, see `peak_flops`
_PEAKS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12, "v100": 125e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
}
# One x86 core with AVX2: 2 FMA units x 8 fp32 lanes x 2 FLOPs = 32 FLOPs/cycle at ~2.5 GHz.
CPU_CORE_PEAK = 32 * 2.5e9


def text_matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matmuls per token: decoder layers + LM head (the embedding lookup is free)."""
    t = cfg.text
    hd = t.head_dim
    attn = t.hidden_size * hd * (t.num_heads + 2 * t.num_kv_heads) + t.num_heads * hd * t.hidden_size
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_layers * (attn + mlp) + t.hidden_size * t.vocab_size


def text_train_flops(cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """FLOPs of forward + backward over `tokens` tokens in rows of `seq_len`."""
    t = cfg.text
    attn = 4 * t.num_layers * t.num_heads * t.head_dim * seq_len  # per token, forward
    return 3.0 * tokens * (2 * text_matmul_params(cfg) + attn)


def vision_flops(cfg: ModelConfig, image_grid_thw: Optional[np.ndarray], trained: bool) -> float:
    """FLOPs of the vision tower over the images of a batch (x3 when it is trained, forward only if frozen)."""
    if cfg.vision is None or image_grid_thw is None or len(image_grid_thw) == 0:
        return 0.0
    v = cfg.vision
    patches = np.prod(np.asarray(image_grid_thw), axis=-1).astype(np.float64)  # per image
    per_layer = 4 * v.hidden_size * v.hidden_size + 3 * v.hidden_size * v.intermediate_size
    merger = v.merge_unit * v.hidden_size * (v.merge_unit * v.hidden_size + v.out_hidden_size) / v.merge_unit
    matmul = 2 * patches.sum() * (v.depth * per_layer + v.patch_dim * v.hidden_size + merger)
    window = float(v.window_merged**2 * v.merge_unit)  # patches per attention window
    n_full = len(v.fullatt_block_indexes)
    attn = 4 * v.hidden_size * (
        n_full * np.sum(patches**2) + (v.depth - n_full) * np.sum(patches * np.minimum(patches, window)))
    return (3.0 if trained else 1.0) * (matmul + attn)


def peak_flops(device=None) -> float:
    """Peak FLOP/s of one device. CPU: cores x 32 FLOPs/cycle x 2.5 GHz, an *estimate* — pass the real
    figure as `train.peak_flops` for a meaningful MFU."""
    import os

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return (os.cpu_count() or 1) * CPU_CORE_PEAK / max(1, len(jax.local_devices()))
    kind = device.device_kind.lower()
    for name, value in _PEAKS.items():
        if name in kind:
            return value
    raise ValueError(f"no peak FLOP/s known for device {device.device_kind!r}: set train.peak_flops")
