"""End to end with the real sampler and a tiny random Qwen2.5-VL (byte-level tokenizer) on a mesh:
text and image benchmarks from fixtures, forced exit within the cap, outputs, and rescoring."""

import dataclasses
import json
import os

import jax
import pytest

from tests import eval_fixtures as fx
from tests.eval_fakes import tag_scorer
from xr_jax.eval import runner as ev
from xr_jax import parallel
from xr_jax.data.tokenizer import load_tokenizer
from xr_jax.eval.generator import ModelGenerator
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import init_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


@pytest.fixture(scope="module")
def generator():
    tok = load_tokenizer("tiny")
    base = tiny_vl_config()
    s = tok.special
    cfg = tiny_vl_config(
        text=dataclasses.replace(base.text, vocab_size=tok.vocab_size, max_position_embeddings=4096),
        image_token_id=s.image_pad, video_token_id=s.video_pad, vision_start_token_id=s.vision_start,
        vision_end_token_id=s.vision_end,
    )
    mesh = parallel.make_mesh((4, 2, 1))
    params = parallel.shard_params(init_params(cfg, jax.random.PRNGKey(0)), mesh)
    return ModelGenerator(cfg, params, tok, mesh=mesh)


def test_tiny_model_end_to_end(generator, tmp_path):
    cfg = ev.EvalSection(
        benchmarks=("gsm8k", "mmmu_val"),
        sources={"gsm8k": {"path": os.path.join(FIXTURES, "gsm8k_test.jsonl"), "limit": 3},
                 "mmmu_val": {"path": fx.write_mmmu(str(tmp_path / "data"))}},
        output_dir=str(tmp_path / "out"), max_tokens=40, max_answer=8, batch_size=4,
        # the bare question keeps byte-level prompts short (fast on CPU); the paper's templates are tested elsewhere
        mc_template="plain", math_template="plain",
    )
    metrics = ev.evaluate(cfg, generator, tag_scorer, progress=False)
    assert generator.exit_len == 8  # "</think>" is 8 byte tokens in the tiny tokenizer
    assert set(metrics) == {"gsm8k", "mmmu_val"} and metrics["gsm8k"].n == 3 and metrics["mmmu_val"].n == 3
    records = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "predictions.jsonl"))]
    for r in records:
        assert 1 <= r["num_tokens"] <= 40 and r["finish_reason"] in ("eos", "forced_exit", "length")
        if r["forced"]:  # the exit text sits right after the 24-token thinking budget
            assert "</think>" in r["response"]
    # A random model never closes </think> itself: forced exit cuts it, so no response exceeds the cap.
    assert all(m.max_tokens <= 40 for m in metrics.values())
    assert ev.rescore(os.path.join(cfg.output_dir, "predictions.jsonl"), tag_scorer) == metrics

    # Greedy decoding is deterministic: a second run gives the same responses.
    again = ev.evaluate(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")), generator, tag_scorer,
                        progress=False)
    assert again == metrics
