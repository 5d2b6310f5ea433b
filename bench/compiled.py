"""Checker of compiled programs: what the rollout decode and the SFT step cost, read from XLA's compile of
them on abstract inputs (nothing allocated, no accelerator needed).

    python -m bench.compiled --preset qwen2.5-0.5b --batch 64 --prompt 128 --new 256
    python -m bench.compiled --preset tiny --batch 8 --prompt 16 --new 12 --mesh 1x4x1 --json out.json
    python -m bench.compiled --tpu v5e:2x2 --dtype bfloat16 --mesh 1x4x1 --layers 2   # libtpu, deviceless

Decode (`check_decode`):
  bytes     XLA's `cost_analysis()` bytes accessed by ONE decode step (one token for every row over the full
            per-layer KV buffers, donated; layers unrolled as the sampler runs them) against the ideal: every
            matmul weight once in the sampling dtype + the full KV cache (rows x (prompt + new) slots) once.
            Corrected for gathers: XLA:CPU's cost model charges a gather fusion's whole table operand (the
            embedding lookup of B token ids counts the [vocab, D] table) though it reads only the gathered
            rows, so each such gather is charged output + index bytes instead, read from the optimised HLO
            (`gather_overcount`; raw and corrected are both reported; TPU compiles are not corrected). The
            headline is the model step (what the ideal covers); the step with the token choice (`choose`) is
            reported beside it (on XLA:CPU, jax lowers threefry as a rolled loop of 5 rounds over the
            [rows, vocab] bits, ~0.8 GB at B=64; GPU and TPU lowerings unroll and fuse it).
  loop      the decode token loop compiled for `--mesh` (XLA:CPU with simulated devices): the token loop is
            the innermost `while` holding one token's matmuls (the chunk's loop of known trip count inside
            the loop that tests "all rows done" once per chunk); inside it, per token (nested loops counted
            with their known trip counts): collectives, and layer-sized data-movement ops (copy, transpose,
            dynamic-slice, convert, ... fusions whose output is at least half of one layer's smallest weight
            or K cache on a device); outside it, per chunk: collectives, the stop test's all-reduce of a
            pred[] reported apart (a scalar, not a weight collective); whether the loop has a known trip
            count (XLA:GPU synchronises with the host on every iteration of a loop without one).
SFT attention (`check_sft_attention`): does the SFT step lowered for CUDA (sm_90 and sm_80) give attention a
bias / dbias operand; needs `bench.attention_lowering` and jax-cuda12-plugin, reported as skipped otherwise.

Only `decode_programs` knows the sampler's API (it builds the two programs); everything else reads HLO text
and cost figures, so it holds for any decode implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from typing import Optional

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "ragged-all-to-all", "collective-broadcast")
MOVEMENT = ("copy", "transpose", "dynamic-slice", "slice", "convert", "gather", "concatenate", "pad", "bitcast-convert")
COMPUTE = ("dot", "convolution", "reduce", "custom-call", "scatter", "sort", "reduce-window")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


# ----------------------------------------------------------------------------- the decode programs (sampler API)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """A rollout: `rows` = prompts x group sampled rows, prompt slots + `new` generated tokens each."""

    preset: str
    rows: int
    prompt: int
    new: int
    group: int = 1
    dtype: str = "float32"  # compute and KV-cache dtype
    sampling_dtype: Optional[str] = None  # the weights' dtype in decode (None: dtype)
    mesh: tuple[int, int, int] = (1, 1, 1)
    layers: Optional[int] = None  # the preset's decoder layers unless set (a faster compile)

    @property
    def weights_dtype(self) -> str:
        return self.sampling_dtype or self.dtype


def decode_programs(cfg, shape: DecodeShape, mesh=None):
    """(step, model_step, loop): three (jitted function's `lower`, abstract args, kwargs) built on the sampler's
    API.

    step: one decode step of every row as the token loop's body runs it (`sampler.model_step` over the
      decode weights and full-length per-layer KV buffers, donated, then `sampler.choose`).
    model_step: the same without the token choice (what the model alone reads).
    loop: `decode_jit` itself (prompt cache grown to full length + the chunked token loop), with the weights
      as `Sampler.weights` lays them out on `mesh` (replicated) and the rows data-parallel.
    The one place to adapt when the sampler's decode changes.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xr_jax import parallel
    from xr_jax.models.layers import as_dtype
    from xr_jax.models.qwen2 import LAYER_CACHE_AXES, decode_weights, init_layer_cache
    from xr_jax.models.qwen2_5_vl import abstract_params
    from xr_jax.sampling import sampler as S

    prompts = shape.rows // shape.group
    scfg = S.SamplingConfig(temperature=1.0, max_new_tokens=shape.new, pad_id=0, stop_ids=(1,),
                            prompt_buckets=(shape.prompt,), weight_dtype=shape.sampling_dtype)
    smp = S.Sampler(cfg, scfg)
    program, knobs = smp.program(shape.group), smp.knobs()

    def put(sds, sharding):
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)

    local = jax.eval_shape(lambda p: decode_weights(p, as_dtype(shape.weights_dtype)), abstract_params(cfg))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), shape.rows))
    weights = local
    if mesh is not None:  # Sampler(mesh=...).weights: replicated on every device
        weights = jax.tree_util.tree_map(lambda s: put(s, NamedSharding(mesh, P())), local)
        kv_spec = lambda s: NamedSharding(mesh, parallel.logical_to_spec(LAYER_CACHE_AXES, s.shape, mesh))  # noqa: E731
        rows = lambda s: put(s, parallel.batch_sharding(mesh, len(s.shape)))  # noqa: E731
    else:
        kv_spec, rows = (lambda s: None), (lambda s: s)
    prompt_cache = {"kv": jax.tree_util.tree_map(lambda s: put(s, kv_spec(s)), jax.eval_shape(
                        lambda: init_layer_cache(cfg, prompts, shape.prompt))),
                    "start": rows(jax.ShapeDtypeStruct((prompts,), jnp.int32))}
    logits = rows(jax.ShapeDtypeStruct((prompts, cfg.text.vocab_size), cfg.dtype))
    next_position = rows(jax.ShapeDtypeStruct((prompts,), jnp.int32))
    loop = (S.decode_jit.lower,
            (weights, prompt_cache, logits, next_position, rows(keys), knobs), {"program": program})

    n, i32 = shape.rows, jax.ShapeDtypeStruct((), np.int32)
    vec = jax.ShapeDtypeStruct((n,), jnp.int32)

    def model_step(weights, kv, last, t, next_position, start):
        return S.model_step(weights, kv, last, t, next_position, start, shape.prompt, model=cfg)

    def step(weights, kv, state, t, next_position, start, row_keys, knobs):
        step_logits, kv = model_step(weights, kv, state.last, t, next_position, start)
        return kv, S.choose(t, step_logits, state, knobs, row_keys, program)

    full_kv = jax.eval_shape(lambda: init_layer_cache(cfg, n, shape.prompt + shape.new - 1))
    state = jax.eval_shape(lambda: S.DecodeState.empty(n, shape.new, 0))
    return ((jax.jit(step, donate_argnums=1).lower, (local, full_kv, state, i32, vec, vec, keys, knobs), {}),
            (jax.jit(model_step, donate_argnums=1).lower, (local, full_kv, vec, i32, vec, vec), {}), loop)


