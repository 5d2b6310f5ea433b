"""The benchmark suite: xr_jax beside transformers + PyTorch on this machine, one table.

    python -m bench                         # size by backend: "gpu" on a GPU, else "cpu"
    python -m bench --size tiny --out DIR   # the CI size (tests/test_bench.py)

Sections (each side by side on the same shapes and random weights; ratio = xr_jax / PyTorch speed):
  ceilings   copy bandwidth (`x + 1` on a large array) and matmul rate (fp32 on CPU, bf16 on GPU),
             measured once; the fractions below are of these measured figures
  sft        one optimizer step (bench.train_step): tokens/s, MFU (datasheet / estimated peak) and
             fraction of the measured matmul rate
  prefill    prompt tokens/s of the prefill (bench.sampler)
  decode     greedy decode tokens/s at batch 1/8/64, fraction of the copy-bandwidth roofline
             (bytes a step must read / measured bandwidth)
  grpo       rollout and update seconds of one GRPO step (bench.grpo)
Each side runs in its own child process (the other framework idle and absent from the timings), the two
alternating for `--reps` rounds; a figure is a side's best round, and within a round its best of 3 (SFT,
GRPO) or median of 3 (prefill, decode). fp32 on CPU (both sides use every core the process may run on);
bf16 on GPU (PyTorch: autocast / bf16 weights, sdpa attention). On a CPU backend the xr_jax side keeps freed
host memory as `xr-jax` does (`xr_jax.cli.host_memory`); `--same-host-malloc` gives PyTorch the same settings.
Writes bench.json under --out (default $OUT, else a temp dir) and prints the table last.
Imports only jax, flax, optax, numpy, torch and transformers (no grain, no datasets: checked at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from bench import grpo as grpo_bench, machine, sampler, train_step
from xr_jax.cli.host_memory import reuse_freed_memory
from xr_jax.models.presets import preset
from xr_jax.train import flops


@dataclasses.dataclass(frozen=True)
class Size:
    sft: tuple[tuple[str, int, int], ...]  # (preset, batch, seq)
    decode: tuple[str, ...]                 # shapes
    batches: tuple[int, ...]
    prompt: int
    new: int
    grpo: tuple[str, int, int, int, int]    # (shape, prompts, group, prompt len, new)
    copy_bytes: int
    matmul_n: int
    sft_steps: int = 2


SIZES = {
    "tiny": Size(sft=(("tiny", 8, 128),), decode=("tiny",), batches=(1, 8, 64), prompt=16, new=8,
                 grpo=("tiny", 4, 4, 16, 8), copy_bytes=2**25, matmul_n=512),
    "cpu": Size(sft=(("tiny", 8, 128), ("small", 4, 256)), decode=("tiny", "small"), batches=(1, 8, 64),
                prompt=32, new=64, grpo=("tiny", 8, 8, 32, 64), copy_bytes=2**28, matmul_n=1024, sft_steps=3),
    "gpu": Size(sft=(("qwen2.5-1.5b", 1, 4096),), decode=("qwen2.5-0.5b", "qwen2.5-1.5b"), batches=(1, 8, 64),
                prompt=128, new=128, grpo=("qwen2.5-0.5b", 8, 8, 128, 128), copy_bytes=2**31, matmul_n=8192),
}


SIDES = ("xr_jax", "torch")
INNER_REPS = 3  # in each side's process: best of 3 (SFT, GRPO) or median of 3 (prefill, decode)


def sft_section(size: Size, dtype: str, reps: int, on_gpu: bool, side: str) -> list[dict]:
    rows = []
    for shape, b, t in size.sft:
        cfg = preset(shape, dtype=dtype)
        batch = train_step.batch_arrays(b, t, cfg.text.vocab_size)
        if side == "xr_jax":
            run = train_step.jax_runner(cfg, batch, 1, 1, 1024)
        else:
            run = train_step.torch_runner(cfg, batch, 1, dtype)
        row = {"section": "sft", "shape": shape, "setting": f"{b}x{t}", "unit": "tokens/s",
               side: b * t / min(run(size.sft_steps) for _ in range(reps)),
               "step_flops": flops.text_train_flops(cfg, b * t, t), "tokens": b * t}
        if on_gpu and side == "xr_jax":  # planned (compiled memory analysis) vs measured peak bytes of the step
            row["planned_bytes"] = train_step.planned_bytes(cfg, batch)
            row["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        rows.append(row)
    return rows


def decode_section(size: Size, dtype: str, reps: int, on_gpu: bool, side: str) -> list[dict]:
    rows = []
    device = "cuda" if on_gpu else "cpu"
    rng = np.random.RandomState(0)
    for shape in size.decode:
        cfg = sampler.model_config(shape, dtype)
        model, params = sampler.hf_model(cfg, device)  # both sides: the same seeded random weights
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.param_dtype), params)
        on_device = jax.tree_util.tree_map(jax.numpy.asarray, params) if side == "xr_jax" else None
        for b in size.batches:
            prompts = rng.randint(2, cfg.text.vocab_size, size=(b, size.prompt))
            if side == "xr_jax":
                r = sampler.bench_xr(cfg, on_device, prompts, size.new, reps)
            else:
                r = sampler.bench_hf(model, prompts, size.new, reps, device)
            rows.append({"section": "prefill", "shape": shape, "setting": f"B={b} P={size.prompt}",
                         "unit": "tokens/s", side: b * size.prompt / r["prefill"]})
            rows.append({"section": "decode", "shape": shape, "setting": f"B={b} new={size.new}",
                         "unit": "tokens/s", side: b * (size.new - 1) / r["decode"], "batch": b,
                         "step_bytes": sampler.step_bytes(cfg, params, b, size.prompt + size.new / 2),
                         f"tokens_{side}": r["tokens"].tolist()})
        del model, params, on_device
    return rows


def grpo_section(size: Size, dtype: str, reps: int, on_gpu: bool, side: str) -> list[dict]:
    shape, n_prompts, group, p, new = size.grpo
    device = "cuda" if on_gpu else "cpu"
    cfg = sampler.model_config(shape, "float32").replace(dtype=dtype)  # fp32 weights, compute in dtype
    model, params = sampler.hf_model(cfg.replace(dtype="float32"), device)
    prompts = np.random.RandomState(1).randint(2, cfg.text.vocab_size, size=(n_prompts, p))
    if side == "xr_jax":
        run = grpo_bench.xr_runner(cfg, params, prompts, group, new)
    else:
        run = grpo_bench.torch_runner(model.train(), prompts, group, new, device, bf16=dtype == "bfloat16")
    best = np.min([run() for _ in range(reps)], axis=0)
    setting = f"{n_prompts}x{group} P={p} new={new}"
    return [{"section": f"grpo {part}", "shape": shape, "setting": setting, "unit": "s", side: float(best[i])}
            for i, part in enumerate(("rollout", "update"))]


SECTIONS = {"sft": sft_section, "decode": decode_section, "grpo": grpo_section}


def one_side(args, on_gpu: bool) -> list[dict]:
    """This process measures one side only (`--side`): the other side's framework stays idle here."""
    import torch

    size = SIZES[args.size or ("gpu" if on_gpu else "cpu")]
    if not on_gpu:
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many as XLA's CPU pool
    dtype = "bfloat16" if on_gpu else "float32"
    return [row for name in args.sections for row in SECTIONS[name](size, dtype, args.reps, on_gpu, args.side)]


