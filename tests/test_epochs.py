"""`train.epochs` as passes over real rows (GSM8K): exact steps per epoch, decay at the true epoch ends, resume
mid-epoch; truncation counts; the overflow modes (truncate / drop / chunk)."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from xr_jax import config as config_lib
from xr_jax.data import pipeline as P
from xr_jax.data import sources
from xr_jax.data.tokenizer import load_tokenizer
from xr_jax.train import grpo, sft
from xr_jax.train.state import make_schedule

FIXTURE = str(pathlib.Path(__file__).parent / "fixtures" / "data" / "gsm8k_test_50.jsonl")
LR = 1e-5


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def src():
    return sources.load_source(FIXTURE, "gsm8k")


def _config(tmp_path, *extra):
    return config_lib.load(None, [
        "data.source=gsm8k", f"data.path={FIXTURE}", "model.tokenizer=qwen2.5", "train.epochs=4", "train.batch_size=2",
        "train.seq_len=384", f"logging.dir={tmp_path}", "optim.schedule=step_decay", f"optim.lr={LR}", *extra])


def _epochs_of_batches(pipe) -> list[int]:
    """The epoch of every batch the pipeline gives (its iterator says where it stands)."""
    it = iter(pipe)
    return [it.epoch for _ in it]


def test_epochs_counted_from_gsm8k_and_decay_at_the_true_epoch_ends(tmp_path, tok, src):
    cfg = _config(tmp_path)
    plan = sft.plan_steps(cfg, tok)
    # first-fit packing depends on the order: every epoch's shuffle packs its rows into a different count
    assert plan.epoch_batches == (21, 21, 20, 22) and plan.total == plan.schedule_steps == 84 and plan.num_epochs == 4
    # the real pipeline, run to its end without the counted limits, gives those batches per epoch
    free = dataclasses.replace(sft.sft_data_config(cfg, plan), epoch_batches=None)
    epochs = _epochs_of_batches(P.sft_pipeline(src, tok, free, process_index=0, process_count=1))
    assert [epochs.count(e) for e in range(4)] == [21, 21, 20, 22]
    # the x0.8 decay lands on the first step of each epoch, wherever the counts put it
    schedule = make_schedule(cfg.optim, plan.schedule_steps, plan.epoch_steps)
    lrs = [float(schedule(s)) for s in range(plan.total)]
    assert lrs == pytest.approx([LR * 0.8 ** e for e in epochs], rel=1e-6)
    assert [s for s in range(1, plan.total) if lrs[s] < lrs[s - 1]] == [21, 42, 62]
    # several hosts: each epoch is as long as the shortest host's pass (every host stops at the same step)
    table = P.RowTable.load(next(str(p) for p in (tmp_path / "data_cache").iterdir()))
    counts = P.sft_epoch_batches(table, free, 4, process_count=2)
    hosts = [_epochs_of_batches(P.sft_pipeline(src, tok, free, process_index=i, process_count=2)) for i in range(2)]
    assert counts == tuple(min(h.count(e) for h in hosts) for e in range(4))
    # the summary is written beside the metrics; a second start reads the cached pass instead of encoding again
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["steps_per_epoch"] == [21, 21, 20, 22] and summary["used"] == 50
    import xr_jax.data.pipeline as pipeline_module

    def no_encoding(*args, **kwargs):
        raise AssertionError("measured again")

    original, pipeline_module.measure_rows = pipeline_module.measure_rows, no_encoding
    try:
        assert sft.plan_steps(cfg, tok) == plan
    finally:
        pipeline_module.measure_rows = original
    # a different seq_len is a different pass (another cache entry, other counts)
    assert sft.plan_steps(_config(tmp_path, "train.seq_len=256"), tok).epoch_batches == (25, 25, 25, 25)


def test_resume_mid_epoch_keeps_the_epoch_and_the_schedule(tmp_path, tok, src):
    cfg = _config(tmp_path)
    plan = sft.plan_steps(cfg, tok)
    data_cfg = sft.sft_data_config(cfg, plan)
    it = iter(P.sft_pipeline(src, tok, data_cfg, process_index=0, process_count=1))
    for _ in range(21 + 5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert (state["epoch"], state["batches"]) == (1, 5)
    rest = [(it.epoch, b["input_ids"].tolist()) for b in it]
    # a restarted process: the plan is derived again (same counts), the iterator continues mid-epoch 2
    plan2 = sft.plan_steps(_config(tmp_path), tok)
    assert plan2 == plan
    resumed = iter(P.sft_pipeline(src, tok, sft.sft_data_config(cfg, plan2), process_index=0, process_count=1))
    resumed.set_state(state)
    assert (resumed.epoch, resumed.batches) == (1, 5)
    assert [(resumed.epoch, b["input_ids"].tolist()) for b in resumed] == rest
    assert resumed.stats.state() == it.stats.state()
    assert len(rest) == plan.total - 26
    s1 = make_schedule(cfg.optim, plan.schedule_steps, plan.epoch_steps)
    s2 = make_schedule(cfg.optim, plan2.schedule_steps, plan2.epoch_steps)
    assert [float(s1(s)) for s in range(84)] == [float(s2(s)) for s in range(84)]


def test_sft_main_resumed_mid_epoch_logs_the_epochs_and_decays_on_time(tmp_path):
    """The trainer end to end: stopped by `train.steps` inside epoch 2, resumed for both epochs; every
    step's logged epoch and lr follow the counted plan, and the truncation counters are in metrics.jsonl."""
    base = ["data.source=gsm8k", f"data.path={FIXTURE}", "model.tokenizer=tiny", "train.epochs=2", "train.seq_len=1024",
            "train.batch_size=4", "mesh.shape=[1,1,1]", "train.loss_chunk=256", "optim.schedule=step_decay", "optim.lr=1e-3", "optim.warmup_steps=0",
            f"logging.dir={tmp_path}", "logging.progress=false", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "checkpoint.every=100", "checkpoint.async_save=false"]
    from xr_jax.data.tokenizer import load_tokenizer as load

    plan = sft.plan_steps(config_lib.load("configs/tiny_sft.yaml", base + ["train.steps=null"]), load("tiny"))
    first = plan.epoch_batches[0]
    sft.main(config_lib.load("configs/tiny_sft.yaml", base + [f"train.steps={first + 2}"]))
    last = sft.main(config_lib.load("configs/tiny_sft.yaml", base + ["train.steps=null"]))
    assert last["step"] == plan.total == sum(plan.epoch_batches)
    records = {}
    for line in open(tmp_path / "metrics.jsonl"):
        r = json.loads(line)
        records[r["step"]] = r
    assert sorted(records) == list(range(1, plan.total + 1))
    ends = np.cumsum(plan.epoch_batches)
    for step, r in records.items():
        epoch = int(np.searchsorted(ends, step, side="left"))  # 0-based epoch of step `step` (1-based)
        assert r["epoch"] == epoch + 1, (step, r["epoch"])
        assert r["lr"] == pytest.approx(1e-3 * 0.8 ** epoch, rel=1e-6)
        assert 0.0 <= r["data_lost_think_frac"] <= r["data_truncated_frac"] <= 1.0
    assert records[plan.total]["data_truncated_frac"] > 0  # byte tokens: several GSM8K traces exceed 1024


