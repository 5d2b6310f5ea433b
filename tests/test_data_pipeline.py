"""Grain pipelines: packing invariants, loss mask, segment-separated attention, epochs, hosts, resume, bad rows."""

import collections
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.pipeline_reference import attention_mask
from xr_jax.data import pipeline as P
from xr_jax.data import sources, synthetic
from xr_jax.data.tokenizer import load_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
GSM8K = str(FIXTURES / "gsm8k_test_50.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2.5")


def _conversation(tok, example, prompt=P.PromptConfig()):
    messages = P._messages(example, prompt, example.response)
    return tok.apply_chat_template(messages)


def _segments(batch):
    """(full token ids, target-mask ids) of every packed example in a batch."""
    out = []
    for row in range(len(batch["input_ids"])):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = np.nonzero(seg == s)[0]
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a segment must be contiguous"
            np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
            ids = list(batch["input_ids"][row, where]) + [batch["targets"][row, where[-1]]]
            np.testing.assert_array_equal(batch["targets"][row, where[:-1]], batch["input_ids"][row, where[1:]])
            mask = batch["loss_mask"][row, where] > 0
            out.append((ids, list(batch["targets"][row, where][mask])))
        pad = seg == 0
        assert np.all(batch["loss_mask"][row, pad] == 0) and np.all(batch["positions"][row, pad] == 0)
    return out


def test_packing_each_example_once_loss_mask_on_assistant_tokens(tok):
    src = sources.load_source(GSM8K, "gsm8k")
    cfg = P.SFTConfig(max_len=1024, batch_size=4, num_epochs=1, drop_remainder=False, seed=1)
    pipe = P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1)
    batches = list(pipe)
    assert all(b["input_ids"].shape == (4, 1024) and b["input_ids"].dtype == np.int32 for b in batches[:-1])
    assert all(b["loss_mask"].dtype == np.float32 for b in batches)
    segments = [s for b in batches for s in _segments(b)]
    examples = [src[i] for i in range(len(src))]
    expected = collections.Counter(_conversation(tok, ex) for ex in examples)
    assert collections.Counter(tok.decode(ids) for ids, _ in segments) == expected  # each exactly once
    responses = {_conversation(tok, ex): ex.response for ex in examples}
    for ids, target_ids in segments:
        assert tok.decode(target_ids) == responses[tok.decode(ids)] + "<|im_end|>"
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(examples) / 2  # several examples per row
    assert pipe.stats.examples == 50 and pipe.stats.skipped == {} and pipe.stats.truncated == 0


def test_attention_mask_never_crosses_segments(tok):
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=40))
    batch = next(iter(P.sft_pipeline(src, tok, P.SFTConfig(max_len=512, batch_size=2), process_index=0, process_count=1)))
    seg = batch["segment_ids"]
    mask = attention_mask(seg)
    assert mask.shape == (2, 512, 512)
    for row in range(2):
        q, k = np.nonzero(mask[row])
        assert np.all(seg[row, q] == seg[row, k]) and np.all(k <= q) and np.all(seg[row, q] > 0)
        sizes = np.bincount(seg[row])[1:]
        assert len(sizes) > 3 and mask[row].sum() == sum(n * (n + 1) // 2 for n in sizes)


def test_truncation_and_prompt_too_long(tok):
    src = sources.load_source(GSM8K, "gsm8k")
    lengths = [len(tok.encode(_conversation(tok, src[i]))) for i in range(len(src))]
    prompt_lengths = [len(tok.encode(tok.apply_chat_template(P._messages(src[i], P.PromptConfig()), True))) for i in range(len(src))]
    max_len = 150
    cfg = P.SFTConfig(max_len=max_len, batch_size=2, num_epochs=1, drop_remainder=False, shuffle=False)
    pipe = P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1)
    segments = [s for b in pipe for s in _segments(b)]
    assert all(len(ids) - 1 <= max_len for ids, _ in segments)
    too_long = sum(p >= max_len for p in prompt_lengths)
    truncated = sum(n > max_len + 1 and p < max_len for n, p in zip(lengths, prompt_lengths))
    assert too_long > 0 and truncated > 0
    assert pipe.stats.skipped == {"prompt_too_long": too_long} and pipe.stats.truncated == truncated
    assert len(segments) == 50 - too_long


