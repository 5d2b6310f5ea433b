"""Model FLOPs of a training step (for MFU) and per-device peak FLOP/s.

Counted as in PaLM (Chowdhury et al. 2022, app. B): a matmul with N weights costs 2N FLOPs per token
forward and 4N backward; attention adds 2 x 2 x T x d per token and layer forward (scores and
weighted sum over the full T, causality not discounted). A frozen vision tower runs forward only.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

import jax
import numpy as np

from xr_jax.models.config import ModelConfig

# Dense (no sparsity) bf16 peak FLOP/s per device from the vendor datasheets, keyed by a pattern of
# `device.device_kind` (lower case), most specific first: "TPU v5" is v5p while "TPU v5 lite" is v5e, and an
# H100 PCIe / NVL card is slower than the SXM part ("NVIDIA H100 80GB HBM3").
_PEAKS: tuple[tuple[str, float], ...] = (
    (r"gb200", 2.5e15), (r"b200", 2.25e15),
    (r"h200 nvl", 835e12), (r"h200", 989e12),
    (r"h100 pcie", 756e12), (r"h100 nvl", 835e12), (r"h100", 989e12),
    (r"a100", 312e12), (r"\bl4\b", 121e12), (r"a10g", 70e12), (r"\ba10\b", 125e12), (r"v100", 125e12),
    (r"tpu v6( lite|e)", 918e12),
    (r"tpu v5( lite|e)", 197e12), (r"tpu v5p?$", 459e12),
    (r"tpu v4", 275e12), (r"tpu v3", 123e12),
)
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


def peak_flops(device=None) -> Optional[float]:
    """Peak FLOP/s of one device, or None (with one warning per kind) when the device kind is unknown: the
    run goes on and reports MFU as unknown. CPU: cores x 32 FLOPs/cycle x 2.5 GHz, an *estimate* — pass the
    real figure as `train.peak_flops` for a meaningful MFU."""
    import os

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return (os.cpu_count() or 1) * CPU_CORE_PEAK / max(1, len(jax.local_devices()))
    value = datasheet_peak(device.device_kind)
    if value is None and device.device_kind not in _WARNED:
        _WARNED.add(device.device_kind)
        warnings.warn(f"no peak FLOP/s known for device {device.device_kind!r}: MFU is reported as unknown "
                      "(set train.peak_flops to the device's dense bf16 peak)", stacklevel=2)
    return value


def datasheet_peak(device_kind: str) -> Optional[float]:
    """The datasheet's dense bf16 FLOP/s for a `device_kind` string, None when unknown."""
    kind = device_kind.lower().strip()
    for pattern, value in _PEAKS:
        if re.search(pattern, kind):
            return value
    return None


_WARNED: set[str] = set()
