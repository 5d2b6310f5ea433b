"""`xr-jax plan`: per-device memory and FLOPs of a run on N devices, before renting them.

The SFT train step is built exactly as `xr-jax sft` builds it (same optimizer, state shardings and
jitted step) but on abstract arrays — `jax.ShapeDtypeStruct`s carrying shardings, so no weight is ever
allocated — then lowered and compiled for a mesh of N devices. The compiled program's own
`memory_analysis()` gives the per-device argument, output, aliased and temporary bytes.

The N devices are simulated: the compile runs in a worker subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, so every figure is XLA:CPU's compile of the
sharded program (jax 0.10 has no GPU topology for compiling without the GPUs; TPU topologies need
libtpu). docs/plan.md says where XLA:CPU differs from a GPU (attention, bf16, scheduling).

A search then tries remat policies x mesh shapes x microbatch counts, cheapest first, and reports the
first layout that fits. For a GRPO-stage plan the sampler's KV cache is added (analytic: its size is
exact arithmetic on the model config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from xr_jax.errors import UserError

GIB = 2**30

# Memory per device (what the runtime reports as total) and the `device_kind` the runtime names it by: its
# dense bf16 peak FLOP/s is `flops.datasheet_peak` of that.
DEVICE_KINDS: dict[str, tuple[int, str]] = {
    "a100-40gb": (40 * GIB, "NVIDIA A100-SXM4-40GB"),
    "a100-80gb": (80 * GIB, "NVIDIA A100-SXM4-80GB"),
    "h100-80gb": (80 * GIB, "NVIDIA H100 80GB HBM3"),
    "h200-141gb": (141 * 10**9, "NVIDIA H200"),
    "b200-180gb": (180 * 10**9, "NVIDIA B200"),
    "l4-24gb": (24 * 10**9, "NVIDIA L4"),
    "tpu-v4": (32 * GIB, "TPU v4"),
    "tpu-v5e": (16 * GIB, "TPU v5 lite"),
    "tpu-v5p": (95 * GIB, "TPU v5"),
    "tpu-v6e": (32 * GIB, "TPU v6 lite"),
}
REMATS = ("none", "dots", "full")  # cheapest first: recompute costs time
_WORKER_TAG = "XRPLAN "


class PlanError(UserError, ValueError):
    """A plan request that cannot be answered (bad memory size, unknown device kind, no devices)."""


def parse_bytes(text: str) -> int:
    """'40GB' (10^9), '40GiB' (2^30), '512MiB', '4e10' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise PlanError(f"device memory {text!r} is not a size like 40GB, 40GiB or 4.3e10")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def fmt_bytes(n: float, unit: int = GIB) -> str:
    return f"{n / unit:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- layouts and results


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run the step: mesh (data, fsdp, tensor), remat policy, microbatches per step."""

    mesh: tuple[int, int, int]
    remat: str
    microbatches: int

    def overrides(self, stage: str = "sft") -> str:
        section = "grpo" if stage == "grpo" else "train"
        return (f"mesh.shape=[{','.join(map(str, self.mesh))}] model.remat={self.remat} "
                f"{section}.microbatches={self.microbatches}")


@dataclasses.dataclass
class Measurement:
    """Per-device bytes of one layout. params/opt_state/batch: exact, from the shardings. grads: analytic
    (trainable params in their dtype, sharded like them; they live inside `temp`). argument/output/alias/
    temp: XLA's `memory_analysis()` of the compiled step (None when not compiled)."""

    layout: Layout
    params: int = 0
    opt_state: int = 0
    grads: int = 0
    batch: int = 0
    argument: Optional[int] = None
    output: Optional[int] = None
    alias: Optional[int] = None
    temp: Optional[int] = None
    xla_flops: Optional[float] = None
    compile_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def static(self) -> int:
        """Bytes the step's inputs hold whatever the activations: a lower bound of the peak."""
        return self.params + self.opt_state + self.batch

    @property
    def peak(self) -> Optional[int]:
        """Live bytes at the step's peak: inputs + outputs not aliased to (donated) inputs + temporaries."""
        if self.temp is None:
            return None
        return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one device may hold (`usable` bytes), and what it holds beside the train step: with
    `reference`, GRPO's frozen reference params, sharded like the params."""

    usable: int
    reference: bool = False

    def held(self, m: Measurement) -> Optional[int]:
        return None if m.peak is None else m.peak + (m.params if self.reference else 0)

    def fits(self, m: Measurement) -> bool:
        held = self.held(m)
        return held is not None and held <= self.usable

    def possible(self, m: Measurement) -> bool:
        """Could fit: the inputs alone (known without compiling) are within the budget."""
        return m.error is None and m.static + (m.params if self.reference else 0) <= self.usable


