"""Hugging Face checkpoints <-> xr_jax params, both directions.

Reads `config.json` (flat hub style or nested v4.57/v5 style; Qwen2.5-VL or text-only Qwen2),
single-file or sharded safetensors under either naming scheme, and writes the legacy hub scheme
that every transformers version loads. With a mesh, each tensor is read slice by slice straight
into its sharding (`jax.make_array_from_callback`), so the whole model never sits on one device.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from xr_jax.models import hf_tree, naming
from xr_jax.models.hf_tree import flatten, set_leaf, tree_from_hf  # noqa: F401  (re-exported)
from xr_jax.models.config import ModelConfig, TextConfig, VisionConfig
from xr_jax.errors import UserError

VL_ARCH = "Qwen2_5_VLForConditionalGeneration"
TEXT_ARCH = "Qwen2ForCausalLM"
# Files besides the weights, the config and the tokenizer's (`tokenizer.TOKENIZER_FILES`) that a checkpoint
# carries: processor and generation settings, copied on export so that the result is usable as is.
PROCESSOR_FILES = (
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)


class ModelCheckpointError(UserError, ValueError):
    """A model directory (Hugging Face, or an xr_jax export) or tensor set that does not match what the model
    expects; a training run's checkpoint directory raises `checkpoints.training.CheckpointError` instead."""


# ----------------------------------------------------------------------------- config.json


def _rope(d: Mapping[str, Any]) -> tuple[float, Optional[tuple[int, ...]]]:
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 1e6))
    # top-level "mrope_section": where `config_to_hf` keeps a text model's (unused by transformers' Qwen2)
    section = rp.get("mrope_section", rs.get("mrope_section", d.get("mrope_section")))
    return float(theta), (tuple(int(x) for x in section) if section else None)


