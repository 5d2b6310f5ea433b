"""Supervised fine-tuning: the loss, the jitted train step, and `main(config)` (stage 1 of the recipe).

The loss is the sum of token cross-entropies over the loss mask divided by the number of masked
tokens in the whole *global* batch (all microbatches, all devices): the same number whatever the
packing, the microbatch count or the mesh, so every layout trains the same model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xr_jax import parallel
from xr_jax.models import presets
from xr_jax.models.config import ModelConfig
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL
from xr_jax.train.losses import fused_cross_entropy
from xr_jax.train.state import TrainState, apply_update

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
IMAGE_KEYS = ("pixel_values", "vision_layout")  # image rows: the whole batch's patches, replicated


def make_loss_fn(model_cfg: ModelConfig, *, z_loss: float = 0.0, chunk: int = 1024, frozen: tuple[str, ...] = ()):
    """`loss(params, batch, count) -> (objective, (ce_sum, z_sum))`; objective = (ce + z_loss * z) / count.

    Frozen top-level subtrees get `stop_gradient`, so XLA does not even compute their gradients.
    """
    model = Qwen2_5_VL(model_cfg)

    def loss(params, batch, count):
        params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
        hidden, _ = model.apply(
            {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
            pixel_values=batch.get("pixel_values"), vision_layout=batch.get("vision_layout"), return_hidden=True)
        weight = model.apply({"params": params}, method="head_weight")
        mask = batch["loss_mask"].astype(jnp.float32)
        objective, logp, lse = fused_cross_entropy(
            hidden, weight, batch["targets"], mask / count, z_loss * mask / count, chunk)
        return objective, (-jnp.sum(logp * mask), jnp.sum(jnp.square(lse) * mask))

    return loss


def split_microbatches(batch: dict, n: int, mesh: Mesh | None = None) -> dict:
    """[B, ...] -> [n, B/n, ...] taking rows i*n + m into microbatch m (strided).

    Strided, not contiguous: each device's contiguous block of rows then holds rows of every
    microbatch, so every microbatch is spread over all data-parallel devices.
    """

    def one(x):
        b = x.shape[0]
        x = jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)  # [n, B/n, ...]
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, ("data", "fsdp"))))
        return x

    return {k: one(v) for k, v in batch.items()}


def compute_grads(loss_fn, params, batch: dict, microbatches: int = 1, mesh: Mesh | None = None, grad_shardings=None):
    """(grads, aux, count) of `loss_fn(params, batch, count) -> (objective, aux)`, accumulated over
    microbatches in a scan; `aux` (any pytree of sums) is summed too. `count` = loss tokens of the whole batch."""
    count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        grads, aux = grad_fn(params, batch, count)
        return grads, aux, count

    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731

    def body(carry, mb):
        g, aux = grad_fn(params, mb, count)
        return add(carry, (g, aux)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    if grad_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
    mbs = split_microbatches(batch, microbatches, mesh)
    aux_zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], mbs), count)[1]))
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux_zeros), mbs)
    return grads, aux, count


def _schedule_count(opt_state) -> jax.Array:
    """The optimizer's own step count (what the schedule sees; it does not advance on skipped steps)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else jnp.zeros((), jnp.int32)