@dataclasses.dataclass
class KVCache:
    """The GRPO sampler's KV cache: `rows` = prompts x samples, each `length` = prompt + response slots."""

    rows: int
    length: int
    bytes_per_token: int  # layers x 2 (k, v) x kv_heads x head_dim x dtype bytes
    shards: int  # batch shards (data x fsdp) x kv-head shards (tensor, when it divides kv_heads)
    sampling_params: int  # per device: the sampler's copy of all params in the sampling dtype, replicated

    @property
    def total(self) -> int:
        return self.rows * self.length * self.bytes_per_token

    @property
    def per_device(self) -> int:
        return self.total // self.shards


@dataclasses.dataclass
class RolloutMemory:
    """Per-device bytes of a rollout as the sampler lays it out: its copy of the params (all of them, vision
    tower included: `qwen2.decode_weights` casts every leaf) in the sampling dtype, replicated on every
    device, made once per rollout; rows split over the `data` devices, each with per-layer [K, S, H] k and v
    buffers in the compute dtype holding prompt + max new tokens; `logits` is one decode step's [rows, vocab]
    in the compute dtype plus its fp32 copy."""

    rows: int
    length: int
    data: int
    dtype: str  # sampling dtype of the weights
    params: int  # per device
    kv_cache: int  # per device
    logits: int  # per device
    held: int = 0  # per device, kept beside the rollout: train state + reference params (training layout)

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.logits

    @property
    def rows_per_device(self) -> int:
        return -(-self.rows // self.data)


@dataclasses.dataclass
class Plan:
    stage: str
    devices: int
    device_memory: int
    budget: Budget
    model: str
    params_total: int
    params_trainable: int
    batch_size: int
    seq_len: int
    model_flops: float  # per step, all devices (train/flops.py)
    peak_flops: Optional[float]
    requested: Measurement
    tried: list[Measurement]
    best: Optional[Measurement]
    kv_cache: Optional[KVCache] = None
    total_steps: Optional[int] = None
    rollout: Optional[RolloutMemory] = None

    @property
    def usable(self) -> int:
        return self.budget.usable

    def fits(self, m: Measurement) -> bool:
        return self.budget.fits(m)


# ----------------------------------------------------------------------------- the worker (N devices)


def model_config(config, remat: Optional[str] = None):
    """The run's ModelConfig without loading weights: from `model.path` (HF config.json or an xr_jax
    checkpoint's model_config.json) or the preset (with `model.vocab_size` when set)."""
    import dataclasses as dc

    from xr_jax.checkpoints import convert
    from xr_jax.models import hf, presets
    from xr_jax.models.config import config_from_dict

    m = config.model
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                   remat=remat or m.remat, attention=m.attention)
    if m.path is not None:
        if not os.path.isdir(m.path):
            raise FileNotFoundError(f"model.path {m.path!r}: no such directory (unset it to plan with model.preset)")
        if convert.is_model_checkpoint(m.path):
            with open(os.path.join(m.path, convert.CONFIG_FILE)) as f:
                return config_from_dict(json.load(f)).replace(**runtime)
        return hf.read_config(m.path, **runtime)
    cfg = presets.preset(m.preset, **runtime)
    if m.vocab_size is not None:
        cfg = cfg.replace(text=dc.replace(cfg.text, vocab_size=m.vocab_size))
    return cfg


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one optimizer step of the stage processes: `rows` x `seq_len` tokens."""

    rows: int
    seq_len: int


def step_shape(config, stage: str) -> StepShape:
    """SFT: train.batch_size rows of train.seq_len. GRPO: one minibatch of rollout rows (prompts x
    group_size / minibatches), each max_prompt_len + max_new_tokens long."""
    if stage == "grpo":
        g = config.grpo
        return StepShape(config.train.batch_size * g.group_size // g.minibatches, g.max_prompt_len + g.max_new_tokens)
    return StepShape(config.train.batch_size, config.train.seq_len)


def _abstract(shapes: dict, shardings: dict) -> dict:
    import jax
    import jax.numpy as jnp

    return {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k in ("input_ids", "positions", "segment_ids", "targets")
                                    else jnp.float32, sharding=shardings[k]) for k, shape in shapes.items()}


def measure(config, layout: Layout, stage: str = "sft", compile: bool = True) -> Measurement:
    """Build the stage's jitted step (SFT train step, or GRPO update step) for `layout` on this process's
    devices, on abstract state and rows; compile it when `compile`."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xr_jax import parallel
    from xr_jax.train import grpo, setup, sft

    out = Measurement(layout)
    shape = step_shape(config, stage)
    try:
        cfg = model_config(config, layout.remat)
        mesh = parallel.make_mesh(layout.mesh)
        parallel.check_model_fits_mesh(cfg, mesh)
        if stage == "grpo":
            g = dataclasses.replace(config.grpo, microbatches=layout.microbatches)
            grpo.check_layout(dataclasses.replace(config, grpo=g), mesh)
        else:
            sft.check_batch_layout(shape.rows, layout.microbatches, mesh)
    except (parallel.MeshError, ValueError) as e:
        out.error = str(e)
        return out
    tr = config.train
    # The optimizer state's shapes do not depend on the schedule: counted epochs (total_steps None) need no data.
    st = setup.state_setup(config.optim, cfg, mesh, config.total_steps or 1, None, setup.frozen_subtrees(tr, cfg))
    tx, schedule, shardings, frozen = st.tx, st.schedule, st.shardings, st.frozen
    state = st.abstract()
    n, t = shape.rows, shape.seq_len
    if stage == "grpo":
        g = config.grpo
        r = g.max_new_tokens
        shapes = {"input_ids": (n, t), "segment_ids": (n, t), "positions": (n, 3, t), "targets": (n, r),
                  "loss_mask": (n, r), "old_logp": (n, r), "ref_logp": (n, r), "adv": (n,), "num_seqs": (n,)}
        specs = grpo.row_shardings(mesh)
        step_fn = grpo.make_update_step(cfg, tx, schedule, grpo.loss_config(g), temperature=g.temperature,
                                        prompt_len=g.max_prompt_len, microbatches=layout.microbatches,
                                        chunk=tr.loss_chunk, frozen=frozen, mesh=mesh)
    else:  # text rows, as `sft.jit_train_step` places them
        shapes = {k: (n, t) for k in sft.BATCH_KEYS}
        specs = {k: parallel.batch_sharding(mesh) for k in sft.BATCH_KEYS}
        step_fn = sft.make_train_step(cfg, tx, schedule, microbatches=layout.microbatches, z_loss=tr.z_loss,
                                      chunk=tr.loss_chunk, frozen=frozen, mesh=mesh, shardings=shardings)
    batch = _abstract(shapes, specs)
    # the trainers' jit: state donated, rows sharded, metrics replicated
    step = jax.jit(step_fn, in_shardings=(shardings, specs), out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=0)
    out.params, out.opt_state = _shard_bytes(state.params), _shard_bytes(state.opt_state)
    out.grads = _shard_bytes({k: v for k, v in state.params.items() if k not in frozen})
    out.batch = _shard_bytes(batch)
    if not compile:
        return out
    t0 = time.perf_counter()
    with parallel.use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    out.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.argument, out.output = mem.argument_size_in_bytes, mem.output_size_in_bytes
    out.alias, out.temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.xla_flops = float(cost.get("flops", 0.0)) if cost else None
    return out


