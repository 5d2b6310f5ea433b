"""The one rule that maps Hugging Face tensor names/layouts to xr_jax param paths and back.

xr_jax's Flax modules are named after the HF modules, so the mapping is mechanical:

  model.layers.{i}.self_attn.q_proj.weight (out, in)  ->  model/layers/self_attn/q_proj/kernel [i] (in, out)
  *norm*.weight / merger.ln_q.weight                  ->  .../scale          (unchanged)
  model.embed_tokens.weight                           ->  .../embedding      (unchanged)
  visual.patch_embed.proj.weight (out, C, T, P, P)    ->  .../kernel         (C*T*P*P, out)
  visual.merger.mlp.0.weight                          ->  visual/merger/mlp_0/kernel

Layers (`model.layers.{i}`, `visual.blocks.{i}`) are stacked along a leading axis, the layout
`nn.scan` uses. Both HF naming schemes are read (`model.language_model.*` == `model.*`,
`model.visual.*` == `visual.*`); the legacy hub scheme is written, which every version loads.
"""

from __future__ import annotations

import re

import numpy as np

STACKED = ("layers", "blocks")
_LAYER_RE = re.compile(r"^(?P<head>.*?\.(?:layers|blocks))\.(?P<idx>\d+)\.(?P<tail>.*)$")


def canonical_hf_name(name: str) -> str:
    """Map the v4.52+/v5 in-memory names to the legacy hub names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _leaf_kind(module_path: tuple[str, ...], suffix: str, ndim: int) -> str:
    if suffix == "bias":
        return "bias"
    last = module_path[-1]
    if "norm" in last or last == "ln_q":
        return "scale"
    if last == "embed_tokens":
        return "embedding"
    if ndim not in (2, 5):
        raise ValueError(f"unexpected {ndim}-D weight at {'.'.join(module_path)}")
    return "kernel"


def split_hf_name(name: str) -> tuple[tuple[str, ...], int | None, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (('model','layers','mlp','up_proj'), 3, 'weight')."""
    name = canonical_hf_name(name)
    layer = None
    m = _LAYER_RE.match(name)
    if m:
        layer = int(m.group("idx"))
        name = m.group("head") + "." + m.group("tail")
    parts = name.split(".")
    suffix = parts[-1]
    if suffix not in ("weight", "bias"):
        raise ValueError(f"unexpected tensor name {name!r}")
    module = []
    for p in parts[:-1]:
        if p.isdigit():  # nn.Sequential children, e.g. merger.mlp.0
            module[-1] = f"{module[-1]}_{p}"
        else:
            module.append(p)
    return tuple(module), layer, suffix


def hf_to_leaf(module: tuple[str, ...], suffix: str, w: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Convert one HF tensor to (param path, array in Flax layout)."""
    kind = _leaf_kind(module, suffix, w.ndim)
    if kind == "kernel":
        w = w.reshape(w.shape[0], -1).T  # (out, in[, C, T, P, P]) -> (in, out); exact
    return module + (kind,), w


def leaf_to_hf(path: tuple[str, ...], w: np.ndarray, layer: int | None, patch_shape=None) -> tuple[str, np.ndarray]:
    """Inverse of `hf_to_leaf` for one (unstacked) leaf. `patch_shape` = (C, T, P, P) for the patch embed."""
    *module, kind = path
    if kind == "kernel":
        w = w.T
        if module[-1] == "proj" and module[-2] == "patch_embed":
            w = w.reshape((w.shape[0],) + tuple(patch_shape))
    parts = []
    for p in module:
        m = re.fullmatch(r"(mlp)_(\d+)", p)  # back to nn.Sequential children
        parts.extend([m.group(1), m.group(2)] if m else [p])
        if p in STACKED and layer is not None:
            parts.append(str(layer))
    suffix = "bias" if kind == "bias" else "weight"
    return ".".join(parts + [suffix]), np.ascontiguousarray(w)
