"""Device mesh, the one logical-axis rules table, and sharding of params and batches.

Params and activations carry logical axis names; `LOGICAL_RULES` maps them onto the mesh axes
('data', 'fsdp', 'tensor'). Changing the parallel layout means changing this table (or the mesh
shape), never the model. A mesh axis that does not divide a param dimension is dropped for that
param (it is replicated along that axis) rather than failing — e.g. 4 KV heads on tensor=8.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xr_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_vision_mlp", "tensor"),
    # params: FSDP over the model dimension, tensor parallel over heads / mlp / vocab
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_qkv", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_patch", None),
    ("vision_layers", None),
    ("vision_merge", "fsdp"),
    ("vision_merge_mlp", "tensor"),
)


class MeshError(UserError, ValueError):
    pass


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Resolve one `-1` entry so the product equals the device count."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise MeshError(f"mesh shape {tuple(shape)}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise MeshError(f"mesh shape {tuple(shape)} does not divide {n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise MeshError(
            f"mesh shape {tuple(shape)} uses {math.prod(shape)} devices but {n_devices} are present; "
            "use -1 for one axis to fill"
        )
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh. On one process a shape without -1 may use fewer devices than
    are present (the first ones), e.g. [1, 1, 1] for a single-device run."""
    devices = list(jax.devices() if devices is None else devices)
    if -1 not in shape and jax.process_count() == 1 and 0 < math.prod(shape) < len(devices):
        devices = devices[: math.prod(shape)]
    resolved = mesh_shape(shape, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(resolved, devices)
    except Exception:  # simulated CPU devices have no topology
        arr = np.asarray(devices).reshape(resolved)
    return Mesh(arr, MESH_AXES)


def _rules(rules) -> dict[str, Any]:
    return dict(LOGICAL_RULES if rules is None else rules)


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """PartitionSpec for a value with these logical axis names; non-dividing mesh axes are dropped."""
    table = _rules(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in parallel.LOGICAL_RULES")
        target = table[name]
        axes = [target] if isinstance(target, str) else list(target or [])
        axes = [a for a in axes if a not in used and mesh.shape[a] > 1]
        keep = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in keep) * mesh.shape[a]) == 0:
                keep.append(a)
        used.update(keep)
        spec.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return P(*spec)


def param_shardings(boxed_params, mesh: Mesh, rules=None):
    """NamedSharding tree for a (possibly abstract) boxed param tree from `init_params`."""

    def one(x):
        if isinstance(x, nn.Partitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shard_params(boxed_params, mesh: Mesh, rules=None):
    """Unbox and place params on the mesh by their logical axes."""
    shardings = param_shardings(boxed_params, mesh, rules)
    return jax.device_put(nn.unbox(boxed_params), shardings)


def path_shardings(cfg, mesh: Mesh, rules=None):
    """`fn(param_path, shape) -> NamedSharding` for `hf.load_hf(..., shardings=...)`."""
    from xr_jax.models.qwen2_5_vl import init_params

    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    flat = {}

    def visit(tree, prefix=()):
        for k, v in tree.items():
            if isinstance(v, Mapping):
                visit(v, prefix + (k,))
            else:
                flat[prefix + (k,)] = v

    visit(boxed)

    def fn(path, shape):
        x = flat[tuple(path)]
        names = x.names if isinstance(x, nn.Partitioned) else (None,) * len(shape)
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

    return fn


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows (axis 0) over ('data', 'fsdp'), the other `ndim - 1` axes whole."""
    return NamedSharding(mesh, P(("data", "fsdp"), *[None] * (ndim - 1)))


def axis_rules(rules=None):
    """Context manager activating the rules for `nn.with_logical_constraint` inside jitted code."""
    return nn.logical_axis_rules(tuple(_rules(rules).items()))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=None):
    """Activate the mesh and the logical rules for tracing/running sharded code."""
    with jax.set_mesh(mesh), axis_rules(rules):
        yield


def check_model_fits_mesh(cfg, mesh: Mesh) -> None:
    """Fail at start, naming both numbers and a fix, when tensor parallelism cannot split the model.

    Query heads and the MLP width must divide over `tensor` (KV heads may not: they are replicated,
    as with 4 KV heads on tensor=8).
    """
    tp = mesh.shape["tensor"]
    if tp == 1:
        return
    t = cfg.text
    for name, value in (("text.num_heads", t.num_heads), ("text.intermediate_size", t.intermediate_size)):
        if value % tp:
            divisors = [d for d in range(1, tp + 1) if value % d == 0]
            raise MeshError(
                f"{name} {value} is not divisible by the mesh's tensor axis {tp}; set mesh.shape so that "
                f"tensor is one of {divisors} (and move the rest to data or fsdp)")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Assemble global arrays, rows sharded over ('data', 'fsdp'), from this process's rows.

    Each process passes only its own rows (`B / process_count`); on one process this is a device_put.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def process_rows(mesh: Mesh, n_local: int) -> tuple[int, int]:
    """(first global row, global rows) of the batch whose rows this process feeds `n_local` of, as
    `global_batch` lays them out (rows over ('data', 'fsdp'); a process holds a contiguous block)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    shards = sorted({idx[0].start or 0 for idx in batch_sharding(mesh, 1).addressable_devices_indices_map((dp,)).values()})
    if shards != list(range(shards[0], shards[0] + len(shards))):
        raise MeshError(f"process {jax.process_index()}'s devices hold batch shards {shards}, not a contiguous "
                        "block; build the mesh with parallel.make_mesh (devices in process order)")
    if n_local % len(shards):
        raise MeshError(f"{n_local} rows on this process do not split over its {len(shards)} batch shards")
    per_shard = n_local // len(shards)
    return shards[0] * per_shard, dp * per_shard


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows (axis 0, in order) of a batch-sharded array: the inverse of `global_batch`."""
    if x.is_fully_addressable:
        return np.asarray(x)
    pieces = {}
    for shard in x.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])


def all_rows(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Every process's rows (axis 0) of each batch array in global row order, on every process (this
    process's are `local`; all arrays have the same number of rows)."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in local.items()}
    n_local = len(next(iter(local.values())))
    starts = each_process(np.int64(process_rows(mesh, n_local)[0]))
    order = sorted({int(s): i for i, s in reversed(list(enumerate(starts)))}.items())  # shared rows: once
    out = {}
    for key, value in local.items():
        pieces = each_process(value)
        out[key] = np.concatenate([pieces[i] for _, i in order])
    return out


def each_process(value: np.ndarray) -> np.ndarray:
    """[process_count, *value.shape]: every process's `value`, on every process (e.g. per-process counters)."""
    if jax.process_count() == 1:
        return np.asarray(value)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def sync_processes(name: str) -> None:
    """A barrier across processes (a no-op with one): e.g. no process renames files another still writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def put_global(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the whole value, present on every process (each process places its shards)."""
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def host_array(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(mode: str = "auto", coordinator: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
    """Call `jax.distributed.initialize` for multi-host runs; returns whether it was called.

    "auto" initialises when a coordinator is given or a multi-task SLURM job / multi-host TPU slice is
    detected (JAX then finds the coordinator itself); "always" and "never" force the choice.
    """
    import os

    if mode == "never":
        return False
    detected = (
        coordinator is not None
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if mode == "auto" and not detected:
        return False
    # CPU processes all-reduce through gloo (jax 0.10's default, set here so other versions agree); the
    # flag only concerns the CPU backend, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