# ----------------------------------------------------------------------------- HLO text


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    rest: str  # operands and attributes
    root: bool = False

    @property
    def bytes(self) -> int:
        return sum(_DTYPE_BYTES.get(dt, 0) * math.prod(int(d) for d in dims.split(",") if d)
                   for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", self.type))

    @property
    def called(self) -> list[str]:
        """Computations this instruction runs (fusion bodies, loop body/condition, branches, reducers)."""
        names = re.findall(r"\b(?:calls|body|condition|to_apply)=%?([\w.\-]+)", self.rest)
        for group in re.findall(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}", self.rest):
            names += [g.strip().lstrip("%") for g in group.split(",") if g.strip()]
        return names

    @property
    def trip_count(self) -> Optional[int]:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.rest)
        return int(m.group(1)) if m else None


_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Optimised HLO module text -> ({computation: instructions}, entry computation name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEAD.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        rest = m.group(3)
        if rest.startswith("("):  # tuple type: up to the matching parenthesis
            depth = 0
            for i, c in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(c, 0)
                if depth == 0:
                    break
            type_, tail = rest[:i + 1], rest[i + 1:].strip()
        else:
            type_, _, tail = rest.partition(" ")
        opcode, _, args = tail.partition("(")
        comps[current].append(Instr(m.group(2), type_, opcode.strip(), args, bool(m.group(1))))
    return comps, entry


def _closure(comps, names) -> set[str]:
    """Every computation reachable from `names` (fusion bodies, loops, branches, reducers)."""
    seen, todo = set(), list(names)
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        todo += [n for ins in comps[c] for n in ins.called]
    return seen


def _is_matmul(ins: Instr) -> bool:
    return ins.opcode in ("dot", "convolution") or (
        ins.opcode == "custom-call" and re.search(r"gemm|matmul|onednn|cublas", ins.rest, re.I) is not None)


def condition_bound(comps, loop: Instr) -> Optional[int]:
    """N when the loop's condition is `counter < constant N` (TPU compiles carry no known_trip_count in their
    backend config; this reads the bound from the condition instead), else None."""
    cond = re.search(r"\bcondition=%?([\w.\-]+)", loop.rest)
    body = comps.get(cond.group(1), []) if cond else []
    root = next((i for i in body if i.root), None)
    if root is None or root.opcode not in ("compare", "fusion"):
        return None
    compare = root if root.opcode == "compare" else next(
        (i for c in root.called for i in comps.get(c, []) if i.root and i.opcode == "compare"), None)
    if compare is None or "direction=LT" not in compare.rest:
        return None
    operands = set(re.findall(r"%([\w.\-]+)", root.rest.split(")")[0]))
    constant = next((i for i in body if i.name in operands and i.opcode == "constant"), None)
    return int(constant.rest.split(")")[0]) if constant and constant.rest.split(")")[0].lstrip("-").isdigit() else None


def _matmuls(comps, names) -> int:
    return sum(_is_matmul(i) for c in _closure(comps, names) for i in comps[c])


def token_loop(comps, entry) -> Optional[Instr]:
    """The token loop: of the innermost `while`s holding matmuls (none nested inside with matmuls of its own),
    the one with the most matmuls, the most deeply nested on a tie (a chunk's loop of known trip count inside
    the stop-test loop, rather than the remainder loop after it): one iteration = one token."""
    best = None
    for c in _closure(comps, [entry]):
        for ins in comps[c]:
            if ins.opcode != "while" or not (mm := _matmuls(comps, ins.called)):
                continue
            inner = [i for b in _closure(comps, ins.called) for i in comps[b] if i.opcode == "while"]
            if any(_matmuls(comps, i.called) for i in inner):
                continue
            rank = (mm, len(_enclosing_whiles(comps, entry, ins)))
            if best is None or rank > best[0]:
                best = (rank, ins)
    return best and best[1]


def _enclosing_whiles(comps, entry, target: Instr) -> list[Instr]:
    """The whiles around `target`, outermost first."""
    def walk(comp, path):
        for ins in comps.get(comp, []):
            if ins is target:
                return path
            for c in ins.called:
                found = walk(c, path + [ins] if ins.opcode == "while" else path)
                if found is not None:
                    return found
        return None

    return walk(entry, []) or []


def _per_token(comps, loop: Instr, skip: Optional[Instr] = None) -> dict[str, int]:
    """Executions per iteration of `loop` of every control-flow computation inside it (nested loops multiply
    by their known trip counts; fusion bodies and the loop `skip` are not entered)."""
    mult: dict[str, int] = {}

    def visit(comp, m):
        mult[comp] = mult.get(comp, 0) + m
        for ins in comps.get(comp, []):
            if ins.opcode == "fusion" or ins is skip:
                continue
            k = m * (ins.trip_count or condition_bound(comps, ins) or 1) if ins.opcode == "while" else m
            for c in ins.called:
                visit(c, k)

    for c in loop.called:
        visit(c, 1)
    return mult


def _collectives(comps, mult: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(collectives moving arrays, scalar collectives such as the all-reduce of a stop test's pred[]), each
    {op: executions} over the computations of `mult`."""
    arrays: dict[str, int] = {}
    scalars: dict[str, int] = {}
    for comp, m in mult.items():
        for ins in comps[comp]:
            base = ins.opcode.removesuffix("-start")
            ops = [base] if base in COLLECTIVES and not ins.opcode.endswith("-done") else []
            if ins.opcode == "async-start":
                ops = sorted(_fused_ops(comps, ins) & set(COLLECTIVES))
            scalar = re.fullmatch(r"\(?[a-z]+\d*\[\](\{[^}]*\})?\)?", ins.type) is not None
            for op in ops:
                (scalars if scalar else arrays)[op] = (scalars if scalar else arrays).get(op, 0) + m
    return dict(sorted(arrays.items())), dict(sorted(scalars.items()))


def _fused_ops(comps, ins: Instr) -> set[str]:
    return {i.opcode for c in _closure(comps, ins.called) for i in comps[c]}


def _movement(comps, ins: Instr) -> Optional[str]:
    """'transpose', 'dynamic-slice+convert', ...: the data movement an instruction does, None for compute, an
    in-place cache write (dynamic-update-slice) or control flow."""
    if ins.opcode in MOVEMENT:
        return ins.opcode
    if ins.opcode != "fusion":
        return None
    ops = _fused_ops(comps, ins)
    root = next((i.opcode for c in ins.called for i in comps.get(c, []) if i.root), "")
    if ops & set(COMPUTE) or root == "dynamic-update-slice":
        return None
    kinds = [k for k in MOVEMENT if k in ops]
    return "+".join(kinds) or None


def loop_report(hlo_text: str, layer_bytes: int) -> dict:
    """Collectives and data-movement ops of at least `layer_bytes` per token inside the token loop, and the
    trip counts of the token loop and the loops around it."""
    comps, entry = parse_hlo(hlo_text)
    loop = token_loop(comps, entry)
    if loop is None:
        return {"error": "no while loop holds all the matmuls: is this a decode loop program?"}
    mult = _per_token(comps, loop)
    collectives, scalar = _collectives(comps, mult)
    collectives.update({f"{k} (scalar)": v for k, v in scalar.items()})
    moves: dict[tuple[str, str], int] = {}
    for comp, m in mult.items():
        for ins in comps[comp]:
            kind = _movement(comps, ins)
            if kind and ins.bytes >= layer_bytes:
                key = (kind, re.sub(r"\{[^}]*\}", "", ins.type))  # without layouts
                moves[key] = moves.get(key, 0) + m
    enclosing = _enclosing_whiles(comps, entry, loop)
    chunk_arrays, chunk_scalars = _collectives(comps, _per_token(comps, enclosing[-1], skip=loop)) if enclosing \
        else ({}, {})
    nested = [i.trip_count or condition_bound(comps, i) for c in mult for i in comps[c] if i.opcode == "while"]
    return {
        "known_trip_count": loop.trip_count,
        "condition_bound": condition_bound(comps, loop),
        "enclosing_trip_counts": [w.trip_count for w in enclosing],
        "nested_trip_counts": nested,
        "collectives_per_token": dict(sorted(collectives.items())),
        "collectives_per_chunk": chunk_arrays,
        "stop_test_collectives_per_chunk": chunk_scalars,
        "layer_sized_moves_per_token": [{"kind": k, "type": t, "count": n} for (k, t), n in sorted(moves.items())],
        "layer_bytes_threshold": layer_bytes,
    }


# ----------------------------------------------------------------------------- the checks


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def ideal_decode_bytes(cfg, shape: DecodeShape) -> int:
    """Bytes one decode step must read: every matmul weight once (sampling dtype) + the full KV cache once."""
    from xr_jax.train.flops import text_matmul_params

    t = cfg.text
    kv = 2 * t.num_layers * shape.rows * (shape.prompt + shape.new) * t.num_kv_heads * t.head_dim
    return text_matmul_params(cfg) * _itemsize(shape.weights_dtype) + kv * _itemsize(shape.dtype)


def layer_bytes(cfg, shape: DecodeShape) -> int:
    """Half the smaller of one layer's smallest matmul weight (whole: the sampler replicates its weights) and
    one layer's K cache on a device (rows split over the mesh): smaller ops are activations, not layer-sized."""
    t = cfg.text
    weight = t.hidden_size * t.num_kv_heads * t.head_dim * _itemsize(shape.weights_dtype)
    k_cache = shape.rows * (shape.prompt + shape.new) * t.num_kv_heads * t.head_dim * _itemsize(shape.dtype)
    return min(weight, k_cache // math.prod(shape.mesh)) // 2


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def gather_overcount(hlo_text: str) -> int:
    """Bytes `cost_analysis()` charges for gathers beyond what they move: XLA:CPU's cost model charges a gather
    fusion's table operand whole (the embedding lookup of B token ids counts the [vocab, D] table), although
    it reads only the gathered rows. Per gather whose table is a parameter of its fusion (or an operand of a
    top-level gather): table bytes - (output bytes + index bytes), read from the optimised HLO."""
    comps, entry = parse_hlo(hlo_text)
    by_name = {i.name: i for c in comps.values() for i in c}
    fused = {c for cs in comps.values() for i in cs if i.opcode == "fusion" for c in i.called}
    over = 0
    for comp in _closure(comps, [entry]):
        for ins in comps[comp]:
            if ins.opcode == "gather" and comp not in fused:
                table, index = (by_name.get(n) for n in _operands(ins)[:2])
                over += max(0, table.bytes - ins.bytes - index.bytes) if table and index else 0
                continue
            if ins.opcode != "fusion":
                continue
            body = comps.get(ins.called[0], [])
            params = {i.name: i for i in body if i.opcode == "parameter"}
            users = {}
            for i in body:
                for n in _operands(i):
                    users.setdefault(n, []).append(i)
            for g in (i for i in body if i.opcode == "gather"):
                table, index = (_operands(g) + [None, None])[:2]
                if table in params and all(u.opcode == "gather" for u in users[table]):
                    index_bytes = by_name[index].bytes if index in by_name else 0
                    over += max(0, params[table].bytes - g.bytes - index_bytes)
    return over


def _operands(ins: Instr) -> list[str]:
    return re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])


def _step_bytes(lower, args, kw, device=None) -> dict:
    """cost_analysis bytes of one compiled step: raw, and corrected for gathers (`gather_overcount`) on this
    host's backend (XLA:CPU's overcount; `device`, a TPU chip: XLA:TPU's cost model, not corrected)."""
    import jax

    if device is not None:
        args = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                                      if isinstance(x, jax.ShapeDtypeStruct) else x, args)
    compiled = lower(*args, **kw).compile()
    raw = float(_cost(compiled).get("bytes accessed", 0.0))
    over = gather_overcount(compiled.as_text()) if device is None else 0
    return {"raw": raw, "gather_overcount": over, "corrected": raw - over}


def tpu_devices(topology: str):
    """The devices of a libtpu topology such as "v5e:2x2" (deviceless: compile for them, run nothing)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def check_decode(shape: DecodeShape, hlo_dir: Optional[str] = None, tpu: Optional[str] = None,
                 loop: bool = True) -> dict:
    """The decode report of `shape` (see the module docstring); `hlo_dir`: also write the loop's optimised HLO.
    `tpu`: compile the programs for that libtpu topology's devices instead of this host's (needs libtpu).
    `loop` False: the bytes of one step only (the loop program is not compiled)."""
    import time

    import jax
    from jax.sharding import SingleDeviceSharding

    from xr_jax import parallel
    from xr_jax.models.presets import preset

    cfg = preset(shape.preset, dtype=shape.dtype)
    if shape.layers:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=shape.layers))
    if tpu:  # what "auto" picks on a TPU host (this host's backend is not one): Pallas TPU decode attention
        cfg = cfg.replace(attention="splash")
    devices = tpu_devices(tpu) if tpu else None
    mesh = parallel.make_mesh(shape.mesh, devices) if tpu or math.prod(shape.mesh) > 1 else None
    step, model, (loop_lower, loop_args, loop_kw) = decode_programs(cfg, shape, mesh)
    one = SingleDeviceSharding(devices[0]) if tpu else None  # the one-device steps on the topology's first chip
    t0 = time.perf_counter()
    model_bytes, step_bytes = (_step_bytes(lower, args, kw, one) for lower, args, kw in (model, step))
    compile_s = {"steps": round(time.perf_counter() - t0, 1)}
    ideal = ideal_decode_bytes(cfg, shape)
    report = {
        "shape": dataclasses.asdict(shape), "platform": f"tpu {tpu}" if tpu else jax.default_backend(),
        "bytes_per_token": model_bytes["corrected"], "ideal_bytes_per_token": ideal,
        "ratio": model_bytes["corrected"] / ideal, "model_step_bytes": model_bytes, "step_bytes": step_bytes,
        "step_ratio": step_bytes["corrected"] / ideal, "compile_s": compile_s,
    }
    if not loop:
        return report
    t0 = time.perf_counter()
    with parallel.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        compiled = loop_lower(*loop_args, **loop_kw).compile()
    compile_s["loop"] = round(time.perf_counter() - t0, 1)
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        platform = f"tpu_{tpu.replace(':', '_')}" if tpu else "host"
        name = f"decode_{shape.preset}_{'x'.join(map(str, shape.mesh))}_{platform}.hlo.txt"
        with open(os.path.join(hlo_dir, name), "w") as f:
            f.write(text)
    report["loop"] = loop_report(text, layer_bytes(cfg, shape))
    if tpu:
        from bench.attention_lowering import tpu_kernels

        report["loop"]["tpu_kernels"] = tpu_kernels(text)
    return report


def check_sft_attention(seq: int = 256) -> dict:
    """Whether the SFT loss-and-grad lowered for CUDA gives attention a bias / dbias operand, by
    `bench.attention_lowering`, for an sm_90 (cuDNN) and an sm_80 (Triton flash) target; {"skipped": why}
    where it cannot run (no jax-cuda12-plugin: it is in /work/venv-accel, not in the CI venv)."""
    import importlib.util

    try:
        from bench import attention_lowering as al
    except ImportError as e:
        return {"skipped": f"bench.attention_lowering is not available ({e})"}
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        return {"skipped": "jax-cuda12-plugin is not installed (CUDA lowering needs it; no GPU needed)"}
    try:
        # a fresh program per target: the kernel is chosen while tracing, and jax caches the trace
        return {f"sm_{c.replace('.', '')}": al.cuda_attention_report(
                    al.lower_cuda(*al.sft_loss_and_grad(al.lowering_model(), 2, seq), capability=c))
                for c in ("9.0", "8.0")}
    except Exception as e:  # noqa: BLE001 — the CUDA lowering failed here: said in the report
        return {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}


def format_report(decode: dict, attention: Optional[dict] = None) -> str:
    s, loop = decode["shape"], decode.get("loop")
    lines = [f"decode {s['preset']} rows {s['rows']} (group {s['group']}) prompt {s['prompt']} + {s['new']} new, "
             f"{s['dtype']} compute, {s['sampling_dtype'] or s['dtype']} weights, mesh {s['mesh']} on "
             f"{decode['platform']}",
             f"  bytes per token  {decode['bytes_per_token'] / 1e6:.1f} MB (model step) vs ideal "
             f"{decode['ideal_bytes_per_token'] / 1e6:.1f} MB: x{decode['ratio']:.2f}",
             *(f"    {what:<22} cost_analysis {b['raw'] / 1e6:.1f} MB - gathers' table overcount "
               f"{b['gather_overcount'] / 1e6:.1f} MB = {b['corrected'] / 1e6:.1f} MB: "
               f"x{b['corrected'] / decode['ideal_bytes_per_token']:.2f}"
               for what, b in (("model step", decode["model_step_bytes"]),
                               ("step + choose", decode["step_bytes"])))]
    if loop is not None and "error" in loop:
        lines.append(f"  loop             {loop['error']}")
    elif loop is not None:
        lines += [f"  token loop       known trip count {loop['known_trip_count']} (condition bound "
                  f"{loop['condition_bound']}), enclosing "
                  f"{loop['enclosing_trip_counts']}, nested {loop['nested_trip_counts']}",
                  f"  collectives      {loop['collectives_per_token'] or 'none'} per token; "
                  f"{loop['collectives_per_chunk'] or 'none'} per chunk outside it; stop test (scalar, not "
                  f"weights) {loop['stop_test_collectives_per_chunk'] or 'none'} per chunk"]
        moves = loop["layer_sized_moves_per_token"]
        lines.append(f"  layer-sized moves per token ({len(moves)} kinds, >= {loop['layer_bytes_threshold']} B)"
                     + ("" if moves else ": none"))
        lines += [f"    {m['count']:>5} x {m['kind']:<24} {m['type']}" for m in moves[:20]]
        if "tpu_kernels" in loop:
            lines.append(f"  TPU kernels      {loop['tpu_kernels'] or 'none'}")
    lines.append(f"  compile          {decode['compile_s']}")
    if attention is not None:
        lines.append(f"sft attention (CUDA lowering): {json.dumps(attention)}")
    return "\n".join(lines)


def _mesh(text: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: give data x fsdp x tensor, e.g. 1x4x1")
    return parts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=64, help="sampled rows (prompts x group)")
    p.add_argument("--group", type=int, default=1, help="samples per prompt (the prompt cache is shared by them)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sampling-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the weights the decode reads (default: --dtype)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's; fewer compile faster)")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="data x fsdp x tensor, e.g. 1x4x1")
    p.add_argument("--tpu", metavar="TOPOLOGY", help="compile for a libtpu topology, e.g. v5e:2x2 (deviceless)")
    p.add_argument("--sft-attention", action="store_true", help="also check the SFT step's CUDA attention lowering")
    p.add_argument("--hlo-dir", help="write the decode loop's optimised HLO here")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if args.batch % args.group:
        p.error(f"--batch {args.batch} is not a multiple of --group {args.group}")
    devices = math.prod(args.mesh)
    if "jax" not in sys.modules and devices > 1 and not args.tpu:  # simulated devices: before the backend starts
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    shape = DecodeShape(args.preset, args.batch, args.prompt, args.new, args.group, args.dtype, args.sampling_dtype,
                        args.mesh, args.layers)
    report = {"decode": check_decode(shape, args.hlo_dir, args.tpu)}
    if args.sft_attention:
        report["sft_attention"] = check_sft_attention()
    print(format_report(report["decode"], report.get("sft_attention")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
