"""The GRPO trainer end to end: on-policy ratios, clipping with several passes, learning on the synthetic
task (1 device and an 8-device mesh), and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import grpo_rewards  # noqa: F401  (registers the test rewards)
from xr_jax import config as config_lib
from xr_jax.train import grpo, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["data.tokenizer=tiny", "data.source=synthetic", "data.synthetic.max_steps=1", "data.synthetic.max_operand=3",
        "logging.progress=false"]


def _grpo_cfg(tmp, *extra):
    return config_lib.load(None, TASK + [
        "model.preset=tiny", "train.batch_size=8", "train.steps=2", "grpo.group_size=4", "grpo.max_prompt_len=320",
        "grpo.max_new_tokens=16", "grpo.reward=test_even_length", "grpo.kl_coef=0.0", f"logging.dir={tmp}",
        "optim.schedule=constant", *extra])


def _log(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_on_policy_pass_has_ratio_one_and_no_clipping(tmp_path):
    m = grpo.main(_grpo_cfg(tmp_path, "optim.lr=1e-3"))
    assert abs(m["ratio_mean_first"] - 1.0) < 1e-5 and m["sampler_logp_gap"] < 1e-5
    assert m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0
    assert 0 < m["zero_var_frac"] < 1 and m["response_tokens"] > 0


def test_second_pass_moves_the_ratio_and_clipping_engages(tmp_path):
    m = grpo.main(_grpo_cfg(tmp_path, "optim.lr=3e-2", "grpo.update_passes=3", "grpo.minibatches=2"))
    first = _log(tmp_path)[0]
    assert abs(first["ratio_mean_first"] - 1.0) < 1e-5  # the first minibatch is on-policy
    assert abs(m["ratio_mean_last"] - 1.0) > 1e-3
    assert m["clip_frac_low"] + m["clip_frac_high"] > 0


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny model taught the task's format by a short SFT (the recipe's stage 1)."""
    out = tmp_path_factory.mktemp("sft")
    sft.main(config_lib.load(None, TASK + [
        "model.preset=tiny", "train.batch_size=16", "train.seq_len=512", "train.steps=100", "optim.lr=3e-3",
        "optim.schedule=constant", f"logging.dir={out}", f"train.export_dir={out}/model"]))
    return str(out / "model")


@pytest.mark.parametrize("mesh", ["[1,1,1]", "[2,2,2]"])
def test_grpo_raises_the_reward_on_the_synthetic_task(sft_model, tmp_path, mesh):
    cfg = config_lib.load(None, TASK + [
        f"model.path={sft_model}", "data.synthetic.seed=1", "train.batch_size=16", "train.steps=16",
        "grpo.group_size=8", "grpo.max_prompt_len=320", "grpo.max_new_tokens=48", "optim.lr=2e-4",
        "optim.schedule=constant", "grpo.kl_coef=0.01", f"logging.dir={tmp_path}", f"mesh.shape={mesh}"])
    grpo.main(cfg)
    rewards = [r["reward_mean"] for r in _log(tmp_path)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards
