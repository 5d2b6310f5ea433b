"""SFT train step: xr_jax (jit, chunked loss, optax AdamW) vs transformers + torch.optim.AdamW, same shapes.

Both sides run one full optimizer step per iteration on the same model shape and batch: forward,
token cross-entropy, backward, global-norm clipping, AdamW. fp32 on CPU; on GPU, bf16 compute with
fp32 master weights on both sides (JAX: `dtype=bfloat16`; PyTorch: `torch.autocast(bfloat16)`).
Needs only jax/flax/optax/numpy (and torch/transformers for the comparison) — no grain, no datasets.

  python -m bench.train_step --shape small --batch 4 --seq 256           # CPU
  python -m bench.train_step --shape qwen2.5-1.5b --batch 1 --seq 4096   # GPU (bf16)

Both this script's main and the suite (`python -m bench`) run each side in its own child process: beside
an idle XLA thread pool, PyTorch's step measured up to 2.7x slower on 2 CPU cores. The JAX side keeps freed
host memory as `xr-jax` does on CPU (`xr_jax.cli.host_memory`); `--same-host-malloc` does the same for PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from bench.machine import describe


def batch_arrays(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Full rows of random tokens (one segment per row, every target in the loss)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {
        "input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32), "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def jax_runner(cfg, batch: dict, warmup: int, microbatches: int, chunk: int):
    """Build and warm up the xr_jax step; returns `run(steps) -> seconds per step`."""
    from xr_jax import parallel
    from xr_jax.config import OptimSection
    from xr_jax.train import setup, sft

    mesh = parallel.make_mesh((-1, 1, 1))
    st = setup.state_setup(OptimSection(lr=1e-5, schedule="constant"), cfg, mesh, 1000)
    state = st.fresh(0)
    step = sft.jit_train_step(sft.make_train_step(
        cfg, st.tx, st.schedule, microbatches=microbatches, chunk=chunk, mesh=mesh, shardings=st.shardings),
        mesh, st.shardings)
    gb = parallel.global_batch(batch, mesh)
    holder = [state]

    def run(steps):
        with parallel.use_mesh(mesh):
            t0 = time.perf_counter()
            for _ in range(steps):
                holder[0], m = step(holder[0], gb)
            jax.block_until_ready((holder[0], m))
        return (time.perf_counter() - t0) / steps

    run(warmup)
    return run


def planned_bytes(cfg, batch: dict, chunk: int = 1024) -> int:
    """Per-device bytes XLA plans for the SFT step (arguments + outputs + temporaries - aliased), as
    `xr-jax plan` reports them, but compiled for the device at hand."""
    from xr_jax import parallel
    from xr_jax.config import OptimSection
    from xr_jax.train import setup, sft

    st = setup.state_setup(OptimSection(lr=1e-5, schedule="constant"), cfg, parallel.make_mesh((1, 1, 1)), 1000)
    step = jax.jit(sft.make_train_step(cfg, st.tx, st.schedule, chunk=chunk), donate_argnums=0)
    m = step.lower(st.abstract(), jax.eval_shape(lambda: batch)).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def torch_runner(cfg, batch: dict, warmup: int, dtype: str):
    """Build and warm up the transformers + torch.optim.AdamW step; returns `run(steps) -> seconds per step`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = cfg.text
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = Qwen2Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, tie_word_embeddings=t.tie_word_embeddings,
        max_position_embeddings=max(t.max_position_embeddings, batch["input_ids"].shape[1]),
    )
    hf_cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(hf_cfg).to(device).train()
    if cfg.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
    labels = torch.tensor(batch["targets"], dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def one():
        with autocast:
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        sync()
        return (time.perf_counter() - t0) / steps

    run(warmup)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help="model preset: tiny, small, qwen2.5-1.5b, ...")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate JAX and PyTorch runs (each in its own process, so neither's thread pool "
                        "disturbs the other) this many times and keep each side's best")
    p.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)  # one side, in a child process
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024, help="cross-entropy chunk (tokens)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--same-host-malloc", action="store_true",
                   help="give the PyTorch side xr_jax's host allocator settings too (xr_jax.cli.host_memory)")
    args = p.parse_args()

    from xr_jax.cli.host_memory import reuse_freed_memory
    from xr_jax.models.presets import preset
    from xr_jax.train import flops

    if args.only == "jax" or (args.only and args.same_host_malloc):
        reuse_freed_memory()  # what `xr-jax` does on a CPU backend; before the backend starts
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = preset(args.shape, dtype=dtype, remat=args.remat)
    if on_cpu and args.only == "torch":
        import torch

        torch.set_num_threads(os.cpu_count())
    batch = batch_arrays(args.batch, args.seq, cfg.text.vocab_size)
    tokens = args.batch * args.seq
    step_flops = flops.text_train_flops(cfg, tokens, args.seq)
    device_peak = args.peak_flops or flops.peak_flops()
    peak = device_peak * jax.device_count() if device_peak else None  # None: MFU unknown
    mfu = lambda seconds: step_flops / seconds / peak if peak else None  # noqa: E731
    res = {"machine": describe(), "shape": args.shape, "dtype": dtype, "batch": args.batch, "seq": args.seq,
           "remat": args.remat, "step_tflop": step_flops / 1e12, "peak_tflops": peak and peak / 1e12}
    if args.only:
        if args.only == "jax":
            run = jax_runner(cfg, batch, args.warmup, args.microbatches, args.chunk)
        else:
            run = torch_runner(cfg, batch, args.warmup, dtype)
        print(json.dumps({"step_s": run(args.steps)}))
        return
    sides = ["jax"] + ([] if args.no_torch else ["torch"])
    best = {side: float("inf") for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            out = subprocess.run([sys.executable, "-m", "bench.train_step", *sys.argv[1:], "--only", side],
                                 capture_output=True, text=True, check=True)
            best[side] = min(best[side], json.loads(out.stdout.strip().splitlines()[-1])["step_s"])
    t_jax = best["jax"]
    res.update(jax_step_s=t_jax, jax_tokens_per_s=tokens / t_jax, jax_mfu=mfu(t_jax))
    if not args.no_torch:
        t_torch = best["torch"]
        res.update(torch_step_s=t_torch, torch_tokens_per_s=tokens / t_torch, torch_mfu=mfu(t_torch),
                   speedup_vs_torch=t_torch / t_jax)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