def test_padding_mode_with_images(tok):
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=6, tasks=("image-cot",), image_size=(112, 224)))
    cfg = P.SFTConfig(max_len=256, batch_size=3, pack=False, num_epochs=1)
    batch = next(iter(P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1)))
    assert batch["pixel_values"].shape == (3 * 8 * 16, 1176) and batch["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 8, 16]] * 3)
    assert np.all((batch["input_ids"] == tok.special.image_pad).sum(1) == 32)
    for row in range(3):
        n = int((batch["segment_ids"][row] > 0).sum())
        assert np.all(batch["segment_ids"][row, :n] == 1) and np.all(batch["segment_ids"][row, n:] == 0)
        np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
        assert np.all(batch["input_ids"][row, n:] == tok.special.pad)
    with pytest.raises(ValueError, match="packing is text-only"):
        P.sft_pipeline(src, tok, P.SFTConfig(pack=True), process_index=0, process_count=1)


def _segment_texts(tok, pipe):
    return [tok.decode(ids) for b in pipe for ids, _ in _segments(b)]


def test_epochs_reshuffle_and_hosts_partition(tok):
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=30))
    cfg = P.SFTConfig(max_len=256, batch_size=2, num_epochs=2, drop_remainder=False)
    texts = _segment_texts(tok, P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1))
    assert collections.Counter(collections.Counter(texts).values()) == {2: 30}  # every example twice
    assert texts[:30] != texts[30:]  # a different order in epoch 2
    one_epoch = P.SFTConfig(max_len=256, batch_size=4, num_epochs=1, drop_remainder=False)
    host = [set(_segment_texts(tok, P.sft_pipeline(src, tok, one_epoch, process_index=i, process_count=2))) for i in range(2)]
    assert len(host[0]) == len(host[1]) == 15 and not host[0] & host[1]
    everything = set(_segment_texts(tok, P.sft_pipeline(src, tok, P.SFTConfig(max_len=256, batch_size=4, num_epochs=1,
                                                                                drop_remainder=False), process_index=0, process_count=1)))
    assert host[0] | host[1] == everything
    with pytest.raises(ValueError, match="not divisible by 2 processes"):
        P.sft_pipeline(src, tok, P.SFTConfig(batch_size=3), process_index=0, process_count=2)


# -- resume in a fresh process ----------------------------------------------------------------------------

RESUME_HOSTS = [(0, 1), (0, 2), (1, 2)]


def build_for_resume(kind: str, process_index: int, process_count: int):
    """The pipelines the resume test rebuilds in a fresh process (same code path as in the test)."""
    tok = load_tokenizer("qwen2.5")
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=64, seed=5))
    if kind == "sft":
        cfg = P.SFTConfig(max_len=192, batch_size=4, num_epochs=None, seed=11)
        return P.sft_pipeline(src, tok, cfg, process_index=process_index, process_count=process_count)
    cfg = P.PromptBatchConfig(batch_size=4, max_prompt_len=160, seed=11)
    return P.rl_pipeline(src, tok, cfg, process_index=process_index, process_count=process_count)


def _digest(batch) -> dict:
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in sorted(batch.items())}


RESUME_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_data_pipeline import build_for_resume, _digest
jobs = json.loads(open({jobs!r}).read())
out = []
for kind, pi, pc, state in jobs:
    it = iter(build_for_resume(kind, pi, pc))
    it.set_state(state)
    out.append([_digest(next(it)) for _ in range(3)])