def _worker_main() -> None:
    """Answer one JSON request per stdin line with one tagged JSON line on stdout."""
    from xr_jax import config as config_lib

    for line in sys.stdin:
        req = json.loads(line)
        try:
            config = config_lib.from_dict(config_lib.Config, req["config"]).validate()
            layout = Layout(tuple(req["layout"]["mesh"]), req["layout"]["remat"], req["layout"]["microbatches"])
            m = measure(config, layout, req["stage"], req["compile"])
        except Exception as e:  # noqa: BLE001 — this layout failed to build: shown in its table row
            m = Measurement(layout, error=f"{type(e).__name__}: {str(e)[:300]}")
        reply = dataclasses.asdict(m)
        print(_WORKER_TAG + json.dumps(reply), flush=True)


class Worker:
    """A subprocess with N simulated CPU devices that measures layouts on request."""

    def __init__(self, devices: int):
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + [p for p in [env.get("PYTHONPATH")] if p])
        self._done: dict[str, Measurement] = {}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "xr_jax.cli.plan", "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=env)

    def measure(self, config_dict: dict, layout: Layout, stage: str = "sft", compile: bool = True) -> Measurement:
        """`measure` in the worker (memoised: a compiled result also answers a later request without compile)."""
        key = json.dumps([config_dict, dataclasses.asdict(layout), stage], sort_keys=True)
        if key in self._done and (self._done[key].temp is not None or not compile):
            return self._done[key]
        req = {"config": config_dict, "layout": dataclasses.asdict(layout), "stage": stage, "compile": compile}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        for line in self._proc.stdout:
            if line.startswith(_WORKER_TAG):
                reply = json.loads(line[len(_WORKER_TAG):])
                reply["layout"] = Layout(tuple(reply["layout"]["mesh"]), reply["layout"]["remat"],
                                         reply["layout"]["microbatches"])
                self._done[key] = Measurement(**reply)
                return self._done[key]
        self._stderr.seek(0)
        raise RuntimeError("plan worker exited:\n" + self._stderr.read()[-3000:])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- the search


