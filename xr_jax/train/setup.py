"""Run setup shared by both trainers, `xr-jax plan` and the benchmarks, written once.

A training run is the same sequence for SFT and GRPO: processes and mesh -> tokenizer -> model (loaded or a
preset) -> the stage's layout check -> optimizer over the stage's update count -> abstract init -> state
shardings -> fresh state or resume from `checkpoint.dir` -> metrics logger -> the loop -> export. `Run` holds
the first part (`start`), `StateSetup` the optimizer and where the state lives (`plan` and the benchmarks
build only this, on abstract or random params), `Run.train` the end. The stages add only what differs:
their data, their step function and their layout rule.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import optax
from jax.sharding import Mesh

from xr_jax import parallel
from xr_jax.config import ConfigError, OptimSection, to_dict
from xr_jax.models import presets
from xr_jax.models.config import ModelConfig
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.train import loop, state as state_lib
from xr_jax.train.state import TrainState


def frozen_subtrees(train, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The top-level param subtrees the run does not train: the vision tower with `train.freeze_vision`."""
    return ("visual",) if train.freeze_vision and model_cfg.vision is not None else ()


@dataclasses.dataclass(frozen=True)
class StateSetup:
    """The optimizer and the train state's shardings on a mesh: what a step is jitted against."""

    model_cfg: ModelConfig
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    frozen: tuple[str, ...] = ()

    @property
    def init_fn(self) -> Callable[[jax.Array], Any]:
        return functools.partial(init_params, self.model_cfg)

    def abstract(self) -> TrainState:
        """ShapeDtypeStructs with shardings: a checkpoint's restore target, or what `plan` compiles against."""
        return state_lib.abstract_state(self.init_fn, self.tx, self.shardings)

    def fresh(self, seed: int, params=None) -> TrainState:
        """A new state on the mesh: around `params` (loaded weights; device arrays already in place become its
        buffers) or randomly initialised from `seed`."""
        if params is not None:
            return state_lib.state_from_params(params, self.tx, seed, self.shardings)
        return state_lib.init_state(self.init_fn, self.tx, seed, self.shardings)


def state_setup(optim: OptimSection, model_cfg: ModelConfig, mesh: Mesh, total_steps: int,
                epoch_steps: state_lib.EpochSteps = None, frozen: tuple[str, ...] = ()) -> StateSetup:
    """Optimizer over `total_steps` optimizer updates (`epoch_steps` for per-epoch decay), and the state's
    shardings derived from the abstract init (no param is materialised)."""
    tx, schedule = state_lib.make_optimizer(optim, total_steps, epoch_steps, frozen)
    boxed = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.PRNGKey(0))
    return StateSetup(model_cfg, tx, schedule, state_lib.state_shardings(tx, boxed, mesh), frozen)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """A training run's mesh, tokenizer and model, built by `start`; `loaded` are weights from `model.path`."""

    config: Any
    mesh: Mesh
    tokenizer: Any
    model_cfg: ModelConfig
    loaded: Any
    frozen: tuple[str, ...]

    @classmethod
    def start(cls, config, check_layout: Callable[[Mesh], None]) -> "Run":
        """Outputs checked writable, processes joined, the mesh, tokenizer and model; `check_layout(mesh)` (the
        stage's batch rule) runs before any data is read or any weight is loaded into a state."""
        loop.check_outputs(config)
        d = config.distributed
        parallel.initialize_distributed(d.initialize, d.coordinator, d.num_processes, d.process_id)
        mesh = parallel.make_mesh(config.mesh.shape)
        tokenizer = load_tokenizer(config)
        model_cfg, loaded = build_model(config, mesh, tokenizer)
        parallel.check_model_fits_mesh(model_cfg, mesh)
        check_layout(mesh)
        return cls(config, mesh, tokenizer, model_cfg, loaded, frozen_subtrees(config.train, model_cfg))

    def state_setup(self, updates) -> StateSetup:
        """`state_setup` for this run; `updates` (an `epochs.StepPlan`) counts optimizer updates."""
        return state_setup(self.config.optim, self.model_cfg, self.mesh, updates.schedule_steps, updates.epoch_steps,
                           self.frozen)

    def fresh(self, st: StateSetup) -> TrainState:
        """The state a run without a checkpoint starts from: the loaded weights, else a random init."""
        return st.fresh(self.config.train.seed, self.loaded)

    def resume_or_start(self, st: StateSetup, batches):
        """(state, checkpointer): `loop.resume_or_start` on this run's restore target (data position into
        `batches`), else `fresh`."""
        return loop.resume_or_start(self.config, st.abstract(), batches, lambda: self.fresh(st))

    def train(self, state: TrainState, checkpointer, step_fn, batches, total_steps: int, *,
              put_batch: Callable[[dict], dict], close: Callable[[], None] = lambda: None, **loop_kwargs) -> dict:
        """The loop with the run's logger and checkpointer (both closed after, with `close`), then the export;
        returns the last step's metrics. `loop_kwargs`: `run_loop`'s FLOP accounting."""
        config = self.config
        config_dict = to_dict(config)
        lg = config.logging
        logger = loop.MetricsLogger.from_config(config, config_dict)
        try:
            with parallel.use_mesh(self.mesh):
                result = loop.run_loop(
                    state, step_fn, batches, total_steps=total_steps, put_batch=put_batch, logger=logger,
                    checkpointer=checkpointer, config_dict=config_dict, nan_patience=config.train.nan_patience,
                    log_every=lg.every, progress=lg.progress, print_every=lg.print_every, **loop_kwargs)
        finally:
            close()
            logger.close()
            if checkpointer is not None:
                checkpointer.close()
        loop.report_done(result.steps, export_final(config, self.model_cfg, result.state.params, self.tokenizer))
        return result.last or {}


