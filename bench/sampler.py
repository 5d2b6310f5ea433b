"""Greedy decode tokens/s of the xr_jax sampler, side by side with transformers `generate` (same weights).

    python -m bench.sampler --shape tiny                          # CPU: the tests' tiny model
    python -m bench.sampler --shape small --batch 1 8             # CPU: a 4-layer, 8k-vocab model
    python -m bench.sampler --shape qwen2.5-0.5b --dtype bfloat16 --new 256 --prompt 128   # GPU

Both sides: random weights (nothing downloaded), the same prompts, greedy, exactly `--new` tokens per
row (no stop ids; transformers with eos off, min_new_tokens = max_new_tokens, no filters or penalties,
sdpa attention). Reported per batch size:

  prefill ms       the prompt forward (xr_jax: its compiled prefill; transformers: one forward, use_cache)
  decode tok/s     B * (new - 1) / (generate time - prefill time): the new - 1 cached decode steps
  e2e tok/s        B * new / whole generate time
  compile s        xr_jax only, prefill + decode programs, timed apart from the runs
  roofline         (GPU) bytes a decode step must read (weights + valid KV cache) / peak HBM bandwidth,
                   divided by the measured step time

Needs jax/flax and (for the side by side) torch + transformers; no grain/datasets. Median of `--reps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xr_jax.sampling import sampler as sampling
from xr_jax.models.config import ModelConfig, TextConfig
from xr_jax.models.presets import preset
from xr_jax.models.qwen2_5_vl import init_params

from bench.machine import cpu_model, datasheet_hbm

SHAPES = {
    # the tests' tiny model (text part): the CPU bar
    "tiny": preset("tiny").text,
    "small": TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                        num_kv_heads=2, mrope_section=None, tie_word_embeddings=True),
    **{name: preset(name).text for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")},
}


def model_config(shape: str, dtype: str) -> ModelConfig:
    text = dataclasses.replace(SHAPES[shape], bos_token_id=0, eos_token_id=1)
    return ModelConfig(text=text, vision=None, dtype=dtype, param_dtype=dtype)


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_xr(cfg: ModelConfig, params, prompts: np.ndarray, new: int, reps: int, profile: str | None = None,
             hlo_path: str | None = None) -> dict:
    """Compile prefill and decode ahead of time (timed), then time each compiled program; `hlo_path`: also
    write the compiled decode's optimised HLO there."""
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=new, stop_ids=(), pad_id=0,
                                   prompt_buckets=(prompts.shape[1],))
    sampler = sampling.Sampler(cfg, scfg)
    batch = sampling.prepare_prompts([sampling.Prompt(r) for r in prompts], cfg, scfg)
    args = sampler._place(batch)
    params = sampler.weights(params)  # the per-layer decode weights, made once per `generate` (not timed)
    start = time.perf_counter()
    prefill = sampling.prefill_jit.lower(params, *args, model=cfg).compile()
    cache, logits = prefill(params, *args)
    keys = jax.random.split(jax.random.key(0), len(prompts))
    decode_args = (params, cache, logits, jnp.asarray(batch.next_position), keys, sampler.knobs())
    decode = sampling.decode_jit.lower(*decode_args, program=sampler.program(1)).compile()
    compile_s = time.perf_counter() - start
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(decode.as_text())
    jax.block_until_ready(decode(*decode_args))
    t_prefill = timed(lambda: prefill(params, *args), reps)
    t_decode = timed(lambda: decode(*decode_args), reps)
    tokens = np.asarray(decode(*decode_args)["tokens"])
    if profile:  # one decode call under the profiler (perfetto trace) for per-kernel times
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            jax.block_until_ready(decode(*decode_args))
    return dict(prefill=t_prefill, decode=t_decode, total=t_prefill + t_decode, compile=compile_s, tokens=tokens)


