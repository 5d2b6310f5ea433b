"""`xr-jax demo`: the whole recipe in miniature, on CPU, from scratch, with no downloads.

A small Qwen2.5-VL-architecture model (random init, preset `demo-vl`, the byte-level `tiny` tokenizer) and the
built-in synthetic arithmetic task, as text and rendered into images:
  stage 0  "base": a short SFT that makes the VLM a base model: it answers text and image problems directly
           and transcribes images ("The expression is 2 + 3."), i.e. its language side learns to read the
           (frozen, random) vision tower's features, as OCR pre-training teaches a real VLM;
  stage 1  SFT on text-only chain-of-thought traces (`<think>…</think><answer>…</answer>`) that open by
           restating the problem, under a reasoning instruction;
  stage 2  GRPO on text only (math reward, group advantages, clip-higher, k3 KL);
  eval     greedy with forced exit on held-out text and image problems, for base / SFT / SFT+GRPO, each model
           with the prompt of its last stage, the same for text and images (`EVAL_TEMPLATE`).
It prints the table (accuracy on text and image problems, how often image answers restate the image, how
often each model transcribes an image when asked), and writes each stage's checkpoints and metrics log plus
a PNG with one panel per stage and metric: the paper's question — does text-only reasoning training transfer
to images? — at toy scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from xr_jax import config as config_lib
from xr_jax.data.synthetic import READ_QUESTION


@dataclasses.dataclass(frozen=True)
class DemoSize:
    base_steps: int
    sft_steps: int
    grpo_steps: int
    eval_problems: int


FULL = DemoSize(base_steps=800, sft_steps=100, grpo_steps=12, eval_problems=64)
QUICK = DemoSize(base_steps=12, sft_steps=20, grpo_steps=2, eval_problems=16)

IMAGE_SIZE = (56, 112)  # 4 x 8 patches, 8 image tokens: short rows, so the base stage sees many examples
TASK = ["model.tokenizer=tiny", "data.source=synthetic", "data.synthetic.max_steps=1", "data.synthetic.max_operand=3",
        f"data.synthetic.image_size=[{IMAGE_SIZE[0]},{IMAGE_SIZE[1]}]", "data.system=", "optim.schedule=constant",
        # The vision tower stays at its random init in every stage, standing in for a pre-trained encoder: trained
        # from scratch in the base stage (lr 2e-3) its outputs collapsed to one vector for every image.
        "train.freeze_vision=true"]
# The base stage's mix (batch size a multiple of 4: every batch holds the same mix, so one compiled program).
BASE_TASKS = "[text-direct,image-read,image-direct,image-read]"
# Stages 1-2: the reasoning instruction, and traces that open by restating the problem.
REASONING = ["data.prompt_template=think", "data.synthetic.restate=true"]
# Each model is asked as in its last training stage (the same template for text and image problems): the base
# model with the bare question, the SFT and SFT+GRPO models with the reasoning instruction.
EVAL_TEMPLATE = {"base": "plain", "sft": "think", "grpo": "think"}
MAX_THINK, MAX_ANSWER = 64, 12  # a restating trace is about 45 tokens


def _stage(name: str, out: str, overrides: list[str]):
    cfg = config_lib.load(None, TASK + [f"logging.dir={out}/{name}", f"checkpoint.dir={out}/{name}/checkpoints",
                                        f"train.export_dir={out}/{name}/model", "checkpoint.every=1000"] + overrides)
    with open(os.path.join(out, f"{name}.config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2, default=str)
    return cfg


def evaluate(model_dir: str, task: str, n: int, pool, template: str = "think", seed: int = 1234) -> tuple[float, float]:
    """(accuracy, read) of greedy decoding with forced exit on `n` held-out problems of synthetic `task` (a seed no
    training stage used), scored by the `math` reward in the `RewardPool` `pool` (model output is never checked
    in this process). `read`: the fraction of outputs that state the problem's expression ("The expression is
    2 + 3.") — on image problems, whether the model read the image."""
    from xr_jax.checkpoints import convert
    from xr_jax.data import pipeline
    from xr_jax.data.synthetic import SyntheticConfig, make_problem, statement, synthetic_source
    from xr_jax.data.tokenizer import load_tokenizer
    from xr_jax.sampling.sampler import ForcedExit, Prompt, Sampler, SamplingConfig

    tok = load_tokenizer("tiny")
    cfg, params = convert.load_model(model_dir)
    scfg = SyntheticConfig(num_examples=n, seed=seed, max_steps=1, max_operand=3, image_size=IMAGE_SIZE, tasks=(task,))
    src = synthetic_source(scfg)
    pcfg = pipeline.PromptBatchConfig(prompt=pipeline.PromptConfig(template=template, system=""))
    prompts, answers = [], []
    for i in range(n):
        enc = pipeline.encode_prompt(src[i], tok, pcfg)
        prompts.append(Prompt(enc["prompt_ids"], enc.get("pixel_values"), enc.get("image_grid_thw")))
        answers.append(enc["answer"])
    sampling = SamplingConfig(temperature=0.0, max_think=MAX_THINK, max_answer=MAX_ANSWER,
                              stop_ids=tok.special.stop_ids, pad_id=tok.special.pad, prompt_buckets=(128, 256))
    out = Sampler(cfg, sampling, ForcedExit.from_tokenizer(tok, cfg.text.vocab_size)).generate(params, prompts)
    texts = [tok.decode([t for t in out.row_ids(i) if t < tok.vocab_size], skip_special_tokens=True) for i in range(n)]
    scores, _ = pool.score_batch("math", texts, answers)
    accuracy = float(np.mean(scores))
    read = float(np.mean([statement(make_problem(scfg, i)) in t for i, t in enumerate(texts)]))
    return accuracy, read


