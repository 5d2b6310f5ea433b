"""Multi-host for real on one machine: `launch/local_multiprocess.sh` runs 2 processes x 2 CPU devices
(jax.distributed on 127.0.0.1, gloo collectives), each feeding only its own rows of the global batch.

They train exactly as 1 process with 4 devices does (fp32 metrics within 1e-5), across a checkpoint
save and a restore in a second launch: the restored run continues at the next step (not from
scratch), only process 0 writes the metrics log, and the export is written by all processes together. Each stage is one `Case`: a new trainer adds its
CLI command here and is covered the same way.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xr_jax.checkpoints import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    command: tuple[str, ...]  # xr-jax subcommand and its fixed arguments
    overrides: tuple[str, ...]
    steps: int  # total steps; the multi-process run stops after `stop_at`, saves, and is resumed
    stop_at: int
    compare: tuple[str, ...]  # metrics that must agree within TOL at every step
    falls: str  # a metric whose last steps must lie below its first: it trained


CASES = [
    Case("sft", ("sft", "--config", "configs/tiny.yaml"),
         ("mesh.shape=[1,4,1]", "train.steps=10", "checkpoint.every=3", "logging.progress=false"), 10, 6,
         ("loss", "input_tokens"), "loss"),
    # Each process samples and scores its own prompts; the same rollouts (row keys follow the global row) and
    # updates as one process. The test reward gives non-zero advantages from a random policy.
    Case("grpo", ("grpo", "--config", "configs/tiny_grpo.yaml"),
         ("mesh.shape=[1,4,1]", "train.steps=4", "checkpoint.every=2", "logging.progress=false",
          "grpo.reward_modules=[tests.grpo_rewards]", "grpo.rewards=[{name: test_even_length}]"), 4, 2,
         ("reward_mean", "response_tokens", "grad_norm", "entropy", "input_tokens"), "entropy"),
]


def _env(devices: int, cache: str) -> dict:
    """CPU devices per process; a compilation cache shared by the launches (the resumed launch compiles
    the same program as the first and loads it from there)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-3000:]}\n{err[-5000:]}"


def _cli(case: Case, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xr_jax.cli", *case.command, *case.overrides, *extra]


def _metrics(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_processes_equal_one_process_across_a_restore(case, tmp_path):
    single_log, multi_log, ckpt = tmp_path / "single", tmp_path / "multi", tmp_path / "ckpt"
    cache = str(tmp_path / "jax_cache")
    single = _start(_cli(case, f"logging.dir={single_log}"), _env(4, cache))  # runs beside the first launch

    launch = ["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "2", "--"]
    multi = [f"logging.dir={multi_log}", f"checkpoint.dir={ckpt}"]
    _finish(_start(launch + _cli(case, *multi, f"train.steps={case.stop_at}"), _env(2, cache)))  # saves at stop_at
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())[-1] == case.stop_at
    export = tmp_path / "model"
    _finish(_start(launch + _cli(case, *multi, f"train.export_dir={export}"), _env(2, cache)))  # restores, runs on
    _finish(single)
    # every process wrote its shards into model.partial, process 0 renamed it into place
    assert convert.is_model_checkpoint(str(export)) and not os.path.exists(f"{export}.partial")

    single_records, multi_records = _metrics(single_log), _metrics(multi_log)
    # One record per step: the resumed launch continued at stop_at + 1, and process 1 logged nothing.
    assert [r["step"] for r in multi_records] == list(range(1, case.steps + 1))
    assert [r["step"] for r in single_records] == list(range(1, case.steps + 1))
    for key in case.compare:
        got, want = [[r[key] for r in records] for records in (multi_records, single_records)]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=0, err_msg=key)
    curve = np.array([r[case.falls] for r in single_records])
    assert curve[-2:].mean() < curve[:2].mean(), curve  # it trained