def config_from_hf(d: Mapping[str, Any], **runtime) -> ModelConfig:
    """Typed config from a `config.json` dict; `runtime` sets dtype/scan/remat/attention fields."""
    model_type = d.get("model_type", "")
    if model_type not in ("qwen2_5_vl", "qwen2", "qwen2_vl"):
        raise ModelCheckpointError(
            f"config.json has model_type {model_type!r}: xr_jax reads Qwen2.5-VL ('qwen2_5_vl') and "
            "Qwen2/Qwen2.5 ('qwen2') checkpoints"
        )
    if model_type == "qwen2_vl":
        raise ModelCheckpointError("Qwen2-VL (model_type 'qwen2_vl') is not supported; use a Qwen2.5-VL checkpoint")
    text = dict(d.get("text_config") or {})
    flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    t = {**flat, **text}  # nested text keys win over top-level leftovers
    theta, section = _rope(t)
    tie = bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    eos = t.get("eos_token_id")
    text_cfg = TextConfig(
        vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]), num_layers=int(t["num_hidden_layers"]),
        num_heads=int(t["num_attention_heads"]),
        num_kv_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        mrope_section=section,
        tie_word_embeddings=tie, max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
        bos_token_id=t.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    vision_cfg = None
    if model_type == "qwen2_5_vl":
        v = d.get("vision_config") or {}
        vision_cfg = VisionConfig(
            depth=int(v.get("depth", 32)), hidden_size=int(v.get("hidden_size", 1280)),
            intermediate_size=int(v.get("intermediate_size", 3420)), num_heads=int(v.get("num_heads", 16)),
            out_hidden_size=int(v.get("out_hidden_size", text_cfg.hidden_size)),
            patch_size=int(v.get("patch_size", 14)), temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)), window_size=int(v.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(v.get("in_chans", v.get("in_channels", 3))),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            tokens_per_second=int(v.get("tokens_per_second", 2)),
        )
    ids = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id") if k in d}
    cfg = ModelConfig(text=text_cfg, vision=vision_cfg, **ids, **runtime)
    cfg.validate()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A flat hub-style `config.json` (what the published checkpoints carry). A text model keeps its image
    token ids and M-RoPE sections too (transformers' Qwen2 ignores them), so `config_from_hf` reads back the
    same `ModelConfig`."""
    t = cfg.text
    d: dict[str, Any] = {
        "architectures": [VL_ARCH if cfg.vision is not None else TEXT_ARCH],
        "model_type": "qwen2_5_vl" if cfg.vision is not None else "qwen2",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False, "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "torch_dtype": "float32",
    }
    d.update(image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
             vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id)
    if cfg.vision is None and t.mrope_section is not None:
        d["mrope_section"] = list(t.mrope_section)
    if cfg.vision is not None:
        v = cfg.vision
        d["rope_scaling"] = {"type": "mrope", "mrope_section": list(t.mrope_section)}
        d["vision_config"] = {
            "model_type": "qwen2_5_vl", "depth": v.depth, "hidden_size": v.hidden_size, "hidden_act": "silu",
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_chans": v.in_channels,
            "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
        }
    return d


DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers v4 / v5 spelling


def hf_config(cfg: ModelConfig, source: Optional[Mapping[str, Any]] = None, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of an export. With the source checkpoint's config dict, that dict with every key
    kept (flat or nested, keys xr_jax does not model included); only the values where `cfg` differs from
    what xr_jax reads in the source are written, each where the source keeps it (top level, else its
    `text_config`; nested dicts key by key), and the weights' dtype. Without a source, `config_to_hf`."""
    ours = config_to_hf(cfg)
    ours["torch_dtype"] = dtype
    if source is None:
        return ours
    out = copy.deepcopy(dict(source))
    theirs = config_to_hf(config_from_hf(source))
    for key, value in ours.items():
        if key not in DTYPE_KEYS and theirs.get(key) != value:
            _put(out, key, value)
    holders = [h for h in (out, out.get("text_config")) if isinstance(h, dict) and any(k in h for k in DTYPE_KEYS)]
    for holder in holders or [out]:
        for key in [k for k in DTYPE_KEYS if k in holder] or ["torch_dtype"]:
            holder[key] = dtype
    return out


def _put(d: dict, key: str, value: Any) -> None:
    """Set `key` where the config dict `d` keeps it: its top level, else its `text_config`, else the top level."""
    text = d.get("text_config")
    holder = text if isinstance(text, dict) and key not in d and key in text else d
    if isinstance(value, dict) and isinstance(holder.get(key), dict):
        for k, v in value.items():
            _put(holder[key], k, v)
    else:
        holder[key] = value


def read_config_dict(path: str) -> dict[str, Any]:
    """The raw `config.json` dict of a Hugging Face directory."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelCheckpointError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
    with open(cfg_file) as f:
        return json.load(f)


def read_config(path: str, **runtime) -> ModelConfig:
    return config_from_hf(read_config_dict(path), **runtime)


# ----------------------------------------------------------------------------- tensors <-> tree


def tree_to_hf(tree: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Params -> legacy-named HF tensors for the model `cfg` describes."""
    patch_shape = None
    if cfg.vision is not None:
        v = cfg.vision
        patch_shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return hf_tree.tree_to_hf(tree, patch_shape)


# ----------------------------------------------------------------------------- loading


def _tensor_files(path: str) -> dict[str, str]:
    """tensor name -> file, for `model.safetensors` or a sharded set with its index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ModelCheckpointError(f"{path!r} has no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "np") as f:
        return {k: single for k in f.keys()}


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path -> shape of the model `cfg` describes (abstract init; nothing allocated)."""
    from xr_jax.models.qwen2_5_vl import abstract_params

    return {p: tuple(v.shape) for p, v in flatten(abstract_params(cfg)).items()}


def load_hf(
    path: str,
    dtype: Optional[str] = None,
    shardings: Optional[Callable[[tuple[str, ...], tuple[int, ...]], Any]] = None,
    **runtime,
) -> tuple[ModelConfig, dict]:
    """Read a HF Qwen2.5-VL / Qwen2 checkpoint dir -> (config, params).

    dtype: cast every tensor ("float32", "bfloat16"); None keeps the stored dtype.
    shardings: optional `fn(param_path, shape) -> jax.sharding.Sharding`; each tensor is then read in
      device-sized slices straight into a global array. Without it params are host numpy arrays.
    """
    cfg = read_config(path, **runtime)
    files = _tensor_files(path)
    # group HF names by destination leaf (layers stacked)
    groups: dict[tuple[str, ...], dict[Optional[int], str]] = defaultdict(dict)
    for name in files:
        module, layer, suffix = naming.split_hf_name(name)
        groups[module + (naming._leaf_kind(module, suffix, 2 if suffix == "weight" else 1),)][layer] = name
    if cfg.text.tie_word_embeddings:
        groups.pop(("lm_head", "kernel"), None)  # some tied checkpoints still carry a copy
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(groups))
    extra = sorted(set(groups) - set(want))
    if missing:
        raise ModelCheckpointError(f"checkpoint {path!r} is missing tensors for: {', '.join('/'.join(p) for p in missing[:8])}")
    if extra:
        names = [next(iter(groups[p].values())) for p in extra]
        raise ModelCheckpointError(f"checkpoint {path!r} has unexpected tensors: {', '.join(names[:8])}")

    handles: dict[str, Any] = {}

    def tensor(name: str):
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, "np")
        return handles[file], handles[file].get_slice(name)

    def is_kernel(name: str, ndim: int) -> bool:
        module, _, suffix = naming.split_hf_name(name)
        return naming._leaf_kind(module, suffix, ndim) == "kernel"

    def flax_shape(name: str) -> tuple[int, ...]:
        shape = tuple(tensor(name)[1].get_shape())
        return (int(np.prod(shape[1:])), shape[0]) if is_kernel(name, len(shape)) else shape

    def read(name: str, idx=None) -> np.ndarray:
        """One HF tensor in Flax layout, or its `idx` slice (a Flax (in, out) slice is an HF [out, in] slice, transposed)."""
        f, sl = tensor(name)
        shape = sl.get_shape()
        if is_kernel(name, len(shape)):
            if idx is None or len(shape) == 5:  # the 5-D patch embed is small: read whole, then slice
                w = f.get_tensor(name).reshape(shape[0], -1).T
                w = w if idx is None else w[idx]
            else:
                w = sl[idx[1], idx[0]].T
        else:
            w = f.get_tensor(name) if idx is None else sl[idx]
        return w.astype(dtype) if dtype else w

    params: dict = {}
    for leaf_path, by_layer in groups.items():
        layers = sorted(k for k in by_layer if k is not None)
        first = by_layer[layers[0]] if layers else by_layer[None]
        got = ((len(layers),) if layers else ()) + flax_shape(first)
        if got != want[leaf_path]:
            raise ModelCheckpointError(
                f"tensor {first} has shape {got} in the checkpoint (as {'/'.join(leaf_path)}) but the config "
                f"needs {want[leaf_path]}"
            )
        if shardings is None:
            value = np.stack([read(by_layer[i]) for i in layers]) if layers else read(first)
        else:
            def cb(index, by_layer=by_layer, layers=layers, first=first):
                index = tuple(index)
                if not layers:
                    return read(first, index)
                return np.stack([read(by_layer[i], index[1:]) for i in layers[index[0]]])

            value = jax.make_array_from_callback(got, shardings(leaf_path, got), cb)
        set_leaf(params, leaf_path, value, "/".join(leaf_path))
    return cfg, params


