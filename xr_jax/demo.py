"""`xr-jax demo`: the whole recipe in miniature, on CPU, from scratch, with no downloads.

A small Qwen2.5-VL-architecture model (random init, the byte-level `tiny` tokenizer) and the built-in
synthetic arithmetic task, as text and rendered into images:
  stage 0  "base": a short SFT in which the model reads rendered problems and answers directly;
  stage 1  SFT on text-only chain-of-thought traces (`<think>…</think><answer>…</answer>`);
  stage 2  GRPO on text only (math reward, group advantages, clip-higher, k3 KL);
  eval     greedy with forced exit on held-out text and image problems, for base / SFT / SFT+GRPO.
It prints the accuracy table, and writes each stage's checkpoints and metrics log plus a PNG of the curves:
the paper's question — does text-only reasoning training transfer to images? — at toy scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from xr_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class DemoSize:
    base_steps: int
    sft_steps: int
    grpo_steps: int
    eval_problems: int


FULL = DemoSize(base_steps=150, sft_steps=150, grpo_steps=12, eval_problems=64)
QUICK = DemoSize(base_steps=12, sft_steps=20, grpo_steps=2, eval_problems=16)

TASK = ["data.tokenizer=tiny", "data.source=synthetic", "data.synthetic.max_steps=1", "data.synthetic.max_operand=3",
        "data.prompt_template=plain", "optim.schedule=constant", "train.freeze_vision=false"]
MAX_THINK, MAX_ANSWER = 40, 12


def _stage(name: str, out: str, overrides: list[str]):
    cfg = config_lib.load(None, TASK + [f"logging.dir={out}/{name}", f"checkpoint.dir={out}/{name}/checkpoints",
                                        f"train.export_dir={out}/{name}/model", "checkpoint.every=1000"] + overrides)
    with open(os.path.join(out, f"{name}.config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2, default=str)
    return cfg


def evaluate(model_dir: str, images: bool, n: int, seed: int = 1234) -> float:
    """Greedy accuracy with forced exit on `n` held-out problems (a seed no training stage used)."""
    from xr_jax import convert, rewards
    from xr_jax.data import pipeline
    from xr_jax.data.synthetic import SyntheticConfig, synthetic_source
    from xr_jax.data.tokenizer import load_tokenizer
    from xr_jax.eval_model import token_byte_table
    from xr_jax.sampling import ForcedExit, Prompt, Sampler, SamplingConfig

    tok = load_tokenizer("tiny")
    cfg, params = convert.load_model(model_dir)
    src = synthetic_source(SyntheticConfig(num_examples=n, seed=seed, max_steps=1, max_operand=3,
                                                 tasks=("image-cot",) if images else ("text-cot",)))
    pcfg = pipeline.PromptBatchConfig(prompt=pipeline.PromptConfig(template="plain"))
    prompts, answers = [], []
    for i in range(n):
        enc = pipeline.encode_prompt(src[i], tok, pcfg)
        prompts.append(Prompt(enc["prompt_ids"], enc.get("pixel_values"), enc.get("image_grid_thw")))
        answers.append(enc["answer"])
    scfg = SamplingConfig(temperature=0.0, max_think=MAX_THINK, max_answer=MAX_ANSWER, stop_ids=tok.special.stop_ids,
                          pad_id=tok.special.pad, prompt_buckets=(128, 256))
    forced = ForcedExit.build(tok.encode("</think>"), token_byte_table(tok, cfg.text.vocab_size), cfg.text.vocab_size)
    out = Sampler(cfg, scfg, forced).generate(params, prompts)
    score = rewards.get("math")
    texts = [tok.decode([t for t in out.row_ids(i) if t < tok.vocab_size], skip_special_tokens=True) for i in range(n)]
    return float(np.mean([score(t, a) for t, a in zip(texts, answers)]))


def main(out_dir: str = "runs/demo", quick: bool = False) -> dict:
    from xr_jax.plot import plot_runs
    from xr_jax.train import grpo, sft

    size = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    print(f"xr-jax demo ({'quick' if quick else 'full'}): writing to {out_dir}", flush=True)
    stages = [
        ("base", sft.main, ["model.preset=tiny-vl", "data.synthetic.tasks=[image-direct]",
                            "data.pack=false", "train.batch_size=8", "train.seq_len=192", "optim.lr=2e-3",
                            f"train.steps={size.base_steps}"]),
        ("sft", sft.main, [f"model.path={out_dir}/base/model", "train.batch_size=16", "train.seq_len=512",
                           "optim.lr=2e-3", f"train.steps={size.sft_steps}"]),
        ("grpo", grpo.main, [f"model.path={out_dir}/sft/model", "data.synthetic.seed=1", "train.batch_size=16",
                             "grpo.group_size=8", "grpo.max_prompt_len=128", "grpo.max_new_tokens=64",
                             "grpo.format_weight=0.5", "optim.lr=5e-4", f"train.steps={size.grpo_steps}"]),
    ]
    for name, run, overrides in stages:
        print(f"\n== stage {name}", flush=True)
        run(_stage(name, out_dir, overrides))
    print("\n== evaluation (greedy, forced exit: thinking budget "
          f"{MAX_THINK} tokens, answer {MAX_ANSWER})", flush=True)
    table = {name: {kind: evaluate(f"{out_dir}/{name}/model", kind == "image", size.eval_problems)
                    for kind in ("text", "image")} for name, _, _ in stages}
    rows = [f"| {'model':10s} | text acc | image acc |", "|---|---|---|"]
    labels = {"base": "base", "sft": "SFT", "grpo": "SFT+GRPO"}
    rows += [f"| {labels[k]:10s} | {v['text']:8.1%} | {v['image']:9.1%} |" for k, v in table.items()]
    png = plot_runs([f"{out_dir}/{n}" for n in ("sft", "grpo")], metrics=["loss", "reward_mean", "accuracy"],
                    out=f"{out_dir}/curves.png")
    summary = "\n".join(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"accuracy": table, "seconds": time.perf_counter() - t0, "quick": quick}, f, indent=2)
    print("\n" + summary)
    print(f"\ncurves: {out_dir}/curves.png ({', '.join(png)}); metrics: {out_dir}/*/metrics.jsonl; "
          f"{time.perf_counter() - t0:.0f} s")
    return table
