"""Non-finite guard: the step skips the update, the loop counts, saves and stops after K in a row. Early
stops (signal, data ran out) save and raise `RunStopped` with their exit codes; exports are atomic."""

import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xr_jax import parallel
from xr_jax.checkpoints import training as checkpoint
from xr_jax.config import OptimSection
from xr_jax.data.random_tokens import RandomTokenBatches
from xr_jax.errors import EXIT_RESUMABLE, RunStopped
from xr_jax.models.presets import preset
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.train import loop, setup, sft, state as state_lib


def test_non_finite_step_keeps_params_and_optimizer_state():
    cfg = preset("tiny")
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, schedule = state_lib.make_optimizer(OptimSection(lr=1e-2), 10)
    init = lambda k: init_params(cfg, k)  # noqa: E731
    sh = state_lib.state_shardings(tx, jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    step = sft.jit_train_step(sft.make_train_step(cfg, tx, schedule, chunk=16, mesh=mesh, shardings=sh), mesh, sh)
    state = state_lib.init_state(init, tx, 0, sh)
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    batch = RandomTokenBatches(2, 32, cfg.text.vocab_size).batch(0)
    bad = dict(batch, loss_mask=np.where(batch["loss_mask"] > 0, np.nan, 0.0).astype(np.float32))
    with parallel.use_mesh(mesh):
        state, m = step(state, parallel.global_batch(bad, mesh))
        assert int(m["skipped"]) == 1 and int(state.step) == 1
        for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)), jax.tree_util.tree_leaves(before)):
            np.testing.assert_array_equal(np.asarray(a), b)
        state, m = step(state, parallel.global_batch(batch, mesh))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and int(state.step) == 2
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params, before[0])
    assert all(jax.tree_util.tree_leaves(changed))


class _Batches:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.zeros(2)}

    def get_state(self):
        return {"index": self.i}


def test_loop_stops_with_a_checkpoint_after_k_non_finite_steps_in_a_row(tmp_path):
    skipped = [0, 1, 0, 1, 1, 1, 0, 0]  # the third consecutive skip is step 6

    def step_fn(state, batch):
        s = int(state.step)
        return state.replace(step=state.step + 1), {"loss": float("nan") if skipped[s] else 1.0, "skipped": skipped[s]}

    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state=(),
                                 rng=jax.random.PRNGKey(0))
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=100, async_save=False)
    logger = loop.MetricsLogger(str(tmp_path))
    with pytest.raises(loop.NonFiniteError, match="3 non-finite steps in a row"):
        loop.run_loop(state, step_fn, _Batches(), total_steps=8, put_batch=lambda b: b, logger=logger,
                      checkpointer=ck, nan_patience=3, progress=False)
    logger.close()
    assert ck.steps() == [6]
    assert ck.restore(jax.eval_shape(lambda: state)).data_state == {"index": 6}
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and sum(r["skipped"] for r in records) == 4


def _counting_state():
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state=(),
                                rng=jax.random.PRNGKey(0))


def _count(state, batch):
    return state.replace(step=state.step + 1), {"loss": 1.0, "skipped": 0}


class _Finite(_Batches):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def __next__(self):
        if self.i == self.n:
            raise StopIteration
        return super().__next__()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_75(tmp_path, signum):
    def step_fn(state, batch):
        if int(state.step) == 2:
            os.kill(os.getpid(), signum)  # arrives during step 3: the step finishes, then the loop stops
        return _count(state, batch)

    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=100, async_save=False)
    logger = loop.MetricsLogger(str(tmp_path))
    with pytest.raises(RunStopped) as stop:
        loop.run_loop(_counting_state(), step_fn, _Batches(), total_steps=8, put_batch=lambda b: b, logger=logger,
                      checkpointer=ck, progress=False)
    logger.close()
    name = signal.Signals(signum).name
    assert str(stop.value) == f"stopped at step 3 by {name}; checkpoint saved; rerun the same command to resume"
    assert stop.value.exit_code == EXIT_RESUMABLE == 75 and ck.steps() == [3]
    # without a checkpoint.dir nothing can be resumed: the conventional killed-by-signal code, said so
    with pytest.raises(RunStopped, match=f"stopped at step 3 by {name}; no checkpoint.dir") as stop:
        loop.run_loop(_counting_state(), step_fn, _Batches(), total_steps=8, put_batch=lambda b: b,
                      logger=loop.MetricsLogger(str(tmp_path)), progress=False)
    assert stop.value.exit_code == 128 + signum


def test_data_running_out_stops_with_a_checkpoint_and_exit_1(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=100, async_save=False)
    with pytest.raises(RunStopped, match="stopped at step 4 of 8: the data ran out; checkpoint saved") as stop:
        loop.run_loop(_counting_state(), _count, _Finite(4), total_steps=8, put_batch=lambda b: b,
                      logger=loop.MetricsLogger(str(tmp_path)), checkpointer=ck, progress=False)
    assert stop.value.exit_code == 1 and ck.steps() == [4]


def test_export_is_replaced_only_by_a_complete_one(tmp_path):
    out = tmp_path / "model"

    def write(text):
        def fn(tmp):
            os.makedirs(tmp)
            (pathlib.Path(tmp) / "a.txt").write_text(text)
            if text == "broken":
                raise OSError("disk full")
        return fn

    assert setup.write_atomically(str(out), write("v1")) == str(out)
    with pytest.raises(OSError, match="disk full"):
        setup.write_atomically(str(out), write("broken"))
    assert (out / "a.txt").read_text() == "v1"  # the failed export left the previous one as it was
    setup.write_atomically(str(out), write("v2"))
    assert (out / "a.txt").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["model"]
