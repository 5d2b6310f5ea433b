"""The GRPO trainer end to end: on-policy ratios, clipping with several passes, exact resume after a stop.
That it learns is tests/test_grpo_learning.py."""

import json
import os

import pytest

from tests import grpo_rewards  # noqa: F401  (registers the test rewards)
from xr_jax import config as config_lib
from xr_jax.train import grpo

TASK = ["model.tokenizer=tiny", "data.source=synthetic", "data.synthetic.max_steps=1", "data.synthetic.max_operand=3",
        "logging.progress=false"]


def _grpo_cfg(tmp, *extra):
    return config_lib.load(None, TASK + [
        "model.preset=tiny", "train.batch_size=8", "train.steps=2", "grpo.group_size=4", "grpo.max_prompt_len=320",
        "grpo.max_new_tokens=16", "grpo.rewards=[{name: test_even_length}]", "grpo.kl_coef=0.0", f"logging.dir={tmp}",
        "optim.schedule=constant", *extra])


def _log(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_second_pass_moves_the_ratio_and_clipping_engages(tmp_path):
    """Also: the reward is the weighted sum of `grpo.rewards`, each logged unweighted as reward_<name>."""
    m = grpo.main(_grpo_cfg(tmp_path, "optim.lr=3e-2", "grpo.update_passes=3", "grpo.minibatches=2",
                            "grpo.rewards=[{name: test_even_length}, {name: test_odd_length, weight: 0.5}]"))
    first, second = _log(tmp_path)
    for r in (first, second):
        even, odd = r["reward_test_even_length"], r["reward_test_odd_length"]
        assert 0 < even < 1 and odd == pytest.approx(1 - even) and r["accuracy"] == even
        assert r["reward_mean"] == pytest.approx(even + 0.5 * odd, rel=1e-6)
    assert abs(first["ratio_mean_first"] - 1.0) < 1e-5  # the first minibatch is on-policy
    assert "sampler_logp_gap" in first and "sampler_logp_gap" not in second  # grpo.gap_every=10: step 1, 11, ...
    assert abs(m["ratio_mean_last"] - 1.0) > 1e-3
    assert m["clip_frac_low"] + m["clip_frac_high"] > 0


def test_stopped_run_resumes_identically(tmp_path):
    """4 rollout steps straight vs 2 steps, stop, resume to 4: the same samples, rewards and losses."""
    common = ["optim.lr=1e-3", "checkpoint.every=2", "checkpoint.async_save=false"]
    grpo.main(_grpo_cfg(tmp_path / "straight", "train.steps=4", f"checkpoint.dir={tmp_path}/straight/ck", *common))
    grpo.main(_grpo_cfg(tmp_path / "resumed", "train.steps=2", f"checkpoint.dir={tmp_path}/resumed/ck", *common))
    grpo.main(_grpo_cfg(tmp_path / "resumed", "train.steps=4", f"checkpoint.dir={tmp_path}/resumed/ck", *common))
    keys = ("loss", "reward_mean", "response_tokens", "grad_norm", "entropy")
    straight = {r["step"]: [r[k] for k in keys] for r in _log(tmp_path / "straight")}
    resumed = {r["step"]: [r[k] for k in keys] for r in _log(tmp_path / "resumed")}
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == straight


def test_reward_module_that_does_not_import_is_named(tmp_path):
    with pytest.raises(ValueError, match="grpo.reward_modules: cannot import 'no_such_rewards'"):
        grpo.main(_grpo_cfg(tmp_path, "grpo.reward_modules=[no_such_rewards]"))


def test_on_policy_ratio_is_one_and_recomputed_old_logprobs_agree_with_the_sampler(tmp_path):
    """pi_old from the sampler: the first minibatch's ratio is 1 up to the sampler/trainer gap.
    `grpo.old_logprobs=recompute` (verl's way): pi_old is a training forward of the rollout policy, so that
    ratio is exactly 1; where the sampler's log-probs equal the trainer's (f32 on CPU, gap < 1e-5), both options
    take the same steps."""
    common = ("optim.lr=1e-3", "grpo.minibatches=2", "grpo.gap_every=1", "train.steps=1")
    sampler = grpo.main(_grpo_cfg(tmp_path / "sampler", *common))
    assert abs(sampler["ratio_mean_first"] - 1.0) < 1e-5 and sampler["sampler_logp_gap"] < 1e-5
    # clip fractions are the last minibatch's, one update off-policy: a token or so may clip (0.4% measured)
    assert sampler["clip_frac_low"] + sampler["clip_frac_high"] < 0.05
    assert 0 < sampler["zero_var_frac"] < 1 and sampler["response_tokens"] > 0
    recompute = grpo.main(_grpo_cfg(tmp_path / "recompute", *common, "grpo.old_logprobs=recompute"))
    assert recompute["ratio_mean_first"] == 1.0 and recompute["sampler_logp_gap"] < 1e-5
    assert sampler["response_tokens"] == recompute["response_tokens"]
    for key in ("reward_mean", "ratio_mean_first", "ratio_mean_last", "loss", "grad_norm"):
        assert recompute[key] == pytest.approx(sampler[key], rel=1e-4, abs=1e-5), key
    assert abs(recompute["ratio_mean_last"] - 1.0) > 1e-4  # the second minibatch saw an updated policy


def test_med_grpo_config_runs_one_step_on_medqa(tmp_path):
    """configs/x_reasoner_med_grpo.yaml as written (multiple-choice reward, KL to the reference, recompute,
    dual clip), shrunk only in model and batch, runs a rollout step on the 4- and 5-option MedQA fixtures."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load(os.path.join(root, "configs", "x_reasoner_med_grpo.yaml"), [
        "model.preset=tiny", "model.vocab_size=null", "model.dtype=float32", "model.remat=none", "mesh.shape=[-1,1,1]",
        "model.tokenizer=tiny", f"data.path={root}/tests/fixtures/data/medqa", "train.steps=1", "train.batch_size=8",
        "grpo.group_size=2", "grpo.max_new_tokens=8", "grpo.microbatches=1", "grpo.max_prompt_len=640",
        f"logging.dir={tmp_path}", "logging.progress=false"])
    assert (cfg.data.source, config_lib.to_dict(cfg.grpo.rewards), cfg.grpo.old_logprobs, cfg.grpo.dual_clip) == (
        "medqa", [{"name": "multiple_choice", "weight": 1.0}], "recompute", 3.0)
    m = grpo.main(cfg)
    assert m["response_tokens"] > 0 and 0.0 <= m["reward_mean"] <= 1.0
    assert m["ratio_mean_first"] == 1.0 and m["reward_errors"] == 0 and m["kl"] == pytest.approx(0.0, abs=1e-6)