print(json.dumps(out))
"""


def test_resume_in_a_fresh_process_gives_the_same_batches(tmp_path):
    k = 5
    jobs, expected = [], []
    for kind in ("sft", "rl"):
        for pi, pc in RESUME_HOSTS:
            it = iter(build_for_resume(kind, pi, pc))
            for _ in range(k):
                next(it)
            state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
            jobs.append([kind, pi, pc, state])
            expected.append([_digest(next(it)) for _ in range(3)])  # the uninterrupted run
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = RESUME_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), jobs=str(tmp_path / "jobs.json"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads(result.stdout.strip().splitlines()[-1])
    assert resumed == json.loads(json.dumps(expected))
    # the two simulated hosts see different data; the counters travel in the state
    assert expected[1] != expected[2]
    assert '"stats": {"examples": ' in json.dumps(jobs[0][3])


# -- bad rows -----------------------------------------------------------------------------------------------


def test_planted_bad_rows_are_skipped_counted_and_logged(tok, tmp_path, caplog):
    from tests.test_data_sources import write_planted_gsm8k

    expected = write_planted_gsm8k(tmp_path / "bad.jsonl")
    src = sources.load_source(str(tmp_path / "bad.jsonl"), "gsm8k")
    cfg = P.SFTConfig(max_len=1024, batch_size=4, num_epochs=1, drop_remainder=False)
    pipe = P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="xr_jax.data"):
        n = sum(len(_segments(b)) for b in pipe)
    assert n == 50 and pipe.stats.examples == 50 and pipe.stats.skipped == expected
    assert pipe.stats.first_ids["non_utf8"] == ["bad:31"]  # the file's 32nd line
    assert "skipped row bad:31 (non_utf8" in caplog.text
    summary = pipe.stats.summary()
    assert "50 examples used" in summary and "empty_answer=2" in summary


# -- RL and eval prompt batches -------------------------------------------------------------------------------


def test_rl_prompts_left_padded_with_ground_truth_and_budget(tok):
    src = sources.load_source(GSM8K, "gsm8k")
    budget = 150
    lengths = {src[i].id: len(tok.encode(tok.apply_chat_template(P._messages(src[i], P.PromptConfig()), True)))
               for i in range(len(src))}
    cfg = P.PromptBatchConfig(batch_size=4, max_prompt_len=budget, num_epochs=1, seed=2)
    pipe = P.rl_pipeline(src, tok, cfg, process_index=0, process_count=1)
    seen = []
    for batch in pipe:
        assert batch["prompt_ids"].shape == (4, budget) and batch["prompt_mask"].dtype == bool
        for row in range(4):
            n = batch["prompt_lengths"][row]
            assert batch["prompt_mask"][row].sum() == n and batch["prompt_mask"][row, budget - n:].all()
            assert np.all(batch["prompt_ids"][row, : budget - n] == tok.special.pad)
            text = tok.decode(batch["prompt_ids"][row, budget - n:])
            assert text.endswith("<|im_start|>assistant\n") and batch["questions"][row] in text
            ex = src[int(batch["ids"][row].split(":")[1])]
            assert batch["answers"][row] == ex.answer
            seen.append(batch["ids"][row])
    too_long = sum(n > budget for n in lengths.values())
    assert 0 < too_long < 50 and pipe.stats.skipped == {"prompt_too_long": too_long}
    assert len(seen) == (50 - too_long) // 4 * 4 and all(lengths[i] <= budget for i in seen)


def test_rl_global_batches_do_not_depend_on_the_host_count(tok):
    """Each host reads its contiguous slice of every global batch: hosts 0 and 1 side by side are the
    1-host batch, row for row, across an epoch boundary (so GRPO samples the same rollouts on any host count)."""
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=10, seed=3))
    cfg = P.PromptBatchConfig(batch_size=4, max_prompt_len=160, seed=7)

    def ids(index, count, n_batches):
        it = iter(P.rl_pipeline(src, tok, cfg, process_index=index, process_count=count))
        return [next(it)["ids"] for _ in range(n_batches)]

    one = ids(0, 1, 6)
    hosts = [ids(i, 2, 6) for i in range(2)]
    assert [a + b for a, b in zip(*hosts)] == one
    # 10 rows: every epoch gives 2 batches and drops its last 2 rows (a batch never straddles two epochs)
    epoch1, epoch2 = sum(one[:2], []), sum(one[2:4], [])
    assert len(set(epoch1)) == 8 and len(set(epoch2)) == 8 and epoch1 != epoch2  # no repeats; reshuffled


def test_mixed_text_and_image_rows(tok):
    """A source mixing text and image tasks: text rows carry no patches, image arrays stay in row order."""
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=8, tasks=("text-direct", "image-read")))
    cfg = P.SFTConfig(max_len=256, batch_size=4, pack=False, shuffle=False, num_epochs=1)
    batch = next(iter(P.sft_pipeline(src, tok, cfg, process_index=0, process_count=1)))
    pads = (batch["input_ids"] == tok.special.image_pad).sum(1)
    np.testing.assert_array_equal(pads, [0, 32, 0, 32])
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 8, 16]] * 2)
    expected = np.concatenate([P.encode_sft(src[i], tok, cfg)["pixel_values"] for i in (1, 3)])
    np.testing.assert_array_equal(batch["pixel_values"], expected)
    prompts = next(iter(P.rl_pipeline(src, tok, P.PromptBatchConfig(batch_size=4, max_prompt_len=200, shuffle=False),
                                       process_index=0, process_count=1)))
    np.testing.assert_array_equal((prompts["prompt_ids"] == tok.special.image_pad).sum(1), [0, 32, 0, 32])
    np.testing.assert_array_equal(prompts["pixel_values"], expected)


def test_rl_image_prompt_over_budget_is_dropped_not_truncated(tok):
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=8, tasks=("image-cot",)))
    full = P.rl_pipeline(src, tok, P.PromptBatchConfig(batch_size=2, max_prompt_len=200, num_epochs=1),
                         process_index=0, process_count=1)
    batch = next(iter(full))
    assert batch["pixel_values"].shape == (2 * 128, 1176)
    assert np.all((batch["prompt_ids"] == tok.special.image_pad).sum(1) == 32)
    small = P.rl_pipeline(src, tok, P.PromptBatchConfig(batch_size=2, max_prompt_len=40, num_epochs=1),
                          process_index=0, process_count=1)
    assert list(small) == [] and small.stats.skipped == {"prompt_too_long": 8}


def test_orz_eval_prompt_batches_in_order(tok):
    """Benchmark rows in the ORZ eval format as prompt batches in file order: ids, gold answers, the eval
    template's text and the option letters as written in the file."""
    gpqa = sources.load_source(str(FIXTURES / "gpqa_diamond_30.json"), "orz_eval")
    cfg = P.PromptBatchConfig(batch_size=8, max_prompt_len=1024, shuffle=False, num_epochs=1,
                              prompt=P.PromptConfig(template="x_reasoner_eval_mc"))
    batches = list(P.rl_pipeline(gpqa, tok, cfg, process_index=0, process_count=1))
    assert len(batches) == 3 and all(len(b["ids"]) == 8 for b in batches)  # 30 rows: the remainder dropped
    ids = [i for b in batches for i in b["ids"]]
    assert ids == [f"gpqa_diamond_30:{i}" for i in range(24)]
    answers = [a for b in batches for a in b["answers"]]
    assert answers[:10] == ["D", "C", "D", "C", "C", "A", "C", "A", "D", "B"]
    first = tok.decode(batches[0]["prompt_ids"][0][batches[0]["prompt_mask"][0]])
    assert "just one of the options" in first and "Options:" not in first  # ORZ prompts already list them
    assert batches[0]["choices"][0] == {"A": "d", "B": "a", "C": "b", "D": "c"}
    math = sources.load_source(str(FIXTURES / "math500_40.json"), "orz_eval")
    cfg = P.PromptBatchConfig(batch_size=16, max_prompt_len=1024, shuffle=False, num_epochs=1,
                              prompt=P.PromptConfig(template="x_reasoner_eval_math"))
    batches = list(P.rl_pipeline(math, tok, cfg, process_index=0, process_count=1))
    assert sum(len(b["ids"]) for b in batches) == 32 and batches[-1]["prompt_ids"].shape == (16, 1024)


def test_global_batch_on_a_device_mesh(tok):
    import jax

    from xr_jax import parallel

    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=64))
    batch = next(iter(P.sft_pipeline(src, tok, P.SFTConfig(max_len=128, batch_size=8), process_index=0, process_count=1)))
    arrays = parallel.global_batch(batch, parallel.make_mesh((-1, 1, 1)))
    assert arrays["input_ids"].shape == (8, 128) and len(arrays["input_ids"].sharding.device_set) == len(jax.devices())
    for key in batch:
        np.testing.assert_array_equal(np.asarray(arrays[key]), batch[key])


def test_all_rows_skipped_fails_instead_of_looping_forever(tok):
    src = synthetic.synthetic_source(synthetic.SyntheticConfig(num_examples=12))
    cfg = P.PromptBatchConfig(batch_size=4, max_prompt_len=8)  # every prompt is longer than 8 tokens
    with pytest.raises(P.UnusableData, match="a whole pass over the data gave no batch.*prompt_too_long=12"):
        next(iter(P.rl_pipeline(src, tok, cfg, process_index=0, process_count=1)))
