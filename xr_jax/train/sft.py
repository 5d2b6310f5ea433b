"""Supervised fine-tuning: the loss, the jitted train step, its data, and `main(config)` (stage 1 of the recipe).

The loss is the sum of token cross-entropies over the loss mask divided by the number of masked
tokens in the whole *global* batch (all microbatches, all devices): the same number whatever the
packing, the microbatch count or the mesh, so every layout trains the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xr_jax import parallel
from xr_jax.models.config import ModelConfig
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL
from xr_jax.train import setup
from xr_jax.train.losses import fused_cross_entropy
from xr_jax.train.state import TrainState, apply_update, schedule_count

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
            "lr": schedule(schedule_count(state.opt_state)), "skipped": (~ok).astype(jnp.int32),
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


def sft_data_config(config, plan=None):
    """The `pipeline.SFTConfig` of a run; `plan` (an `epochs.StepPlan`) sets the epochs (None: forever)."""
    from xr_jax.data import pipeline

    d, tr = config.data, config.train
    return pipeline.SFTConfig(
        max_len=tr.seq_len, batch_size=tr.batch_size, pack=d.pack, overflow=d.overflow, seed=tr.seed,
        prompt=setup.prompt_config(d), shuffle=d.shuffle, image=setup.image_config(d),
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
        config, "sft", lambda: setup.make_source(config), tokenizer, settings,
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
    return iter(pipeline.sft_pipeline(setup.make_source(config), tokenizer, sft_data_config(config, plan)))


def main(config) -> dict:
    """Run (or resume) SFT from a resolved `xr_jax.config.Config`; returns the last step's metrics."""
    from xr_jax.train import epochs, flops

    tr = config.train
    run = setup.Run.start(
        config, lambda mesh: check_batch_layout(tr.batch_size, tr.microbatches, mesh, jax.process_count()))
    mesh, model_cfg, tokenizer = run.mesh, run.model_cfg, run.tokenizer
    plan = plan_steps(config, tokenizer)
    st = run.state_setup(plan)
    batches = make_batches(config, model_cfg, tokenizer, plan)
    state, checkpointer = run.resume_or_start(st, batches)
    step_fn = epochs.with_data_metrics(jit_train_step(
        make_train_step(model_cfg, st.tx, st.schedule, microbatches=tr.microbatches, z_loss=tr.z_loss,
                        chunk=tr.loss_chunk, frozen=st.frozen, mesh=mesh, shardings=st.shardings),
        mesh, st.shardings), batches)
    device_peak = tr.peak_flops or flops.peak_flops()  # None on an unknown accelerator: MFU unknown
    peak = device_peak * mesh.size if device_peak else None
    flops_fn = lambda b: flops.text_train_flops(  # noqa: E731
        model_cfg, float((np.asarray(b["segment_ids"]) > 0).sum()) * jax.process_count(), tr.seq_len) + (
        flops.vision_flops(model_cfg, b.get("image_grid_thw"), trained=not st.frozen))
    return run.train(state, checkpointer, step_fn, batches, plan.total,
                     put_batch=lambda b: device_batch(b, mesh, model_cfg), flops_fn=flops_fn,
                     peak_flops=peak)