def mesh_candidates(devices: int, requested: tuple[int, ...], num_heads: int, intermediate: int) -> list[tuple]:
    """The requested mesh, pure FSDP, then FSDP x tensor 2/4/8 (where tensor divides heads and MLP)."""
    out = [tuple(requested), (1, devices, 1)]
    for t in (2, 4, 8):
        if devices % t == 0 and devices > t and num_heads % t == 0 and intermediate % t == 0:
            out.append((1, devices // t, t))
    return list(dict.fromkeys(out))


def microbatch_options(batch_size: int, mesh: tuple[int, ...]) -> list[int]:
    """Microbatch counts that keep every microbatch split evenly over data x fsdp, fewest first."""
    dp = mesh[0] * mesh[1]
    if batch_size % dp:
        return []
    rows = batch_size // dp
    return [m for m in range(1, rows + 1) if rows % m == 0]


def search(measure_fn, budget: Budget, batch_size: int, meshes: Sequence[tuple], max_compiles: int,
           known: Sequence[Measurement] = ()) -> tuple[Optional[Measurement], list[Measurement]]:
    """First (remat, mesh) in cheapest-first order that fits with one row per device per microbatch, then
    the fewest microbatches that still fit (bisection). Layouts whose inputs alone exceed the budget are
    skipped without compiling; at most `max_compiles` compiles. Returns (best or None, everything measured)."""
    tried: dict[Layout, Measurement] = {m.layout: m for m in known}
    compiles = [0]

    def get(layout: Layout) -> Optional[Measurement]:
        if layout in tried:
            return tried[layout]
        static = measure_fn(layout, compile=False)
        if not budget.possible(static):
            tried[layout] = static
            return static
        if compiles[0] >= max_compiles:
            return None
        compiles[0] += 1
        tried[layout] = measure_fn(layout, compile=True)
        return tried[layout]

    best = None
    for remat in REMATS:
        for mesh in meshes:
            options = microbatch_options(batch_size, mesh)
            if not options:
                continue
            most = get(Layout(mesh, remat, options[-1]))
            if most is None or not budget.fits(most):
                continue
            lo, hi, best = 0, len(options) - 1, most  # options[hi] fits
            while lo < hi:
                mid = (lo + hi) // 2
                m = get(Layout(mesh, remat, options[mid]))
                if m is not None and budget.fits(m):
                    hi, best = mid, m
                else:
                    lo = mid + 1
            return best, list(tried.values())
    return best, list(tried.values())


# ----------------------------------------------------------------------------- the plan


def kv_cache(model_cfg, mesh: tuple[int, ...], rows: int, length: int, sampling_params: int) -> KVCache:
    """The sampler's cache (per layer, k and v [rows, kv_heads, length, head_dim] in the compute dtype,
    `models.qwen2.init_layer_cache`), sharded as `LAYER_CACHE_AXES`: rows over data x fsdp, kv heads over
    tensor."""
    t = model_cfg.text
    per_token = t.num_layers * 2 * t.num_kv_heads * t.head_dim * _itemsize(model_cfg.dtype)
    dp = mesh[0] * mesh[1] if rows % (mesh[0] * mesh[1]) == 0 else 1
    tp = mesh[2] if t.num_kv_heads % mesh[2] == 0 else 1
    return KVCache(rows, length, per_token, dp * tp, sampling_params)


def sampler_params(model_cfg, sampling_dtype: str) -> int:
    """Bytes of the sampler's weights copy on each device: every param in `sampling_dtype`, replicated."""
    from xr_jax.models.qwen2_5_vl import abstract_params

    return sum(math.prod(x.shape) for x in _leaves(abstract_params(model_cfg))) * _itemsize(sampling_dtype)


def rollout_memory(model_cfg, devices: int, rows: int, length: int, sampling_dtype: str) -> RolloutMemory:
    """The sampler's per-device bytes (`RolloutMemory`): the weights copy (`sampler_params`), rows split over
    the devices, each with a `length`-slot cache."""
    t = model_cfg.text
    out = RolloutMemory(rows, length, devices, sampling_dtype, 0, 0, 0)
    per_row = length * t.num_layers * 2 * t.num_kv_heads * t.head_dim * _itemsize(model_cfg.dtype)
    out.params = sampler_params(model_cfg, sampling_dtype)
    out.kv_cache = out.rows_per_device * per_row
    out.logits = out.rows_per_device * t.vocab_size * (_itemsize(model_cfg.dtype) + 4)
    return out


def plan(config, devices: int, device_memory: int, *, stage: str = "sft", usable_fraction: float = 0.9,
         peak_flops: Optional[float] = None, search_layouts: bool = True, max_compiles: int = 12,
         worker: Optional["Worker"] = None) -> Plan:
    """Measure the config's own layout on `devices` simulated devices and search for one that fits.

    stage "sft": the SFT train step. stage "grpo": the GRPO update step on one minibatch of rollout rows,
    with the frozen reference params beside it (`grpo.kl_coef` > 0), and the sampler's KV cache.
    `worker`: a running `Worker(devices)` to reuse (one is started and stopped otherwise).
    GRPO also gets the rollout's memory as the sampler lays it out (`rollout_memory`): its weights copy in the
    sampling dtype (grpo.sampler_dtype, else the compute dtype) on every device, and the per-layer KV buffers.
    """
    from xr_jax import config as config_lib, parallel
    from xr_jax.train import flops

    if devices < 1:
        raise PlanError(f"--devices must be >= 1, got {devices}")
    if stage not in ("sft", "grpo"):
        raise PlanError(f"stage must be sft or grpo, got {stage!r}")
    grpo_cfg = config.grpo if stage == "grpo" else None
    budget = Budget(int(device_memory * usable_fraction), reference=grpo_cfg is not None and grpo_cfg.kl_coef > 0)
    model_cfg = model_config(config)
    requested_mesh = parallel.mesh_shape(config.mesh.shape, devices)
    shape = step_shape(config, stage)
    config_dict = config_lib.to_dict(config)
    microbatches = grpo_cfg.microbatches if grpo_cfg else config.train.microbatches
    requested = Layout(requested_mesh, config.model.remat, microbatches)
    rollout = None if grpo_cfg is None else rollout_memory(
        model_cfg, devices, config.train.batch_size * grpo_cfg.group_size,
        grpo_cfg.max_prompt_len + grpo_cfg.max_new_tokens, grpo_cfg.sampler_dtype or model_cfg.dtype)

    own = worker is None
    worker = Worker(devices) if own else worker
    try:
        def measure_fn(layout, compile=True):
            return worker.measure(config_dict, layout, stage, compile)

        first = measure_fn(requested)
        best, tried = None, [first]
        if search_layouts:
            meshes = mesh_candidates(devices, requested_mesh, model_cfg.text.num_heads,
                                     model_cfg.text.intermediate_size)
            best, tried = search(measure_fn, budget, shape.rows, meshes, max_compiles, [first])
        if best is None and budget.fits(first):
            best = first
    finally:
        if own:
            worker.close()
    kv = None
    of = best or (first if first.error is None else None)
    if grpo_cfg is not None and of is not None:
        kv = kv_cache(model_cfg, of.layout.mesh, rollout.rows, rollout.length, rollout.params)
        rollout.held = of.params + of.opt_state + (of.params if budget.reference else 0)
    n_params, n_train = _param_counts(model_cfg, config.train.freeze_vision)
    return Plan(
        stage=stage, devices=devices, device_memory=device_memory, budget=budget,
        model=config.model.path or config.model.preset, params_total=n_params, params_trainable=n_train,
        batch_size=shape.rows, seq_len=shape.seq_len,
        model_flops=flops.text_train_flops(model_cfg, shape.rows * shape.seq_len, shape.seq_len),
        peak_flops=peak_flops, requested=first, tried=tried, best=best, kv_cache=kv,
        total_steps=config.total_steps if stage == "sft" else None, rollout=rollout if kv else None,
    )


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _param_counts(model_cfg, freeze_vision: bool) -> tuple[int, int]:
    from xr_jax.models.qwen2_5_vl import abstract_params

    params = abstract_params(model_cfg)
    count = lambda tree: sum(math.prod(x.shape) for x in _leaves(tree))  # noqa: E731
    total = count(params)
    frozen = count(params.get("visual", {})) if freeze_vision else 0
    return total, total - frozen


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


# ----------------------------------------------------------------------------- the report


def format_report(p: Plan, title: str = "") -> str:
    """The plan as the text `xr-jax plan` prints: one table row per layout measured, then the verdict."""
    unit, unit_name = (GIB, "GiB") if p.device_memory >= 4 * GIB else (2**20, "MiB")
    b = lambda n: fmt_bytes(n, unit)  # noqa: E731
    out = [f"xr-jax plan{': ' + title if title else ''} (stage {p.stage})",
           f"model     {p.model}: {_count(p.params_total)} params, {_count(p.params_trainable)} trained",
           f"step      {p.batch_size} rows x {p.seq_len} tokens: {p.model_flops:.3g} model FLOPs "
           f"(train/flops.py), {p.model_flops / p.devices:.3g} per device"]
    if p.peak_flops:
        seconds = p.model_flops / (p.devices * p.peak_flops * 0.4)
        total = f" ({seconds * p.total_steps / 3600:.1f} h for {p.total_steps} steps)" if p.total_steps else ""
        out.append(f"          {seconds:.1f} s per step at 40% MFU of {p.peak_flops / 1e12:.0f} TFLOP/s{total}")
    out += [f"devices   {p.devices} x {b(p.device_memory)} {unit_name}, usable {b(p.usable)} {unit_name} each",
            f"memory    per device in {unit_name}: params/opt/batch from the shardings; grads analytic (part of "
            f"temp); args/temp/peak from memory_analysis() of XLA:CPU's compile on {p.devices} simulated "
            "devices (docs/plan.md)",
            f"  {'mesh (d,f,t)':<13} {'remat':<5} {'mb':>4} | {'params':>6} {'opt':>6} {'grads':>6} {'batch':>6} "
            f"| {'args':>6} {'temp':>6} {'peak':>6} | fits | compile"]
    def order(m):
        return m is not p.requested, REMATS.index(m.layout.remat), m.layout.mesh, m.layout.microbatches

    for m in sorted(p.tried, key=order):
        row = f"  {str(m.layout.mesh):<13} {m.layout.remat:<5} {m.layout.microbatches:>4} | "
        if m.error:
            out.append(row + f"invalid: {m.error}")
            continue
        row += f"{b(m.params):>6} {b(m.opt_state):>6} {b(m.grads):>6} {b(m.batch):>6} | "
        if m.peak is None:
            out.append(row + "not compiled: its inputs alone exceed the usable memory")
            continue
        tag = "<- requested" if m is p.requested else ("<- best" if m is p.best else "")
        out.append(row + f"{b(m.argument):>6} {b(m.temp):>6} {b(p.budget.held(m)):>6} | "
                   f"{'yes' if p.fits(m) else 'no ':<4} | {m.compile_s:5.1f} s {tag}".rstrip())
    if p.kv_cache:
        out += _kv_lines(p, b, unit_name)
    if p.rollout:
        out += _rollout_lines(p, b, unit_name)
    out.append(_verdict(p, b, unit_name))
    flops_of = p.best or p.requested
    if flops_of.xla_flops:
        out.append(f"note      XLA cost_analysis: {flops_of.xla_flops:.3g} FLOPs per device; XLA counts a scanned "
                   "loop body (layers, microbatches) once, so the model count above is the one to use")
    return "\n".join(out)


def _kv_lines(p: Plan, b, unit_name: str) -> list[str]:
    kv, m = p.kv_cache, p.best or p.requested
    state, reference = m.params + m.opt_state, m.params if p.budget.reference else 0
    held = state + reference + kv.sampling_params  # besides the cache while sampling
    lines = [f"grpo      KV cache: {kv.rows} rows x {kv.length} slots x {kv.bytes_per_token} B/token = "
             f"{b(kv.total)} {unit_name}, {b(kv.per_device)} per device ({kv.shards} shards, mesh {m.layout.mesh})",
             f"          reference params: {b(reference)} per device (in the peak column above)",
             f"          sampling phase: train state {b(state)} + reference {b(reference)} + "
             f"{b(kv.sampling_params)} sampling params + cache {b(kv.per_device)} = "
             f"{b(held + kv.per_device)} {unit_name} per device, before decode temporaries"]
    if held + kv.per_device > p.usable:
        rows = int((p.usable - held) / (kv.per_device / kv.rows)) if p.usable > held else 0
        lines.append(f"          -> does not fit: room for ~{rows} of the {kv.rows} rows' cache; the trainer samples "
                     "all rows in one call, so use more devices or fewer prompts per step (train.batch_size)")
    return lines


def _rollout_lines(p: Plan, b, unit_name: str) -> list[str]:
    r = p.rollout
    lines = [f"rollout   sampler layout (weights copy replicated, rows split over {r.data}), per device in "
             f"{unit_name}: {r.dtype} params {b(r.params)} + KV cache {b(r.kv_cache)} ({r.rows_per_device} of "
             f"{r.rows} rows x {r.length} slots, all layers) + logits {b(r.logits)} = {b(r.total)}",
             f"          with the train state and reference held in the training layout ({b(r.held)}): "
             f"{b(r.total + r.held)} of {b(p.usable)} {unit_name}, before decode temporaries"]
    if r.total + r.held > p.usable:
        lines.append("          -> does not fit: use more devices or fewer prompts per step")
    return lines


def _verdict(p: Plan, b, unit_name: str) -> str:
    fits = p.requested.error is None and p.fits(p.requested)
    if fits and (p.best is None or p.best is p.requested):
        return f"result    fits as configured: peak {b(p.budget.held(p.requested))} of {b(p.usable)} {unit_name}"
    if p.best is not None:
        if fits:
            lead = "fits as configured; a cheaper layout (less recompute or fewer microbatches) also fits"
        else:
            lead = f"{'is invalid' if p.requested.error else 'does not fit'} as configured; this layout fits"
        return (f"result    {lead} (peak {b(p.budget.held(p.best))} of {b(p.usable)} {unit_name}): "
                f"{p.best.layout.overrides(p.stage)}")
    return ("result    nothing measured fits: add devices, shorten train.seq_len, or raise --max-compiles to "
            "search further")


def to_json(p: Plan) -> dict:
    d = dataclasses.asdict(p)
    d["fits_requested"] = p.fits(p.requested)
    for m, key in ((p.requested, "requested"), (p.best, "best")):
        if m is not None:
            d[key]["peak"] = m.peak
    return d


# ----------------------------------------------------------------------------- command line


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--devices", type=int, required=True, help="number of devices to plan for")
    p.add_argument("--device-kind", choices=sorted(DEVICE_KINDS), help="sets memory and peak FLOP/s")
    p.add_argument("--device-memory", help="memory per device, e.g. 40GB, 40GiB (overrides --device-kind)")
    p.add_argument("--usable-fraction", type=float, default=0.9,
                   help="share of device memory a program may use (default 0.9; on GPUs set "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION to at least this)")
    p.add_argument("--stage", choices=["sft", "grpo"],
                   help="which trainer's step (default: grpo if the config file has a grpo section, else sft); "
                        "GRPO sizes come from the config: train.batch_size prompts x grpo.group_size, "
                        "grpo.max_prompt_len + grpo.max_new_tokens, grpo.minibatches, grpo.kl_coef")
    p.add_argument("--no-search", action="store_true", help="measure the configured layout only")
    p.add_argument("--max-compiles", type=int, default=12, help="compile budget of the search (default 12)")
    p.add_argument("--json", help="also write the plan as JSON to this file")


def _stage_of(path: Optional[str]) -> str:
    """"grpo" when the config file has a top-level grpo section (a GRPO recipe), else "sft"."""
    if path is None:
        return "sft"
    import yaml

    with open(path) as f:
        return "grpo" if "grpo" in (yaml.safe_load(f) or {}) else "sft"


def run(args: argparse.Namespace) -> Plan:
    from xr_jax import config as config_lib

    if args.device_memory is None and args.device_kind is None:
        raise PlanError("give --device-memory (e.g. 40GB) or --device-kind (e.g. a100-40gb)")
    from xr_jax.train.flops import datasheet_peak

    memory, kind = DEVICE_KINDS.get(args.device_kind, (None, None))
    peak = kind and datasheet_peak(kind)
    if args.device_memory is not None:
        memory = parse_bytes(args.device_memory)
    config = config_lib.load(args.config, args.overrides)
    p = plan(config, args.devices, memory, stage=args.stage or _stage_of(args.config),
             usable_fraction=args.usable_fraction, peak_flops=peak, search_layouts=not args.no_search,
             max_compiles=args.max_compiles, rollout_tensor=args.rollout_tensor)
    print(format_report(p, args.config or ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(p), f, indent=1, default=str)
    return p


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        parser = argparse.ArgumentParser(prog="python -m xr_jax.cli.plan")
        add_args(parser)
        run(parser.parse_args())
