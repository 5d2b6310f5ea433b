"""Train state (params, optimizer state, step, RNG), the optax optimizer and its learning-rate schedules.

Params are fp32 master weights (`model.param_dtype`); the model casts them to the compute dtype at use,
so mixed precision needs nothing here. The optimizer state mirrors the params, and so does its sharding
(`state_shardings`). Freezing a subtree (the vision tower) routes it to `optax.set_to_zero()` inside a
`multi_transform`, so AdamW allocates no moments for it at all.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xr_jax import parallel
from xr_jax.config import OptimSection


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training and must be checkpointed (besides the data position)."""

    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw PRNG key, advanced every step


# ----------------------------------------------------------------------------- schedules


EpochSteps = Union[Sequence[int], int, None]


def make_schedule(optim: OptimSection, total_steps: int, epoch_steps: EpochSteps = None) -> optax.Schedule:
    """Learning rate as a function of the optimizer step.

    "step_decay" is the paper's SFT schedule: lr x `decay_per_epoch` after every epoch. `epoch_steps`: the
    optimizer steps of each epoch (counted from the data, `xr_jax.train.epochs`: decay at their cumulative
    ends), or one number for every epoch; None: the whole run is one epoch. Warmup (`warmup_steps`, else
    `warmup_ratio` x total_steps) counts in the first epoch.
    """
    warmup = optim.warmup_steps or int(optim.warmup_ratio * total_steps)
    end = optim.lr * optim.min_lr_ratio
    if optim.schedule == "step_decay" and epoch_steps is not None and not isinstance(epoch_steps, int):
        starts = jnp.asarray(np.cumsum(epoch_steps)[:-1], jnp.int32)  # first step of epochs 2, 3, ...
        main = lambda s: optim.lr * optim.decay_per_epoch ** jnp.sum(s + warmup >= starts)  # noqa: E731
    elif optim.schedule == "step_decay":
        every = max(1, epoch_steps or total_steps)
        main = lambda s: optim.lr * optim.decay_per_epoch ** ((s + warmup) // every)  # noqa: E731
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, max(1, total_steps - warmup), alpha=optim.min_lr_ratio)
    elif optim.schedule == "linear":
        main = optax.linear_schedule(optim.lr, end, max(1, total_steps - warmup))
    elif optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    else:
        raise ValueError(f"optim.schedule {optim.schedule!r} is not a schedule (`OptimSection.schedule` lists them)")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), main], [warmup])


# ----------------------------------------------------------------------------- optimizer


def trainable_labels(params: Mapping, frozen: tuple[str, ...]) -> Any:
    """'frozen' for every leaf under a top-level key in `frozen` (e.g. 'visual'), else 'train'."""
    return {k: jax.tree_util.tree_map(lambda _: "frozen" if k in frozen else "train", v) for k, v in params.items()}


def make_optimizer(
    optim: OptimSection, total_steps: int, epoch_steps: EpochSteps = None, frozen: tuple[str, ...] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping + AdamW (decoupled decay, as `torch.optim.AdamW`), frozen subtrees zeroed."""
    schedule = make_schedule(optim, total_steps, epoch_steps)
    parts = [optax.clip_by_global_norm(optim.clip)] if optim.clip > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    tx = optax.chain(*parts)
    if frozen:
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()}, lambda p: trainable_labels(p, frozen))
    return tx, schedule


# ----------------------------------------------------------------------------- creation and sharding


def state_shardings(tx: optax.GradientTransformation, boxed_params, mesh: Mesh, rules=None) -> TrainState:
    """NamedSharding tree of the TrainState: optimizer moments take their param's sharding.

    An optimizer-state leaf belongs to the param whose path is the tail of its own dict-key path (AdamW's
    `mu['model']['layers']...`, also inside multi-transform states); anything else (counts) is replicated.
    """
    p_shard = parallel.param_shardings(boxed_params, mesh, rules)
    replicated = NamedSharding(mesh, P())
    by_path = {_dict_keys(path): sh for path, sh in jax.tree_util.tree_leaves_with_path(p_shard)}
    depth = max(map(len, by_path))

    def one(path, leaf):
        keys = _dict_keys(path)
        for n in range(min(depth, len(keys)), 0, -1):
            if keys[-n:] in by_path:
                return by_path[keys[-n:]]
        return replicated

    abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed_params))
    opt_shard = jax.tree_util.tree_map_with_path(one, abstract_opt)
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def apply_update(tx: optax.GradientTransformation, grads, params, opt_state, ok: jax.Array):
    """(params, opt_state) after one optimizer update, or both unchanged when `ok` is False (a non-finite
    loss or gradient). A `lax.cond`, not a select: the select would read and write params and both Adam
    moments once more every step (on CPU within the noise of a small model's step; on accelerators a pass
    over three times the params)."""

    def update(args):
        grads, params, opt_state = args
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.cond(ok, update, lambda args: (args[1], args[2]), (grads, params, opt_state))


def schedule_count(opt_state) -> jax.Array:
    """The optimizer's own step count (what the schedule sees; it does not advance on skipped steps)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else jnp.zeros((), jnp.int32)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def _build(init_params_fn, tx: optax.GradientTransformation, seed: int) -> TrainState:
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    params = nn.unbox(init_params_fn(init_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=key)


def init_state(
    init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, seed: int,
    shardings: TrainState,
) -> TrainState:
    """A fresh state built directly on the mesh (no full copy on one device first).

    `init_params_fn(rng)` returns params (boxed or not); the key left after the param draw is kept.
    """
    return jax.jit(lambda: _build(init_params_fn, tx, seed), out_shardings=shardings)()


def state_from_params(params, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """A state around given (e.g. loaded) params, placed on the mesh; the optimizer state is created there.

    Device arrays already in place become the state's own buffers (the train step donates them): pass host
    arrays to keep a separate copy.
    """
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step, rng = jax.device_put((jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)), (shardings.step, shardings.rng))
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def abstract_state(init_params_fn, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint on this mesh."""
    shapes = jax.eval_shape(lambda: _build(init_params_fn, tx, 0))
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