def hf_model(cfg: ModelConfig, device: str, seed: int = 0):
    """A random transformers Qwen2 of this shape on `device` in cfg.dtype, and its params (fp32 numpy)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from xr_jax.models import hf

    torch.manual_seed(seed)
    d = hf.config_to_hf(cfg)
    d.pop("architectures"), d.pop("model_type")
    hcfg = Qwen2Config(**d)
    hcfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(hcfg).eval()
    params = hf.tree_from_hf({k: v.float().numpy() for k, v in model.state_dict().items()})
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    return model.to(device=device, dtype=torch_dtype), params


def bench_hf(model, prompts: np.ndarray, new: int, reps: int, device: str) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)
    am = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(fn):
        times = []
        for _ in range(reps + 1):  # first run warms up
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:])), out

    t_prefill, _ = run(lambda: model(input_ids=ids, attention_mask=am, use_cache=True))
    t_total, out = run(lambda: model.generate(
        input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=new, min_new_tokens=new,
        eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None, repetition_penalty=None))
    return dict(prefill=t_prefill, total=t_total, decode=t_total - t_prefill,
                tokens=out[:, prompts.shape[1]:].cpu().numpy())


def step_bytes(cfg: ModelConfig, params, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (the embedding table only as the tied LM head;
    an untied model reads only B rows of it) and the valid K/V of every layer."""
    t = cfg.text
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    if not t.tie_word_embeddings:
        weights -= t.vocab_size * t.hidden_size * jnp.dtype(cfg.dtype).itemsize
    kv = 2 * t.num_layers * batch * context * t.num_kv_heads * t.head_dim * jnp.dtype(cfg.dtype).itemsize
    return weights + kv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (tokens, no padding)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. torch missing)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads on CPU (1: on a small shared machine torch's 2-thread OpenMP pool "
                         "stalls, 100x slower on the tiny model)")
    ap.add_argument("--profile", default=None, help="write a jax.profiler trace of the last batch's decode here")
    ap.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth GB/s (GPU roofline)")
    args = ap.parse_args(argv)

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    cfg = model_config(args.shape, args.dtype)
    print(f"device: {device.device_kind if on_gpu else cpu_model()} ({jax.device_count()} x {device.platform}), "
          f"jax {jax.__version__}, shape {args.shape}, {args.dtype}, prompt {args.prompt}, new {args.new}"
          + ("" if on_gpu or args.no_hf else f", torch threads {args.torch_threads}"))
    torch_model = None
    if args.no_hf:
        params = nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    else:  # random HF weights, converted: both sides run the same model
        if not on_gpu:
            __import__("torch").set_num_threads(args.torch_threads)
        torch_model, params = hf_model(cfg, "cuda" if on_gpu else "cpu")
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.param_dtype), params)
    peak = args.peak_gbs * 1e9 if args.peak_gbs else None
    if peak is None and on_gpu:
        peak = datasheet_hbm(device.device_kind)

    rng = np.random.RandomState(0)
    rows = []
    for b in args.batch:
        prompts = rng.randint(2, cfg.text.vocab_size, size=(b, args.prompt))
        xr = bench_xr(cfg, params, prompts, args.new, args.reps, args.profile if b == args.batch[-1] else None)
        row = dict(batch=b, xr=xr)
        if torch_model is not None:
            ref = bench_hf(torch_model, prompts, args.new, args.reps, "cuda" if on_gpu else "cpu")
            row["hf"] = ref
            row["same_tokens"] = float((ref["tokens"] == xr["tokens"]).mean())
        if peak:
            need = step_bytes(cfg, params, b, args.prompt + args.new / 2) / peak
            row["roofline"] = need / (xr["decode"] / (args.new - 1))
        rows.append(row)
        print_row(row, args.new)

    print("\n| batch | xr prefill ms | xr decode tok/s | xr e2e tok/s | xr compile s | hf prefill ms | "
          "hf decode tok/s | hf e2e tok/s | decode ratio | e2e ratio | same tokens | roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(table_line(row, args.new))


def rates(r: dict, b: int, new: int) -> tuple[float, float, float]:
    return r["prefill"] * 1e3, b * (new - 1) / r["decode"], b * new / r["total"]


def print_row(row: dict, new: int) -> None:
    b = row["batch"]
    p, d, e = rates(row["xr"], b, new)
    msg = f"B={b:3d}  xr: prefill {p:8.2f} ms  decode {d:10.0f} tok/s  e2e {e:10.0f} tok/s"
    msg += f"  compile {row['xr']['compile']:.1f} s"
    if "hf" in row:
        hp, hd, he = rates(row["hf"], b, new)
        msg += f"  | hf: prefill {hp:8.2f} ms  decode {hd:9.0f} tok/s  e2e {he:9.0f}"
        msg += f"  | decode x{d / hd:.1f}  e2e x{e / he:.1f}"
        msg += f"  same tokens {row['same_tokens']:.3f}"
    if "roofline" in row:
        msg += f"  | roofline {100 * row['roofline']:.0f}%"
    print(msg, flush=True)


def table_line(row: dict, new: int) -> str:
    b = row["batch"]
    p, d, e = rates(row["xr"], b, new)
    cells = [str(b), f"{p:.2f}", f"{d:,.0f}", f"{e:,.0f}", f"{row['xr']['compile']:.1f}"]
    if "hf" in row:
        hp, hd, he = rates(row["hf"], b, new)
        cells += [f"{hp:.2f}", f"{hd:,.0f}", f"{he:,.0f}", f"{d / hd:.1f}x", f"{e / he:.1f}x"]
        cells.append(f"{row['same_tokens']:.3f}")
    else:
        cells += ["-"] * 6
    cells.append(f"{100 * row['roofline']:.0f}%" if "roofline" in row else "-")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
