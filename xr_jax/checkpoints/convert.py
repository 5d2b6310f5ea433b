"""`xr-jax convert`: Hugging Face directory <-> xr_jax model checkpoint (Orbax params + model config).

An xr_jax model checkpoint is a directory with
  params/             Orbax (sharded, restorable onto any mesh)
  model_config.json   the typed `ModelConfig`
  assets/             everything else a later stage needs: the tokenizer files with the chat template, the
                      processor and generation settings, and the source checkpoint's own config.json (so that
                      `--to-hf` writes back every key of it)

Every command that takes a model finds its tokenizer there (`tokenizer_source`): `assets/` of an xr_jax
checkpoint, the directory itself for a Hugging Face one; the one override is `model.tokenizer` in a config
and `--tokenizer` on the `sample` / `convert` command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

import jax
import orbax.checkpoint as ocp

from xr_jax import parallel
from xr_jax.data.tokenizer import TOKENIZER_FILES
from xr_jax.errors import UserError
from xr_jax.models import hf
from xr_jax.models.config import ModelConfig, config_from_dict, config_to_dict
from xr_jax.models.qwen2_5_vl import abstract_params

PARAMS_DIR, CONFIG_FILE, ASSETS_DIR = "params", "model_config.json", "assets"


def is_model_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


class TokenizerNotFound(UserError):
    """A command found no tokenizer for its model; the message names the setting that gives one."""


def assets_dir(path: str) -> str:
    """Where a model directory keeps its non-weight files: `assets/` of an xr_jax checkpoint, a HF dir itself."""
    return os.path.join(path, ASSETS_DIR) if is_model_checkpoint(path) else path


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def tokenizer_source(model_path: Optional[str], override: Optional[str] = None, setting: str = "--tokenizer") -> str:
    """The tokenizer a command uses: `override` ("qwen2.5", "tiny" or a directory) when given, else the model's
    own (`assets_dir`). `setting` names the override in the message (`model.tokenizer` or `--tokenizer`)."""
    if override is not None:
        return override
    hint = f"set {setting} ('qwen2.5', 'tiny' or a directory with tokenizer.json / tokenizer_config.json)"
    if model_path is None:
        raise TokenizerNotFound(f"a preset model has no tokenizer of its own: {hint}")
    source = assets_dir(model_path)
    if not has_tokenizer(source):
        raise TokenizerNotFound(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {source!r}: {hint}")
    return source


def load_tokenizer_for(model_path: Optional[str], override: Optional[str] = None, setting: str = "--tokenizer"):
    """`tokenizer_source`, loaded."""
    from xr_jax.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer_source(model_path, override, setting))
    except ValueError as e:  # an unknown tokenizer name
        raise TokenizerNotFound(f"{setting}: {e}") from None


def write_assets(out_dir: str, cfg: ModelConfig, source: Optional[str] = None, tokenizer=None) -> None:
    """The non-weight files a later stage needs, into `out_dir`: the tokenizer's files (written by `tokenizer`,
    else copied from `source`, a HF dir or xr_jax checkpoint), the source's processor and generation settings,
    and for a vision model without them the image processor settings xr_jax preprocesses with."""
    from xr_jax.data.images import ImageConfig

    os.makedirs(out_dir, exist_ok=True)
    if source is not None:
        names = hf.PROCESSOR_FILES + (TOKENIZER_FILES if tokenizer is None else ())
        for name in names:
            src = os.path.join(assets_dir(source), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    processor = os.path.join(out_dir, "preprocessor_config.json")
    if cfg.vision is not None and not os.path.isfile(processor):
        with open(processor, "w") as f:
            json.dump(ImageConfig().preprocessor_config(), f, indent=2)


def save_model(out_dir: str, cfg: ModelConfig, params, source: Optional[str] = None, tokenizer=None) -> None:
    """Write an xr_jax model checkpoint: params, model config and `assets/` (`write_assets`, plus the source's
    config.json when it has one: HF dir -> xr_jax -> HF keeps every key)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        assets = os.path.join(out_dir, ASSETS_DIR)
        write_assets(assets, cfg, source, tokenizer)
        if source is not None and os.path.isfile(os.path.join(assets_dir(source), "config.json")):
            shutil.copyfile(os.path.join(assets_dir(source), "config.json"), os.path.join(assets, "config.json"))


def load_model(path: str, mesh=None, **runtime) -> tuple[ModelConfig, dict]:
    """(config, params) from an xr_jax model checkpoint, placed on `mesh` by the logical rules (or one device)."""
    if not is_model_checkpoint(path):
        raise hf.ModelCheckpointError(f"{path!r} is not an xr_jax model checkpoint (needs {PARAMS_DIR}/ and {CONFIG_FILE})")
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
    # `runtime` may hold the compute `dtype`, a ModelConfig field: set after loading, not as load_hf's cast
    cfg, params = hf.load_hf(path, dtype=cast, shardings=shardings)
    return cfg.replace(**runtime), params


def hf_to_xr(hf_dir: str, out_dir: str, dtype: Optional[str] = None, mesh=None, tokenizer=None) -> ModelConfig:
    """`xr-jax convert --from-hf`: the checkpoint with its assets (`tokenizer`, when given, replaces its own)."""
    cfg, params = load_any(hf_dir, mesh=mesh, cast=dtype)
    save_model(out_dir, cfg, params, source=hf_dir, tokenizer=tokenizer)
    return cfg


def xr_to_hf(ckpt_dir: str, out_dir: str, tokenizer=None) -> ModelConfig:
    """`xr-jax convert --to-hf`: weights, config.json (the source's own keys kept, `hf.hf_config`) and the
    assets, so that transformers loads the model, its tokenizer and (VL) its processor from `out_dir`."""
    cfg, params = load_model(ckpt_dir)
    source_cfg = os.path.join(ckpt_dir, ASSETS_DIR, "config.json")
    hf.save_hf(params, cfg, out_dir, source_config=hf.read_config_dict(os.path.dirname(source_cfg))
               if os.path.isfile(source_cfg) else None)
    write_assets(out_dir, cfg, source=ckpt_dir, tokenizer=tokenizer)
    if not has_tokenizer(out_dir):
        print(f"warning: {ckpt_dir!r} has no tokenizer files, so neither has {out_dir!r}; "
              "give --tokenizer NAME_OR_DIR to add one", file=sys.stderr)
    return cfg
