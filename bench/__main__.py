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
SFT and GRPO alternate the two sides `--reps` times in this process and keep each side's best; decode
takes each side's median of `--reps` runs per batch size. fp32 on CPU (both sides use every core this
process may run on); bf16 on GPU (PyTorch: autocast / bf16 weights, sdpa attention).
Writes bench.json under --out (default $OUT, else a temp dir) and prints the table last.
Imports only jax, flax, optax, numpy, torch and transformers (no grain, no datasets: checked at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

# Before torch starts its OpenMP pool: idle OpenMP threads otherwise spin after every parallel region and
# starve XLA's threads (and each other) on a small shared machine; measured on 2 shared cores, tiny model:
# PyTorch prefill 71 -> 3,566 tokens/s, SFT step 14k -> 32k tokens/s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import grpo as grpo_bench, machine, sampler, train_step  # noqa: E402
from xr_jax.models.presets import preset  # noqa: E402
from xr_jax.train import flops  # noqa: E402


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


def best_of(runners: dict, reps: int) -> dict:
    """Alternate the sides' `run()` calls `reps` times; each keeps its elementwise-best result."""
    best = {}
    for _ in range(reps):
        for side, run in runners.items():
            out = run()
            best[side] = out if side not in best else np.minimum(best[side], out)
    return best


def sft_section(size: Size, dtype: str, reps: int, on_gpu: bool, ceil: dict) -> list[dict]:
    rows = []
    for shape, b, t in size.sft:
        cfg = preset(shape, dtype=dtype)
        batch = train_step.batch_arrays(b, t, cfg.text.vocab_size)
        xr = train_step.jax_runner(cfg, batch, 1, 1, 1024)
        pt = train_step.torch_runner(cfg, batch, 1, dtype)
        best = best_of({"xr_jax": lambda: xr(size.sft_steps), "torch": lambda: pt(size.sft_steps)}, reps)
        step_flops = flops.text_train_flops(cfg, b * t, t)
        row = {"section": "sft", "shape": shape, "setting": f"{b}x{t}", "unit": "tokens/s",
               "xr_jax": b * t / best["xr_jax"], "torch": b * t / best["torch"],
               "xr_mfu": step_flops / best["xr_jax"] / flops.peak_flops(),
               "frac_of_ceiling": step_flops / best["xr_jax"] / ceil["matmul_flops"]}
        if on_gpu:  # planned (compiled memory analysis) vs measured peak bytes of the step
            row["planned_bytes"] = train_step.planned_bytes(cfg, batch)
            row["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        rows.append(row)
    return rows


def decode_section(size: Size, dtype: str, reps: int, on_gpu: bool, ceil: dict) -> list[dict]:
    rows = []
    device = "cuda" if on_gpu else "cpu"
    rng = np.random.RandomState(0)
    for shape in size.decode:
        cfg = sampler.model_config(shape, dtype)
        model, params = sampler.hf_model(cfg, device)
        params = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, cfg.param_dtype), params)
        for b in size.batches:
            prompts = rng.randint(2, cfg.text.vocab_size, size=(b, size.prompt))
            xr = sampler.bench_xr(cfg, params, prompts, size.new, reps)
            hf = sampler.bench_hf(model, prompts, size.new, reps, device)
            pre = lambda r: b * size.prompt / r["prefill"]  # noqa: E731
            dec = lambda r: b * (size.new - 1) / r["decode"]  # noqa: E731
            rows.append({"section": "prefill", "shape": shape, "setting": f"B={b} P={size.prompt}",
                         "unit": "tokens/s", "xr_jax": pre(xr), "torch": pre(hf)})
            need = sampler.step_bytes(cfg, params, b, size.prompt + size.new / 2)
            rows.append({"section": "decode", "shape": shape, "setting": f"B={b} new={size.new}",
                         "unit": "tokens/s", "xr_jax": dec(xr), "torch": dec(hf),
                         "frac_of_ceiling": need / ceil["copy_bytes_per_s"] / (xr["decode"] / (size.new - 1)),
                         "same_tokens": float((xr["tokens"] == hf["tokens"]).mean()), "xr_compile_s": xr["compile"]})
        del model, params
    return rows


def grpo_section(size: Size, dtype: str, reps: int, on_gpu: bool) -> list[dict]:
    shape, n_prompts, group, p, new = size.grpo
    device = "cuda" if on_gpu else "cpu"
    cfg = sampler.model_config(shape, "float32").replace(dtype=dtype)  # fp32 weights, compute in dtype
    model, params = sampler.hf_model(cfg.replace(dtype="float32"), device)
    prompts = np.random.RandomState(1).randint(2, cfg.text.vocab_size, size=(n_prompts, p))
    xr = grpo_bench.xr_runner(cfg, params, prompts, group, new)
    pt = grpo_bench.torch_runner(model.train(), prompts, group, new, device, bf16=dtype == "bfloat16")
    best = best_of({"xr_jax": lambda: np.array(xr()), "torch": lambda: np.array(pt())}, reps)
    setting = f"{n_prompts}x{group} P={p} new={new}"
    return [{"section": f"grpo {part}", "shape": shape, "setting": setting, "unit": "s",
             "xr_jax": float(best["xr_jax"][i]), "torch": float(best["torch"][i])}
            for i, part in enumerate(("rollout", "update"))]


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
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="directory for bench.json")
    ap.add_argument("--sections", nargs="+", default=["sft", "decode", "grpo"], choices=["sft", "decode", "grpo"])
    args = ap.parse_args(argv)

    import torch

    on_gpu = jax.default_backend() == "gpu"
    size = SIZES[args.size or ("gpu" if on_gpu else "cpu")]
    if not on_gpu:
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many as XLA's CPU pool
    dtype = "bfloat16" if on_gpu else "float32"
    info = machine.describe()
    mm_dtype = "bfloat16" if on_gpu else "float32"
    ceil = {"copy_bytes_per_s": machine.copy_bandwidth(size.copy_bytes),
            "matmul_flops": machine.matmul_rate(size.matmul_n, mm_dtype), "matmul_dtype": mm_dtype}
    if on_gpu:
        ceil["datasheet_hbm_bytes_per_s"] = machine.datasheet_hbm(info["device"])
    rows = []
    if "sft" in args.sections:
        rows += sft_section(size, dtype, args.reps, on_gpu, ceil)
    if "decode" in args.sections:
        rows += decode_section(size, dtype, args.reps, on_gpu, ceil)
    if "grpo" in args.sections:
        rows += grpo_section(size, dtype, args.reps, on_gpu)
    leaked = [m for m in ("grain", "datasets") if m in sys.modules]
    result = {"machine": info, "size": args.size or ("gpu" if on_gpu else "cpu"), "ceilings": ceil, "rows": rows,
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