# ----------------------------------------------------------------------------- saving


def publish(path: str) -> None:
    """Give a written file the permissions the umask allows (safetensors writes 0600): an export is for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_hf(
    params: Mapping, cfg: ModelConfig, out_dir: str, source_config: Optional[Mapping[str, Any]] = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write a transformers-loadable model: safetensors (sharded past `max_shard_bytes`) and config.json
    (`hf_config`: the source checkpoint's `source_config` with every key kept, when given). Files are
    world-readable (mode 0644 under the usual umask)."""
    os.makedirs(out_dir, exist_ok=True)
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(params))
    tensors = tree_to_hf(host, cfg)
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    shards.append(cur)
    written = []
    if len(shards) == 1:
        written.append(os.path.join(out_dir, "model.safetensors"))
        save_file(shards[0], written[-1], metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            written.append(os.path.join(out_dir, fname))
            save_file(shard, written[-1], metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        written.append(os.path.join(out_dir, "model.safetensors.index.json"))
        with open(written[-1], "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    dtypes = {t.dtype for t in tensors.values()}
    dtype = "bfloat16" if dtypes == {np.dtype(ml_dtypes.bfloat16)} else "float32"
    written.append(os.path.join(out_dir, "config.json"))
    with open(written[-1], "w") as f:
        json.dump(hf_config(cfg, source_config, dtype), f, indent=2)
    for path in written:
        publish(path)
