"""Checkpoint directories that defend themselves: a lock against a second run (stale locks taken over), the
config fingerprint (changed keys refused and listed, safe keys and overrides allowed), checksums that catch
byte corruption Orbax would restore silently, corrupt steps moved aside and saved again, and one line, not
hundreds, for a directory with nothing usable."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_sft_resume import _assert_same, _state
from xr_jax import parallel
from xr_jax.checkpoints import integrity, training as checkpoint
from xr_jax import config as config_lib
from xr_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(ROOT, "configs", "tiny_sft.yaml")


@pytest.fixture(scope="module")
def states():
    """Two different TrainStates on one device and their abstract restore target."""
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    s1, abstract = _state(mesh, seed=1)
    s2, _ = _state(mesh, seed=2)
    return s1, s2, abstract


def _saved(directory, states, config=None, manifests=True):
    """Steps 1 and 2 (async save, as in training) with their checksums written at close."""
    s1, s2, _ = states
    ck = checkpoint.Checkpointer(str(directory), keep=5, async_save=True)
    ck.save(1, s1, {"index": 1}, config, force=True)
    ck.save(2, s2, {"index": 2}, config, force=True)
    ck.close()
    for step in (1, 2):
        assert os.path.isfile(directory / str(step) / integrity.MANIFEST_FILE)
        if not manifests:
            os.remove(directory / str(step) / integrity.MANIFEST_FILE)


def _largest_data_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.sep + "d" + os.sep in r + os.sep]
    return max(files, key=os.path.getsize)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "xr_jax.cli", "sft", "--config", TINY_SFT, "logging.progress=false",
                           *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- lock


def test_a_second_run_is_refused_while_the_first_holds_the_directory(tmp_path):
    first = checkpoint.Checkpointer(str(tmp_path / "ck"), lock=True)
    with pytest.raises(integrity.CheckpointLocked, match=f"pid {os.getpid()}"):
        checkpoint.Checkpointer(str(tmp_path / "ck"), lock=True)
    r = _cli("train.steps=2", f"checkpoint.dir={tmp_path / 'ck'}", f"logging.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "is in use by another run" in r.stderr
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in r.stderr and "command: " in r.stderr
    first.close()
    assert not os.path.exists(tmp_path / "ck" / integrity.LOCK_FILE)
    checkpoint.Checkpointer(str(tmp_path / "ck"), lock=True).close()  # free again


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = socket.gethostname()
    stale = [{"host": me, "pid": dead.pid, "started": "then", "command": "xr-jax sft dead", "token": "a"},
             # a live pid that is not the holder any more: its start time differs (pid reused)
             {"host": me, "pid": os.getpid(), "pid_start": "1", "started": "then", "command": "reused", "token": "b"}]
    for holder in stale:
        os.makedirs(tmp_path, exist_ok=True)
        with open(tmp_path / integrity.LOCK_FILE, "w") as f:
            json.dump(holder, f)
        with caplog.at_level(logging.WARNING, logger="xr_jax.checkpoints"):
            ck = checkpoint.Checkpointer(str(tmp_path), lock=True)
        assert "took over the stale lock" in caplog.text and holder["command"] in caplog.text
        with open(tmp_path / integrity.LOCK_FILE) as f:
            assert json.load(f)["pid"] == os.getpid()
        ck.close()
        caplog.clear()
    # a holder on another host cannot be checked from here: it keeps the directory
    with open(tmp_path / integrity.LOCK_FILE, "w") as f:
        json.dump({"host": me + "-elsewhere", "pid": dead.pid, "started": "then", "command": "x", "token": "c"}, f)
    with pytest.raises(integrity.CheckpointLocked, match="if that run is dead, delete"):
        checkpoint.Checkpointer(str(tmp_path), lock=True)


# ----------------------------------------------------------------------------- config fingerprint


class _Batches:
    def set_state(self, state):
        self.state = state


def _resume(tmp_path, states, *overrides):
    cfg = config_lib.load(TINY_SFT, [f"checkpoint.dir={tmp_path / 'ck'}", *overrides])
    batches = _Batches()
    state, ck = loop.resume_or_start(cfg, states[2], batches, fresh=lambda: None)
    ck.close()
    return state, batches


def test_resuming_with_another_config_is_refused_unless_safe_or_allowed(tmp_path, states, caplog):
    saved = config_lib.to_dict(config_lib.load(TINY_SFT, [f"checkpoint.dir={tmp_path / 'ck'}"]))
    _saved(tmp_path / "ck", states, config=saved)
    with pytest.raises(integrity.ConfigChanged) as e:
        _resume(tmp_path, states, "optim.lr=0.002", "train.seed=3", "data.synthetic.max_operand=7")
    msg = str(e.value)
    assert "\n" not in msg and "optim.lr (0.001 -> 0.002)" in msg and "train.seed (0 -> 3)" in msg
    assert "data.synthetic.max_operand" in msg
    assert "checkpoint.allow_config_change=[data.synthetic.max_operand,optim.lr,train.seed]" in msg
    assert not os.path.exists(tmp_path / "ck" / integrity.LOCK_FILE)  # the refused run released the lock
    # keys documented as safe: the run's length, logging, cadence, memory knobs
    with caplog.at_level(logging.INFO, logger="xr_jax.train"):
        state, batches = _resume(tmp_path, states, "train.steps=40", "logging.dir=/elsewhere", "checkpoint.keep=9",
                                 "train.microbatches=2")
    _assert_same(state, states[1])
    assert batches.state == {"index": 2}
    assert "train.steps (20 -> 40)" in caplog.text and "schedule is recomputed over 40 steps" in caplog.text
    # an explicit override: a list of keys / sections, or true
    _resume(tmp_path, states, "optim.lr=0.002", "checkpoint.allow_config_change=[optim]")
    _resume(tmp_path, states, "optim.lr=0.002", "train.seed=3", "checkpoint.allow_config_change=true")
    with pytest.raises(integrity.ConfigChanged, match=r"train\.seed") as e:
        _resume(tmp_path, states, "optim.lr=0.002", "train.seed=3", "checkpoint.allow_config_change=[optim.lr]")
    assert "optim.lr" not in str(e.value)


def test_a_key_an_older_checkpoint_lacks_counts_as_its_default():
    defaults = {"a": {"x": 1, "y": 2}}
    assert integrity.config_changes({"a": {"x": 1}}, {"a": {"x": 1, "y": 2}}, defaults) == {}
    assert integrity.config_changes({"a": {"x": 1}}, {"a": {"x": 1, "y": 3}}, defaults) == {"a.y": (2, 3)}


# ----------------------------------------------------------------------------- corruption


def _zero_64(path, where):
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(bytes(64))


def _zero_where_orbax_does_not_notice(directory, step, abstract, saved_state):
    """Zero 64 bytes inside the step's largest array data file at a place where Orbax alone (no checksums)
    restores the step without an error but with wrong values; returns (file, how many values differ). The
    place is probed on copies: which bytes decompress silently depends on the file's layout, which varies
    from one save to the next."""
    victim = _largest_data_file(directory / str(step) / "state")
    for frac in np.linspace(0.05, 0.95, 19):
        probe = directory.parent / f"probe-{frac:.2f}"
        shutil.copytree(directory, probe)
        os.remove(probe / str(step) / integrity.MANIFEST_FILE)
        where = int(os.path.getsize(victim) * frac)
        _zero_64(probe / os.path.relpath(victim, directory), where)
        try:
            got = checkpoint.Checkpointer(str(probe)).restore(abstract, step=step)
        except integrity.CheckpointError:
            continue
        finally:
            shutil.rmtree(probe)
        wrong = sum(int((np.asarray(a) != np.asarray(b)).sum())
                    for a, b in zip(jax.tree_util.tree_leaves(got.state), jax.tree_util.tree_leaves(saved_state)))
        if wrong:
            _zero_64(victim, where)
            return victim, wrong
    pytest.fail("no place found where zeroed bytes restore silently")


def _ours(caplog):
    """xr_jax's log records only: Orbax's failed read may also leave asyncio's "exception was never
    retrieved" on the root logger, when the garbage collector happens to run inside the block."""
    return [r for r in caplog.records if r.name.startswith("xr_jax.")]