# ----------------------------------------------------------------------------- model, tokenizer, data, export


def build_model(config, mesh: Mesh, tokenizer=None):
    """(ModelConfig, params or None): from `model.path` (HF or xr_jax checkpoint, loaded straight onto the
    mesh) or a random-init preset, whose vocabulary is `model.vocab_size`, else the tokenizer's, and whose
    image/vision token ids are the tokenizer's."""
    m = config.model
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                   attention=m.attention)
    if m.path is not None:
        from xr_jax.checkpoints import convert

        return convert.load_any(m.path, mesh=mesh, cast=m.param_dtype, **runtime)
    cfg = presets.preset(m.preset, **runtime)
    vocab = m.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if vocab is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab))
    if tokenizer is not None:
        sp = tokenizer.special
        cfg = cfg.replace(image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                          vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                          text=dataclasses.replace(cfg.text, eos_token_id=sp.im_end, bos_token_id=sp.pad))
    return cfg, None


def load_tokenizer(config):
    """The model's tokenizer (`convert.load_tokenizer_for`: `model.tokenizer`, else the checkpoint's own);
    None for `data.source: random` without `model.tokenizer`."""
    if config.data.source == "random" and config.model.tokenizer is None:
        return None
    from xr_jax.checkpoints import convert

    return convert.load_tokenizer_for(config.model.path, config.model.tokenizer, "model.tokenizer")


def make_source(config):
    """The examples named by `data.source`: the synthetic task, or a `sources` format read from `data.path`."""
    from xr_jax.data import sources
    from xr_jax.data.synthetic import synthetic_source

    d = config.data
    if d.source == "synthetic":
        return synthetic_source(d.synthetic)
    if d.path is None:
        raise ConfigError(f"data.source {d.source!r} needs data.path (a file, directory or hub id)")
    return sources.load_source(d.path, d.source, split=d.split)


def prompt_config(data):
    """The `pipeline.PromptConfig` of a `DataSection` (how an example becomes the user turn)."""
    from xr_jax.data import pipeline

    return pipeline.PromptConfig(template=data.prompt_template, system=data.system)


def image_config(data):
    """The `images.ImageConfig` of a `DataSection` (resolution bounds of image rows)."""
    from xr_jax.data import images

    return images.ImageConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)


def export_final(config, model_cfg: ModelConfig, params, tokenizer=None) -> Optional[str]:
    """Save the final params as an xr_jax model checkpoint when `train.export_dir` is set, with the assets a
    later stage needs (`convert.save_model`: the tokenizer used, the source's processor settings and config);
    returns its path. Only completed runs get here. Written atomically (`write_atomically`): a reader never sees a
    half-written export, and an existing one is replaced only once the new one is complete."""
    if config.train.export_dir is None:
        return None
    from xr_jax.checkpoints import convert

    return write_atomically(config.train.export_dir, lambda tmp: convert.save_model(
        tmp, model_cfg, params, source=config.model.path, tokenizer=tokenizer))


def write_atomically(out_dir: str, write: Callable[[str], None]) -> str:
    """`write(tmp)` into `<out_dir>.partial` beside `out_dir` (every process: Orbax writes shards from all
    of them), then process 0 swaps it into place with renames; returns the absolute `out_dir`."""
    import shutil

    out_dir = os.path.abspath(out_dir)
    tmp, old = out_dir + ".partial", out_dir + ".replaced"
    if jax.process_index() == 0:
        for leftover in (tmp, old):  # from a run killed while exporting
            shutil.rmtree(leftover, ignore_errors=True)
    parallel.sync_processes("xr_jax export start")
    write(tmp)
    parallel.sync_processes("xr_jax export written")
    if jax.process_index() == 0:
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    parallel.sync_processes("xr_jax export done")
    return out_dir
