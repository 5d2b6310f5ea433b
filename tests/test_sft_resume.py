"""Exact resume: runs killed with SIGKILL / stopped with SIGTERM continue bit-identically (a stopped run
exits 75 with one line and writes no export); corrupt checkpoints fall back to the previous one;
checkpoints restore onto a different mesh. The subprocess runs have stdout piped, as in a batch job: they
print a progress line every logging.print_every steps and a final `done` line."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xr_jax import parallel
from xr_jax.checkpoints import training as checkpoint
from xr_jax.checkpoints import convert
from xr_jax.config import OptimSection
from xr_jax.models.presets import preset
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
CACHE = {}  # the module's persistent XLA cache: runs after the first skip compilation


def _cmd(tmp, *extra):
    return [sys.executable, "-m", "xr_jax.cli", "sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"),
            f"train.steps={STEPS}", f"logging.dir={tmp}", "logging.progress=false", *extra]


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **CACHE)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(log_dir) -> dict[int, float]:
    """step -> loss, the last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def _run_until(tmp, sig, at_step, *extra):
    """Start a run, send `sig` once the log shows `at_step`, return (returncode, stderr)."""
    proc = subprocess.Popen(_cmd(tmp, *extra), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    path = os.path.join(tmp, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(_losses(tmp)) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    CACHE["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    export = tmp / "model"
    done = subprocess.run(_cmd(tmp, f"train.export_dir={export}"), env=_env(), cwd=ROOT, check=True,
                          capture_output=True, text=True)
    losses = _losses(tmp)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # stdout is a pipe: a line every 10 steps (logging.print_every's default) with the logged loss, then `done`
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["10/30", "20/30", "30/30"], done.stdout
    for line in lines[:-1]:
        step = int(line.split()[1].split("/")[0])
        assert f"loss {losses[step]:.4f}" in line and "tokens/s " in line and " eta 0:" in line
    assert lines[-1] == f"done: {STEPS} steps, exported to {export}"
    assert sorted(os.listdir(tmp)) == ["metrics.jsonl", "model"]  # no temporary directory left beside it
    return losses, _params(export)


def _params(export_dir):
    return jax.tree_util.tree_map(np.asarray, convert.load_model(str(export_dir))[1])


def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted):
    kill_at = int(np.random.RandomState(int(time.time()) % 1000).randint(5, STEPS // 2))
    ckpt = tmp_path / "ckpt"
    rc, _ = _run_until(tmp_path, signal.SIGKILL, kill_at, f"checkpoint.dir={ckpt}", "checkpoint.every=3")
    assert rc == -signal.SIGKILL, f"the run finished before it could be killed at step {kill_at}"
    done_before = max(_losses(tmp_path))
    assert done_before < STEPS
    finalized = checkpoint.Checkpointer(str(ckpt)).steps()  # a save cut by the kill is not among them
    result = subprocess.run(_cmd(tmp_path, f"checkpoint.dir={ckpt}", "checkpoint.every=3"), env=_env(), cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    if finalized:
        assert f"step {max(finalized)}" in result.stderr and "resumed from" in result.stderr
    got = _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == uninterrupted[0], f"killed at step {kill_at}: losses differ after resume"


def test_sigterm_saves_exits_75_without_export_then_resume_is_bit_identical(tmp_path, uninterrupted):
    ckpt, export = tmp_path / "ckpt", tmp_path / "model"
    # checkpoint.every larger than the run: the only checkpoint is the one written on SIGTERM
    args = (f"checkpoint.dir={ckpt}", "checkpoint.every=1000", f"train.export_dir={export}")
    rc, err = _run_until(tmp_path, signal.SIGTERM, 5, *args)
    stopped = max(_losses(tmp_path))
    assert rc == 75, err[-2000:]
    assert err.splitlines() == [
        f"xr-jax sft: stopped at step {stopped} by SIGTERM; checkpoint saved; rerun the same command to resume"]
    assert stopped < STEPS and not export.exists() and not (tmp_path / "model.partial").exists()
    assert checkpoint.Checkpointer(str(ckpt)).steps() == [stopped]
    done = subprocess.run(_cmd(tmp_path, *args), env=_env(), cwd=ROOT, check=True, capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == f"done: {STEPS} steps, exported to {export}"
    assert _losses(tmp_path) == uninterrupted[0]
    for a, b in zip(jax.tree_util.tree_leaves(_params(export)), jax.tree_util.tree_leaves(uninterrupted[1])):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- in-process checkpoint tests

CFG = preset("tiny")


def _state(mesh, seed=0):
    """(a TrainState of random values placed on `mesh`, its abstract restore target) — no compilation."""
    tx, _ = state_lib.make_optimizer(OptimSection(), 10)
    init = lambda k: init_params(CFG, k)  # noqa: E731
    sh = state_lib.state_shardings(tx, jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    abstract = state_lib.abstract_state(init, tx, sh)
    rng = np.random.RandomState(seed)
    state = jax.tree_util.tree_map(
        lambda a: jax.device_put(np.asarray(rng.rand(*a.shape) * 100).astype(a.dtype), a.sharding), abstract)
    return state, abstract


def _assert_same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_or_half_written_latest_checkpoint_falls_back_with_a_message(tmp_path, caplog):
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    s1, abstract = _state(mesh, seed=1)
    s2, _ = _state(mesh, seed=2)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    ck.save(1, s1, {"index": 1}, {"a": 1}, force=True)
    ck.save(2, s2, {"index": 2}, {"a": 1}, force=True)
    ck.wait()
    # a save killed half-way leaves only a temporary directory: never listed as a checkpoint
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-123" / "state")
    # and the newest finalized checkpoint has its array data damaged
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            if "d" in root.split(os.sep)[-1] or f.endswith((".zarray", "manifest.ocdbt")):
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    with caplog.at_level(logging.WARNING, logger="xr_jax.checkpoints.training"):
        got = checkpoint.Checkpointer(str(tmp_path), keep=5).restore(abstract)
    assert got.step == 1 and got.data_state == {"index": 1} and got.config == {"a": 1}
    _assert_same(got.state, s1)
    assert "step 2 is corrupt" in caplog.text and "restored step 1 instead" in caplog.text


@pytest.mark.parametrize("save_shape,load_shape", [((2, 2, 2), (1, 1, 1)), ((1, 1, 1), (1, 4, 2))])
def test_restore_onto_a_different_mesh(tmp_path, save_shape, load_shape):
    n_save, n_load = int(np.prod(save_shape)), int(np.prod(load_shape))
    saved, _ = _state(parallel.make_mesh(save_shape, jax.devices()[:n_save]), seed=3)
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ck.save(7, saved, {"index": 7}, None, force=True)
    ck.close()
    load_mesh = parallel.make_mesh(load_shape, jax.devices()[:n_load])
    _, abstract = _state(load_mesh)
    got = checkpoint.Checkpointer(str(tmp_path)).restore(abstract)
    assert got.step == 7
    _assert_same(got.state, saved)
    kernel = got.state.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == abstract.params["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding
    assert len(kernel.sharding.device_set) == n_load
    assert isinstance(got.state.step, jax.Array) and jnp.asarray(got.state.rng).shape == (2,)
