"""`xr-jax convert`: Hugging Face directory <-> xr_jax model checkpoint (Orbax params + model config).

An xr_jax model checkpoint is a directory with
  params/             Orbax (sharded, restorable onto any mesh)
  model_config.json   the typed `ModelConfig`
  assets/             tokenizer / processor files of the source checkpoint, for export and sampling
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import orbax.checkpoint as ocp

from xr_jax import parallel
from xr_jax.models import hf
from xr_jax.models.config import ModelConfig, config_from_dict, config_to_dict
from xr_jax.models.qwen2_5_vl import abstract_params

PARAMS_DIR, CONFIG_FILE, ASSETS_DIR = "params", "model_config.json", "assets"


def is_model_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_model(out_dir: str, cfg: ModelConfig, params, assets_from: Optional[str] = None) -> None:
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        if assets_from:
            os.makedirs(os.path.join(out_dir, ASSETS_DIR), exist_ok=True)
            for name in hf.SIDE_FILES:
                src = os.path.join(assets_from, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(out_dir, ASSETS_DIR, name))


def load_model(path: str, mesh=None, **runtime) -> tuple[ModelConfig, dict]:
    """(config, params) from an xr_jax model checkpoint, placed on `mesh` by the logical rules (or one device)."""
    if not is_model_checkpoint(path):
        raise hf.CheckpointError(f"{path!r} is not an xr_jax model checkpoint (needs {PARAMS_DIR}/ and {CONFIG_FILE})")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        cfg = config_from_dict(json.load(f)).replace(**runtime)
    target = abstract_params(cfg)
    if mesh is not None:
        fn = parallel.path_shardings(cfg, mesh)
        shardings = {p: fn(p, v.shape) for p, v in hf.flatten(target).items()}
        target = _with_shardings(target, shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_DIR), target)
    return cfg, params


def _with_shardings(tree, shardings, prefix=()):
    return {
        k: _with_shardings(v, shardings, prefix + (k,)) if isinstance(v, dict)
        else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[prefix + (k,)])
        for k, v in tree.items()
    }


def load_any(path: str, mesh=None, cast: Optional[str] = None, **runtime) -> tuple[ModelConfig, dict]:
    """A HF directory or an xr_jax checkpoint -> (config, params); `cast` converts the params' dtype and
    `runtime` sets ModelConfig's runtime fields (compute dtype, scan, remat, attention)."""
    if is_model_checkpoint(path):
        cfg, params = load_model(path, mesh, **runtime)
        if cast:
            params = jax.tree_util.tree_map(lambda x: x.astype(cast), params)
        return cfg, params
    shardings = parallel.path_shardings(hf.read_config(path, **runtime), mesh) if mesh is not None else None
    return hf.load_hf(path, dtype=cast, shardings=shardings, **runtime)


def hf_to_xr(hf_dir: str, out_dir: str, dtype: Optional[str] = None, mesh=None) -> ModelConfig:
    cfg, params = load_any(hf_dir, mesh=mesh, cast=dtype)
    save_model(out_dir, cfg, params, assets_from=hf_dir)
    return cfg


def xr_to_hf(ckpt_dir: str, out_dir: str) -> ModelConfig:
    cfg, params = load_model(ckpt_dir)
    hf.save_hf(params, cfg, out_dir, source_dir=os.path.join(ckpt_dir, ASSETS_DIR))
    return cfg