def run_sides(argv: list[str], rounds: int) -> tuple[list[dict], list[str]]:
    """Each side in its own child process, alternating for `rounds` rounds; keeps each side's best figure.

    Separate processes, because in one process the idle framework's thread pool slows the other: on 2 CPU
    cores PyTorch's SFT step measured 2.7x slower beside XLA's pool than alone, and its decode up to 1.6x."""
    merged: dict[tuple, dict] = {}
    leaked: set[str] = set()
    for _ in range(rounds):
        for side in SIDES:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.json")
                subprocess.run([sys.executable, "-m", "bench", *argv, "--side", side, "--rows", path], check=True)
                with open(path) as f:
                    child = json.load(f)
            leaked |= set(child["imported"])
            for r in child["rows"]:
                key = (r["section"], r["shape"], r["setting"])
                into = merged.setdefault(key, {})
                better = min if r["unit"] == "s" else max
                value = better(r[side], into.get(side, r[side]))
                into.update(r)
                into[side] = value
    return list(merged.values()), sorted(leaked)


def derive(rows: list[dict], ceil: dict) -> list[dict]:
    """MFU, fractions of the measured ceilings and the decode token agreement, from both sides' raw rows."""
    for r in rows:
        if "step_flops" in r:  # sft: FLOP/s = FLOP per step x steps/s
            flop_rate = r["step_flops"] * r["xr_jax"] / r["tokens"]
            peak = flops.peak_flops()
            if peak:
                r["xr_mfu"] = flop_rate / peak
            r["frac_of_ceiling"] = flop_rate / ceil["matmul_flops"]
        if "step_bytes" in r:  # decode: bytes per step x steps/s
            r["frac_of_ceiling"] = r["step_bytes"] * r["xr_jax"] / r["batch"] / ceil["copy_bytes_per_s"]
            r["same_tokens"] = float((np.asarray(r.pop("tokens_xr_jax")) == np.asarray(r.pop("tokens_torch"))).mean())
    return rows