def test_truncation_counts_on_rows_of_known_length(tok, src):
    """GSM8K at 256 tokens per row: the rows longer than 257 tokens (the whole conversation, tokenised as one
    string) are cut; those whose response's `</think>` lies past the cut lose it."""
    max_len = 256
    table = P.measure_rows(src, lambda ex: P.encode_sft(ex, tok, P.SFTConfig(max_len=max_len)), "input_ids")
    whole = [tok.encode(tok.apply_chat_template(P._messages(src[i], P.PromptConfig(), src[i].response)))
             for i in range(len(src))]
    long_rows = [i for i, ids in enumerate(whole) if len(ids) > max_len + 1]
    # the prompt itself names the tags: a row lost its `</think>` when the cut keeps fewer of them than it had
    lost_think = [i for i in long_rows
                  if tok.decode(whole[i][:max_len + 1]).count("</think>") < tok.decode(whole[i]).count("</think>")]
    assert (len(long_rows), len(lost_think)) == (14, 13)
    assert np.flatnonzero(table.flags["truncated"]).tolist() == long_rows
    assert np.flatnonzero(table.flags["lost_think"]).tolist() == lost_think
    assert np.flatnonzero(table.flags["lost_answer"]).tolist() == long_rows  # the answer comes last
    summary = table.summary()
    assert (summary["truncated"], summary["lost_think"], summary["truncated_frac"]) == (14, 13, 0.28)
    assert table.lengths.tolist() == [min(len(ids), max_len + 1) - 1 for ids in whole]
    # the pipeline counts the same examples as it reads them (one epoch, nothing dropped)
    pipe = P.sft_pipeline(src, tok, P.SFTConfig(max_len=max_len, batch_size=2, drop_remainder=False),
                          process_index=0, process_count=1)
    for _ in pipe:
        pass
    assert (pipe.stats.examples, pipe.stats.truncated, pipe.stats.lost_think) == (50, 14, 13)


def _segments(batch):
    """(input_ids, targets, loss_mask) of every segment of every row, in row order."""
    out = []
    for r in range(len(batch["segment_ids"])):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            out.append((batch["input_ids"][r][m], batch["targets"][r][m], batch["loss_mask"][r][m]))
    return out


def test_overflow_drop_removes_exactly_the_long_rows(tok, src):
    max_len = 256
    truncate = P.SFTConfig(max_len=max_len, batch_size=2, shuffle=False, drop_remainder=False)
    encoded = [P.encode_sft(src[i], tok, truncate) for i in range(len(src))]
    long_rows = {i for i, e in enumerate(encoded) if e["truncated"]}
    drop = dataclasses.replace(truncate, overflow="drop")
    pipe = P.sft_pipeline(src, tok, drop, process_index=0, process_count=1)
    kept = [tuple(ids.tolist()) for b in pipe for ids, _, _ in _segments(b)]
    assert sorted(kept) == sorted(tuple(e["input_ids"].tolist()) for i, e in enumerate(encoded) if i not in long_rows)
    assert len(long_rows) == 14 and pipe.stats.skipped == {"too_long": 14} and pipe.stats.truncated == 0
    table = P.measure_rows(src, lambda ex: P.encode_sft(ex, tok, drop), "input_ids")
    assert table.summary()["skipped"] == {"too_long": 14}