def test_zeroed_bytes_are_detected_and_the_previous_step_restored(tmp_path, states, caplog):
    s1, s2, abstract = states
    _saved(tmp_path / "ck", states, config={"a": 1})
    victim, wrong = _zero_where_orbax_does_not_notice(tmp_path / "ck", 2, abstract, s2)
    assert wrong > 0  # what a restore without checksums gives: step 2 with wrong values, no message
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=5)
    caplog.clear()  # the probes' warnings
    with caplog.at_level(logging.WARNING, logger="xr_jax.checkpoints"):
        got = ck.restore(abstract)
    assert got.step == 1 and got.data_state == {"index": 1}
    _assert_same(got.state, s1)
    (record,) = _ours(caplog)  # ONE message
    rel = os.path.relpath(victim, tmp_path / "ck" / "2")
    assert f"step 2 is corrupt (checksum mismatch in {rel})" in record.getMessage()
    assert "restored step 1 instead" in record.getMessage()
    # kept for inspection, out of Orbax's listing
    (moved,) = os.listdir(tmp_path / "ck" / integrity.CORRUPT_DIR)
    assert moved.startswith("2-") and ck.steps() == [1]
    assert integrity.verify_manifest(str(tmp_path / "ck" / "1")) is None


def test_a_truncated_latest_step_is_moved_aside_and_saved_again(tmp_path, states, caplog):
    s1, s2, abstract = states
    _saved(tmp_path, states, manifests=False)  # as an older xr_jax wrote them: Orbax alone must notice
    victim = _largest_data_file(tmp_path / "2" / "state")
    os.truncate(victim, os.path.getsize(victim) // 2)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    with caplog.at_level(logging.WARNING, logger="xr_jax.checkpoints"):
        got = ck.restore(abstract)
    assert got.step == 1
    (record,) = _ours(caplog)
    assert "step 2 is corrupt (Orbax cannot read it" in record.getMessage()
    assert "step 1 has no checksums" in record.getMessage()
    # training reaches step 2 again: it is saved (before, the corrupt directory blocked the save)
    assert ck.save(2, s2, {"index": 2}, None, force=True)
    ck.close()
    again = checkpoint.Checkpointer(str(tmp_path)).restore(abstract)
    assert again.step == 2 and integrity.verify_manifest(str(tmp_path / "2")) is None
    _assert_same(again.state, s2)


def test_a_directory_with_nothing_usable_gives_one_line(tmp_path, states):
    _saved(tmp_path / "ck", states)
    os.remove(tmp_path / "ck" / "2" / integrity.MANIFEST_FILE)  # step 2: Orbax reads the damage; 1: checksums
    for step in (1, 2):
        for root, _, files in os.walk(tmp_path / "ck" / str(step) / "state"):
            for name in files:
                if os.sep + "d" in root:
                    _zero_64(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)
    r = _cli("train.steps=4", f"checkpoint.dir={tmp_path / 'ck'}", f"logging.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and not r.stdout, r.stderr[-3000:]
    assert "no usable checkpoint" in r.stderr and "step 2: Orbax cannot read it" in r.stderr
    assert "step 1: checksum mismatch in state/" in r.stderr and "nothing was moved" in r.stderr
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]