def table(info: dict, ceil: dict, rows: list[dict]) -> str:
    lines = [f"machine: {info['device']} ({info['devices']} x {info['platform']}, {info['cores']} cores, load "
             f"{info['load_avg']:.1f}), jax {info['jax']}, torch {info.get('torch', '-')}, transformers "
             f"{info.get('transformers', '-')}, {info['date']}",
             f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {ceil['matmul_flops'] / 1e12:.3f} "
             f"TFLOP/s ({ceil['matmul_dtype']})", "",
             "| section | shape | setting | unit | xr_jax | PyTorch | xr/PyTorch | of ceiling | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = r["unit"] == "s"
        ratio = r["torch"] / r["xr_jax"] if seconds else r["xr_jax"] / r["torch"]
        frac = f"{r['frac_of_ceiling']:.1%}" if "frac_of_ceiling" in r else ""
        note = []
        if "xr_mfu" in r:
            note.append(f"MFU {r['xr_mfu']:.1%}")
        if "planned_bytes" in r:
            note.append(f"planned {r['planned_bytes'] / 2**30:.1f} GiB, peak {r['peak_bytes'] / 2**30:.1f} GiB")
        if "same_tokens" in r:
            note.append(f"same tokens {r['same_tokens']:.2f}")
        fmt = (lambda v: f"{v:.3f}") if seconds else (lambda v: f"{v:,.0f}")  # noqa: E731
        lines.append(f"| {r['section']} | {r['shape']} | {r['setting']} | {r['unit']} | {fmt(r['xr_jax'])} | "
                     f"{fmt(r['torch'])} | {ratio:.2f}x | {frac} | {'; '.join(note)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("XR_BENCH_SIZE") or None)
    ap.add_argument("--reps", type=int, default=3, help="rounds of alternating side processes")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="directory for bench.json")
    ap.add_argument("--sections", nargs="+", default=["sft", "decode", "grpo"], choices=sorted(SECTIONS))
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process: measure this side
    ap.add_argument("--rows", help=argparse.SUPPRESS)  # where the child writes its rows
    ap.add_argument("--same-host-malloc", action="store_true",
                    help="give the PyTorch side xr_jax's host allocator settings too (xr_jax.cli.host_memory)")
    args = ap.parse_args(argv)
    if args.side == "xr_jax" or (args.side and args.same_host_malloc):
        reuse_freed_memory()  # what `xr-jax` does on a CPU backend; before the backend starts
    on_gpu = jax.default_backend() == "gpu"
    if args.side:
        args.reps = INNER_REPS
        rows = one_side(args, on_gpu)
        with open(args.rows, "w") as f:
            json.dump({"rows": rows, "imported": [m for m in ("grain", "datasets") if m in sys.modules]}, f)
        return {}

    size_name = args.size or ("gpu" if on_gpu else "cpu")
    size = SIZES[size_name]
    info = machine.describe()
    mm_dtype = "bfloat16" if on_gpu else "float32"
    ceil = {"copy_bytes_per_s": machine.copy_bandwidth(size.copy_bytes),
            "matmul_flops": machine.matmul_rate(size.matmul_n, mm_dtype), "matmul_dtype": mm_dtype}
    if on_gpu:
        ceil["datasheet_hbm_bytes_per_s"] = machine.datasheet_hbm(info["device"])
    rows, leaked = run_sides(["--size", size_name, "--sections", *args.sections]
                             + ["--same-host-malloc"] * args.same_host_malloc, args.reps)
    rows = derive(rows, ceil)
    leaked = sorted(set(leaked) | {m for m in ("grain", "datasets") if m in sys.modules})
    result = {"machine": info, "size": size_name, "ceilings": ceil, "rows": rows,
              "imported_grain_or_datasets": leaked}
    out = args.out or tempfile.mkdtemp(prefix="xr_bench_")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"\nwrote {os.path.join(out, 'bench.json')}\n")
    print(table(info, ceil, rows), flush=True)
    return result


if __name__ == "__main__":
    main()
