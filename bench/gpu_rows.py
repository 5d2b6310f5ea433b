"""Rows at the recipe's scale for a lent GPU, run by bench/gpu.sh after the side-by-side suite (xr_jax only,
random weights, nothing downloaded):

    python -m bench.gpu_rows --out DIR                  # GPU sizes below
    python -m bench.gpu_rows --size tiny --out DIR      # the same rows on the tests' tiny model (CPU, CI)

  decode 7B     Qwen2.5-7B text shape (`--layers` may cut its 28 layers to fit the time: the row says so),
                bf16 weights, greedy, 64 rows, prompt 1024 + 256 new (the GRPO shape's long prompt, fewer new
                tokens to fit the time): decode tokens/s and fraction of the datasheet HBM roofline (weights +
                valid KV read per step). The compiled decode's optimised HLO goes to OUT/decode_7b.hlo.txt and
                `bench.compiled.loop_report` reads it: trip count, collectives and copies in the token loop as
                XLA:GPU compiled it.
  grpo rollout  the same model from fp32 master weights: cast once to bf16 (the sampling dtype, what the
                rollout layout samples with on one device), then 8 prompts x 8 samples, temperature 1, 256 new
                (no stop ids): seconds and tokens/s, cast included.
  sft           the text model of `--sft-config` (default the 3B recipe: Qwen2.5-3B text shape, the remat
                `xr-jax plan` picked, docs/plan.md) at its production tokens per device: train.batch_size /
                (32 devices x train.microbatches) rows of train.seq_len per step, bf16, AdamW: tokens/s, MFU;
                the attention kernel `auto` picks (cuDNN on Hopper), then on a GPU the same step with the
                Triton flash kernel (`attention: pallas_gpu`, what A100s run), side by side.
Rows run in that order while `--deadline` (unix time) is ahead; later ones are reported as skipped. Writes
OUT/gpu_rows.json and prints the suite's table (OUT/bench.json, when there) then these rows, last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Optional

import flax.linen as nn
import jax
import numpy as np

from bench import compiled, machine, sampler, train_step
from xr_jax.models.layers import as_dtype
from xr_jax.models.presets import preset
from xr_jax.models.qwen2 import decode_weights
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.sampling import sampler as sampling
from xr_jax.train import flops

PAPER_DEVICES = 32  # the SFT configs' microbatches give 1 row per device per microbatch on 32 devices


@dataclasses.dataclass(frozen=True)
class Size:
    decode_preset: str
    layers: Optional[int]  # None: all of the preset's
    rows: int
    prompt: int
    new: int
    group: int
    sft_overrides: tuple[str, ...] = ()


SIZES = {
    "gpu": Size("qwen2.5-7b", None, 64, 1024, 256, 8),
    "tiny": Size("tiny", None, 8, 16, 8, 2, ("model.preset=tiny-vl", "model.vocab_size=null", "train.seq_len=128")),
}
SIZES["cpu"] = SIZES["tiny"]  # the suite's CPU size: these rows stay tiny off a GPU


def decode_config(size: Size, dtype: str, layers: Optional[int]):
    cfg = preset(size.decode_preset, dtype=dtype, param_dtype="float32")
    n = layers or size.layers
    return cfg if n is None else cfg.replace(text=dataclasses.replace(cfg.text, num_layers=n))


def decode_and_rollout_rows(size: Size, dtype: str, layers: Optional[int], out: str, deadline: float) -> list[dict]:
    """The decode row and the rollout row: both decode from fp32 master weights, which the sampler casts to the
    sampling dtype once per `generate` (`Sampler.weights`)."""
    cfg = decode_config(size, dtype, layers)
    master = jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.PRNGKey(0))
    weights = jax.eval_shape(lambda p: decode_weights(p, as_dtype(dtype)), master)  # what decoding reads
    high = min(cfg.text.vocab_size, cfg.vision_start_token_id, cfg.image_token_id)  # text tokens only
    prompts = np.random.RandomState(0).randint(2, high, size=(size.rows, size.prompt))
    name = f"{size.decode_preset} ({cfg.text.num_layers} layers)"
    hlo = os.path.join(out, "decode_7b.hlo.txt")
    r = sampler.bench_xr(cfg, master, prompts, size.new, reps=2, hlo_path=hlo)
    step_s = r["decode"] / (size.new - 1)
    need = sampler.step_bytes(cfg, weights, size.rows, size.prompt + size.new / 2)
    hbm = machine.datasheet_hbm(jax.devices()[0].device_kind)
    shape = compiled.DecodeShape(size.decode_preset, size.rows, size.prompt, size.new, dtype=dtype)
    with open(hlo) as f:
        loop = compiled.loop_report(f.read(), compiled.layer_bytes(cfg, shape))
    rows = [{"row": "decode", "shape": name, "setting": f"B={size.rows} P={size.prompt} new={size.new}",
             "tokens_per_s": size.rows * (size.new - 1) / r["decode"], "step_ms": step_s * 1e3,
             "roofline": need / hbm / step_s if hbm else None, "compile_s": r["compile"],
             "known_trip_count": loop.get("known_trip_count"), "collectives": loop.get("collectives_per_token"),
             "layer_sized_moves": sum(m["count"] for m in loop.get("layer_sized_moves_per_token", []))}]
    if time.time() > deadline:
        return rows + [skipped("grpo rollout")]
    n_prompts = size.rows // size.group
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=size.new, stop_ids=(), pad_id=0,
                                   prompt_buckets=(size.prompt,), weight_dtype=dtype)
    smp = sampling.Sampler(cfg, scfg)
    batch = [sampling.Prompt(p) for p in prompts[:n_prompts]]

    def rollout():
        t0 = time.perf_counter()
        smp.generate(master, batch, rng=0, group_size=size.group)  # host arrays: synced
        return time.perf_counter() - t0

    first = rollout()  # compiles
    seconds = rollout()
    rows.append({"row": "grpo rollout", "shape": name,
                 "setting": f"{n_prompts}x{size.group} P={size.prompt} new={size.new}", "seconds": seconds,
                 "tokens_per_s": size.rows * size.new / seconds, "compile_s": first - seconds})
    return rows


def sft_row(config_path: str, overrides: tuple[str, ...], dtype: str, attention: Optional[str] = None) -> dict:
    from xr_jax import config as config_lib
    from xr_jax.cli.plan import model_config
    from xr_jax.models.attention import resolve_attention

    config = config_lib.load(config_path, list(overrides))
    tr = config.train
    cfg = model_config(config).replace(vision=None, dtype=dtype)
    cfg = cfg.replace(attention=attention or cfg.attention)
    rows = max(1, tr.batch_size // (PAPER_DEVICES * tr.microbatches))
    batch = train_step.batch_arrays(rows, tr.seq_len, cfg.text.vocab_size)
    t0 = time.perf_counter()
    run = train_step.jax_runner(cfg, batch, 1, 1, tr.loss_chunk)
    warm = time.perf_counter() - t0
    step_s = min(run(2) for _ in range(2))
    tokens = rows * tr.seq_len
    peak = flops.peak_flops()
    return {"row": "sft", "shape": f"{config.model.preset} text, remat {cfg.remat}, "
                                   f"attention {resolve_attention(cfg.attention, False, cfg.dtype)}",
            "setting": f"{rows}x{tr.seq_len} per device", "tokens_per_s": tokens / step_s, "step_ms": step_s * 1e3,
            "mfu": flops.text_train_flops(cfg, tokens, tr.seq_len) / step_s / peak if peak else None,
            "compile_s": warm}


def skipped(row: str) -> dict:
    return {"row": row, "skipped": "time budget spent"}


def table(rows: list[dict]) -> str:
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    lines = ["| row | shape | setting | tokens/s | step ms / s | of roofline / MFU | compile s | token loop |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | | | | | | | skipped: {r['skipped']} |")
            continue
        timing = f"{r['step_ms']:.2f} ms" if "step_ms" in r else f"{r['seconds']:.2f} s"
        frac = pct(r["roofline"]) if r["row"] == "decode" else pct(r["mfu"]) if r["row"] == "sft" else ""
        loop = (f"trip count {r['known_trip_count']}, collectives {r['collectives'] or 0}, "
                f"{r['layer_sized_moves']} layer-sized moves" if r["row"] == "decode" else "")
        lines.append(f"| {r['row']} | {r['shape']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {timing} | {frac} | "
                     f"{r['compile_s']:.1f} | {loop} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpu on a GPU, else tiny")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("--layers", type=int, default=None, help="cut the decode model to this many layers")
    ap.add_argument("--sft-config", default="configs/x_reasoner_sft_3b.yaml")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="unix time after which rows are skipped")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    size = SIZES[args.size or ("gpu" if on_gpu else "tiny")]
    dtype = "bfloat16" if on_gpu else "float32"
    os.makedirs(args.out, exist_ok=True)
    rows = (decode_and_rollout_rows(size, dtype, args.layers, args.out, args.deadline) if time.time() < args.deadline
            else [skipped("decode"), skipped("grpo rollout")])
    rows.append(sft_row(args.sft_config, size.sft_overrides, dtype) if time.time() < args.deadline else skipped("sft"))
    if on_gpu:  # the pre-Hopper kernel on this GPU too; a failure is a row, not the end of the others
        try:
            rows.append(sft_row(args.sft_config, size.sft_overrides, dtype, "pallas_gpu")
                        if time.time() < args.deadline else skipped("sft"))
        except Exception as e:  # noqa: BLE001
            rows.append({"row": "sft", "skipped": f"pallas_gpu failed: {type(e).__name__}: {str(e)[:200]}"})
    with open(os.path.join(args.out, "gpu_rows.json"), "w") as f:
        json.dump({"machine": machine.describe(), "rows": rows}, f, indent=1)
    suite = os.path.join(args.out, "bench.json")
    if os.path.exists(suite):
        from bench.__main__ import table as suite_table

        with open(suite) as f:
            s = json.load(f)
        print("\n" + suite_table(s["machine"], s["ceilings"], s["rows"]))
    print("\n" + table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