def test_overflow_chunk_keeps_every_token(tok, src):
    max_len = 256
    chunk = P.SFTConfig(max_len=max_len, batch_size=2, shuffle=False, drop_remainder=False, overflow="chunk")
    examples = [P.encode_sft(src[i], tok, chunk) for i in range(len(src))]
    assert max(len(e["input_ids"]) for e in examples) > max_len and not any(e["truncated"] for e in examples)
    pipe = P.sft_pipeline(src, tok, chunk, process_index=0, process_count=1)
    batches = list(pipe)
    rows = [(b["input_ids"][r], b["targets"][r], b["loss_mask"][r], b["segment_ids"][r])
            for b in batches for r in range(len(b["input_ids"]))]
    assert all(len(r[0]) == max_len for r in rows)
    # the rows, read in order without their padding, are the examples one after the other: no token is lost
    used = [np.concatenate([r[k][r[3] > 0] for r in rows]) for k in range(3)]
    for k, key in enumerate(("input_ids", "targets", "loss_mask")):
        np.testing.assert_array_equal(used[k], np.concatenate([e[key] for e in examples]))
    assert all((r[3] > 0).all() for r in rows[:-1])  # only the last row has padding
    pad = rows[-1][3] == 0
    assert (rows[-1][0][pad] == tok.special.pad).all() and (rows[-1][1][pad] == tok.special.pad).all()
    assert pipe.stats.truncated == 0 and pipe.stats.examples == 50


@pytest.mark.parametrize("overflow,pack", [("truncate", True), ("truncate", False), ("drop", True), ("chunk", True)])
def test_counted_epochs_match_the_pipeline_in_every_mode(tok, src, overflow, pack):
    cfg = P.SFTConfig(max_len=256, batch_size=4, overflow=overflow, pack=pack, num_epochs=2, seed=3)
    table = P.measure_rows(src, lambda ex: P.encode_sft(ex, tok, cfg), "input_ids")
    epochs = _epochs_of_batches(P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1))
    assert P.sft_epoch_batches(table, cfg, 2) == (epochs.count(0), epochs.count(1))


def test_grpo_epochs_count_usable_prompts_and_warm_up_over_all_epochs(tmp_path, tok, src):
    budget = 150
    cfg = config_lib.load("configs/x_reasoner_grpo.yaml", [
        "data.source=gsm8k", f"data.path={FIXTURE}", "model.tokenizer=qwen2.5", "train.batch_size=4",
        f"grpo.max_prompt_len={budget}", f"logging.dir={tmp_path}", "grpo.minibatches=2"])
    assert cfg.train.epochs == 3 and cfg.total_steps is None
    plan = grpo.plan_steps(cfg, tok)
    lengths = [len(tok.encode(tok.apply_chat_template(P._messages(src[i], P.PromptConfig()), True)))
               for i in range(len(src))]
    usable = sum(n <= budget for n in lengths)
    assert 0 < usable < 50 and plan.epoch_batches == (usable // 4,) * 3 and plan.total == 3 * (usable // 4)
    epochs = _epochs_of_batches(P.rl_pipeline(src, tok, grpo.prompt_batch_config(cfg, plan), process_index=0,
                                              process_count=1))
    assert [epochs.count(e) for e in range(3)] == [usable // 4] * 3
    updates = plan.scaled(grpo.updates_per_step(cfg.grpo))  # 2 minibatches x 1 pass: two updates per rollout step
    schedule = make_schedule(cfg.optim, updates.schedule_steps, updates.epoch_steps)
    warmup = int(0.1 * 2 * plan.total)  # the paper's 10% of all steps of all 3 epochs
    assert float(schedule(warmup)) == pytest.approx(cfg.optim.lr) and float(schedule(warmup - 1)) < cfg.optim.lr
    # train.steps stops the run early but keeps the schedule of the 3 epochs
    capped = grpo.plan_steps(config_lib.load("configs/x_reasoner_grpo.yaml", [
        "data.source=gsm8k", f"data.path={FIXTURE}", "model.tokenizer=qwen2.5", "train.batch_size=4",
        f"grpo.max_prompt_len={budget}", f"logging.dir={tmp_path}", "train.steps=2"]), tok)
    assert capped.total == 2 and capped.schedule_steps == plan.total


def test_fixed_steps_per_epoch_override_needs_no_count(tmp_path, tok):
    cfg = _config(tmp_path, "train.steps_per_epoch=7")
    plan = sft.plan_steps(cfg, tok)
    assert (plan.total, plan.epoch_steps, plan.num_epochs, plan.epoch_batches) == (28, 7, None, None)
    assert not os.path.exists(tmp_path / "data_cache")
    with pytest.raises(ValueError, match="'random' has no epochs"):
        sft.plan_steps(config_lib.load(None, ["train.epochs=2"]), None)