def main(out_dir: str = "runs/demo", quick: bool = False) -> dict:
    from xr_jax.cli.plot import plot_panels
    from xr_jax.rewards import RewardPool
    from xr_jax.train import grpo, sft

    size = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    print(f"xr-jax demo ({'quick' if quick else 'full'}): writing to {out_dir}", flush=True)
    stages = [
        ("base", sft.main, ["model.preset=demo-vl", f"data.synthetic.tasks={BASE_TASKS}", "data.shuffle=false",
                            "data.prompt_template=plain", "data.pack=false",
                            "train.batch_size=16", "train.seq_len=112", "optim.lr=2e-3",
                            f"train.steps={size.base_steps}"]),
        ("sft", sft.main, [f"model.path={out_dir}/base/model", *REASONING, "train.batch_size=16",
                           "train.seq_len=540", "optim.lr=2e-3", f"train.steps={size.sft_steps}"]),
        ("grpo", grpo.main, [f"model.path={out_dir}/sft/model", *REASONING, "data.synthetic.seed=1",
                             "train.batch_size=16", "grpo.group_size=8", "grpo.max_prompt_len=128",
                             "grpo.max_new_tokens=96", "grpo.rewards=[{name: math, weight: 1.0}, {name: format, weight: 0.5}]",
                             "optim.lr=1e-4", f"train.steps={size.grpo_steps}"]),
    ]
    for name, run, overrides in stages:
        print(f"\n== stage {name}", flush=True)
        run(_stage(name, out_dir, overrides))
    print("\n== evaluation (greedy, forced exit: thinking budget "
          f"{MAX_THINK} tokens, answer {MAX_ANSWER})", flush=True)
    table = {}
    with RewardPool(2) as pool:
        for name, _, _ in stages:
            model = f"{out_dir}/{name}/model"
            (text, _), (image, restates) = (evaluate(model, task, size.eval_problems, pool, EVAL_TEMPLATE[name])
                                            for task in ("text-cot", "image-cot"))
            # The precondition of transfer, for every model alike: can it read? (the transcription question of
            # the base stage, under the bare-question template the base stage trained it with)
            _, transcribes = evaluate(model, "image-read", size.eval_problems, pool, template="plain")
            table[name] = {"text": text, "image": image, "image_restates": restates, "transcribes": transcribes}
    summary = results_table(table, size.eval_problems)
    figure = f"{out_dir}/curves.png"
    png = plot_panels([(f"{out_dir}/{stage}", metric, title) for stage, metric, title in PANELS], out=figure)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"results": table, "eval_problems": size.eval_problems, "columns": COLUMNS,
                   "seconds": time.perf_counter() - t0, "quick": quick}, f, indent=2)
    print("\n" + summary)
    print(f"\ncurves: {figure} ({len(png)} panels); metrics: {out_dir}/*/metrics.jsonl; "
          f"{time.perf_counter() - t0:.0f} s")
    return table


# The figure: one panel per stage and metric (an SFT loss and GRPO's surrogate loss do not share an axis).
PANELS = [
    ("base", "loss", "base stage: SFT loss (nats/token)"),
    ("sft", "loss", "SFT stage: loss (nats/token)"),
    ("grpo", "accuracy", "GRPO: math reward (rollout accuracy)"),
    ("grpo", "reward_format", "GRPO: format reward (weight 0.5)"),
    ("grpo", "reward_mean", "GRPO: total reward = math + 0.5 x format"),
    ("grpo", "loss", "GRPO: policy loss (surrogate, ~0 by design)"),
]
COLUMNS = {
    "text": "text acc: correct answers on held-out text problems (greedy, forced exit), asked with the model's "
            "last-stage prompt (base: the bare question; SFT, SFT+GRPO: the reasoning instruction)",
    "image": "image acc: the same on the same kind of problems rendered into an image",
    "image_restates": "image restates: image-problem outputs that state the expression in the image (\"The "
                      "expression is 2 + 3.\"), as the SFT traces open; the base answers directly, so its 0% "
                      "says nothing about reading",
    "transcribes": f"transcribes: images whose expression the model states (\"The expression is 2 + 3.\") when "
                   f"asked \"{READ_QUESTION}\" (bare-question prompt): can it read the image at all, the "
                   "precondition of transfer",
}


def results_table(table: dict, n: int) -> str:
    """The markdown table, each column explained below it (shares of `n` held-out problems per cell)."""
    labels = {"base": "base", "sft": "SFT", "grpo": "SFT+GRPO"}
    rows = [f"| {'model':10s} | text acc | image acc | image restates | transcribes |", "|---|---|---|---|---|"]
    rows += [f"| {labels[k]:10s} | {v['text']:8.1%} | {v['image']:9.1%} | {v['image_restates']:14.1%} | "
             f"{v['transcribes']:11.1%} |" for k, v in table.items()]
    return "\n".join(rows + ["", f"{n} held-out problems per cell."] + [f"- {text}" for text in COLUMNS.values()])