def make_train_step(
    model_cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
    microbatches: int = 1, z_loss: float = 0.0, chunk: int = 1024, frozen: tuple[str, ...] = (),
    mesh: Mesh | None = None, shardings: TrainState | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step `(state, batch) -> (state, metrics)`.

    A non-finite loss or gradient norm leaves params and optimizer state unchanged (`metrics['skipped']`
    = 1); the step counter and RNG still advance, as the batch was consumed.
    """
    loss_fn = make_loss_fn(model_cfg, z_loss=z_loss, chunk=chunk, frozen=frozen)

    def step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS + IMAGE_KEYS if k in batch}
        if microbatches > 1 and "pixel_values" in batch:
            raise ValueError("train.microbatches > 1 with image rows is not supported; use train.microbatches=1")
        grads, (ce, z), count = compute_grads(
            loss_fn, state.params, batch, microbatches, mesh, None if shardings is None else shardings.params)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(ce) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
        params, opt_state = apply_update(tx, grads, state.params, state.opt_state, ok)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.split(state.rng)[0])
        metrics = {
            "loss": ce / count, "z_loss": z / count, "tokens": count, "grad_norm": grad_norm,
            "input_tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
            "lr": schedule(_schedule_count(state.opt_state)), "skipped": (~ok).astype(jnp.int32),
        }
        return new_state, metrics

    return step


def jit_train_step(step_fn, mesh: Mesh, shardings: TrainState):
    """jit with explicit shardings: state as given (donated), batch rows over ('data','fsdp'), image patches and their layout replicated, metrics replicated. One program per
    batch structure (text rows, or rows with images)."""
    compiled = {}

    def call(state, batch):
        keys = tuple(sorted(batch))
        if keys not in compiled:
            specs = {}
            for k in keys:
                if k in IMAGE_KEYS:
                    specs[k] = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), batch[k])
                else:
                    specs[k] = parallel.batch_sharding(mesh, np.ndim(batch[k]))
            compiled[keys] = jax.jit(step_fn, in_shardings=(shardings, specs),
                                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
        return compiled[keys](state, batch)

    return call


def device_batch(local: dict, mesh: Mesh, model_cfg: ModelConfig) -> dict:
    """Process-local numpy batch -> global arrays; image rows get M-RoPE positions and the vision layout."""
    rows = {k: local[k] for k in BATCH_KEYS}
    if "image_grid_thw" not in local:
        return parallel.global_batch(rows, mesh)
    from xr_jax.models.qwen2_5_vl import get_rope_index
    from xr_jax.models.vision import vision_layout

    if jax.process_count() > 1:
        raise NotImplementedError("SFT on image rows runs on one process (image patches are not assembled globally)")
    grid = np.asarray(local["image_grid_thw"])
    rows["positions"] = get_rope_index(rows["input_ids"], grid, rows["segment_ids"] > 0, model_cfg)[0].astype(np.int32)
    out = parallel.global_batch(rows, mesh)
    out["pixel_values"] = jnp.asarray(local["pixel_values"])
    out["vision_layout"] = vision_layout(grid, model_cfg.vision)
    return out


def check_batch_layout(batch_size: int, microbatches: int, mesh: Mesh, process_count: int = 1) -> None:
    """Fail at start, naming both numbers and a fix, when the batch does not split over the mesh."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % microbatches:
        raise parallel.MeshError(
            f"train.batch_size {batch_size} is not divisible by train.microbatches {microbatches}; "
            "make the batch size a multiple of the microbatch count")
    if (batch_size // microbatches) % dp:
        raise parallel.MeshError(
            f"each microbatch has {batch_size // microbatches} rows (train.batch_size {batch_size} / "
            f"train.microbatches {microbatches}) but the mesh has data x fsdp = {dp} batch shards; use a batch "
            f"size that is a multiple of {dp * microbatches} or change mesh.shape")
    if batch_size % process_count:
        raise parallel.MeshError(
            f"train.batch_size {batch_size} is not divisible by {process_count} processes")


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


def prompt_config(data):
    """The `pipeline.PromptConfig` of a `DataSection` (how an example becomes the user turn)."""
    from xr_jax.data import pipeline

    return pipeline.PromptConfig(template=data.prompt_template, system=data.system)


def image_config(data):
    """The `images.ImageConfig` of a `DataSection` (resolution bounds of image rows)."""
    from xr_jax.data import images

    return images.ImageConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)


def sft_data_config(config, plan=None):
    """The `pipeline.SFTConfig` of a run; `plan` (an `epochs.StepPlan`) sets the epochs (None: forever)."""
    from xr_jax.data import pipeline

    d, tr = config.data, config.train
    return pipeline.SFTConfig(
        max_len=tr.seq_len, batch_size=tr.batch_size, pack=d.pack, overflow=d.overflow, seed=tr.seed,
        prompt=prompt_config(d), shuffle=d.shuffle, image=image_config(d),
        num_epochs=None if plan is None else plan.num_epochs, epoch_batches=None if plan is None else plan.epoch_batches)


def plan_steps(config, tokenizer=None):
    """The run's `epochs.StepPlan`: fixed steps, or `train.epochs` counted on the data."""
    from xr_jax.data import pipeline
    from xr_jax.train import epochs

    if config.data.source == "random" and config.total_steps is None:
        raise ValueError("data.source 'random' has no epochs: set train.steps or train.steps_per_epoch")
    cfg = sft_data_config(config)
    settings = {"max_len": cfg.max_len, "overflow": cfg.overflow, "prompt": dataclasses.asdict(cfg.prompt),
                "image": dataclasses.asdict(cfg.image)}
    return epochs.plan_from_data(
        config, "sft", lambda: make_source(config), tokenizer, settings,
        lambda ex: pipeline.encode_sft(ex, tokenizer, cfg), "input_ids",
        lambda table, n: pipeline.sft_epoch_batches(table, cfg, n, jax.process_count()))


def make_batches(config, model_cfg: ModelConfig, tokenizer=None, plan=None):
    """The process-local batch iterator named by `data.source` ("random" or a `sources.FORMATS` name) for the
    epochs of `plan` (`plan_steps`; None: the data repeats without end)."""
    d, tr = config.data, config.train
    if d.source == "random":
        from xr_jax.data.random_tokens import RandomTokenBatches

        return RandomTokenBatches(tr.batch_size, tr.seq_len, model_cfg.text.vocab_size, seed=tr.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    from xr_jax.data import pipeline

    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                         f"{model_cfg.text.vocab_size}; use a matching tokenizer or set model.vocab_size")
    return iter(pipeline.sft_pipeline(make_source(config), tokenizer, sft_data_config(config, plan)))


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


def make_source(config):
    """The examples named by `data.source`: the synthetic task, or a `sources` format read from `data.path`."""
    from xr_jax.data import sources
    from xr_jax.data.synthetic import synthetic_source

    d = config.data
    if d.source == "synthetic":
        return synthetic_source(d.synthetic)
    if d.path is None:
        from xr_jax.config import ConfigError

        raise ConfigError(f"data.source {d.source!r} needs data.path (a file, directory or hub id)")
    return sources.load_source(d.path, d.source, split=d.split)


def main(config) -> dict:
    """Run (or resume) SFT from a resolved `xr_jax.config.Config`; returns the last step's metrics."""
    from xr_jax.config import to_dict
    from xr_jax.models.qwen2_5_vl import init_params
    from xr_jax.train import epochs, flops, loop, state as state_lib

    loop.check_outputs(config)
    d = config.distributed
    parallel.initialize_distributed(d.initialize, d.coordinator, d.num_processes, d.process_id)
    mesh = parallel.make_mesh(config.mesh.shape)
    tokenizer = load_tokenizer(config)
    model_cfg, loaded = build_model(config, mesh, tokenizer)
    parallel.check_model_fits_mesh(model_cfg, mesh)
    tr = config.train
    check_batch_layout(tr.batch_size, tr.microbatches, mesh, jax.process_count())
    frozen = ("visual",) if tr.freeze_vision and model_cfg.vision is not None else ()
    plan = plan_steps(config, tokenizer)
    tx, schedule = state_lib.make_optimizer(config.optim, plan.schedule_steps, plan.epoch_steps, frozen)
    init_fn = lambda key: init_params(model_cfg, key)  # noqa: E731
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(tx, boxed, mesh)
    batches = make_batches(config, model_cfg, tokenizer, plan)
    config_dict = to_dict(config)

    def fresh():
        if loaded is not None:
            return state_lib.state_from_params(loaded, tx, tr.seed, shardings)
        return state_lib.init_state(init_fn, tx, tr.seed, shardings)

    state, checkpointer = loop.resume_or_start(config, state_lib.abstract_state(init_fn, tx, shardings), batches, fresh)

    step_fn = epochs.with_data_metrics(jit_train_step(
        make_train_step(model_cfg, tx, schedule, microbatches=tr.microbatches, z_loss=tr.z_loss,
                        chunk=tr.loss_chunk, frozen=frozen, mesh=mesh, shardings=shardings),
        mesh, shardings), batches)
    device_peak = tr.peak_flops or flops.peak_flops()  # None on an unknown accelerator: MFU unknown
    peak = device_peak * mesh.size if device_peak else None
    flops_fn = lambda b: flops.text_train_flops(  # noqa: E731
        model_cfg, float((np.asarray(b["segment_ids"]) > 0).sum()) * jax.process_count(), tr.seq_len) + (
        flops.vision_flops(model_cfg, b.get("image_grid_thw"), trained=not frozen))
    lg = config.logging
    logger = loop.MetricsLogger.from_config(config, config_dict)
    try:
        with parallel.use_mesh(mesh):
            result = loop.run_loop(
                state, step_fn, batches, total_steps=plan.total,
                put_batch=lambda b: device_batch(b, mesh, model_cfg),
                logger=logger, checkpointer=checkpointer, config_dict=config_dict, nan_patience=tr.nan_patience,
                flops_fn=flops_fn, peak_flops=peak, log_every=lg.every, progress=lg.progress,
                print_every=lg.print_every,
            )
    finally:
        logger.close()
        if checkpointer is not None:
            checkpointer.close()
    loop.report_done(result.steps, export_final(config, model_cfg, result.state.params, tokenizer))
    return result.last or {}
