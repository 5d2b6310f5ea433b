"""The same SFT run on 1 device and on 8 simulated devices (any mesh shape), with and without gradient
accumulation, gives the same losses; layouts that cannot work fail at start with both numbers."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from xr_jax import parallel
from xr_jax.config import OptimSection
from xr_jax.data.random_tokens import RandomTokenBatches
from xr_jax.models.presets import preset
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.train import sft, state as state_lib

CFG = preset("tiny")
STEPS = 20
TOL = 1e-5
PARAMS = jax.tree_util.tree_map(np.asarray, nn.unbox(init_params(CFG, jax.random.PRNGKey(0))))  # host copy, put on each mesh


def _losses(mesh, microbatches=1, steps=STEPS, batch=8):
    optim = OptimSection(lr=3e-3, schedule="cosine", warmup_steps=2)
    tx, schedule = state_lib.make_optimizer(optim, steps)
    init = lambda k: init_params(CFG, k)  # noqa: E731
    sh = state_lib.state_shardings(tx, jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    state = state_lib.state_from_params(PARAMS, tx, 0, sh)
    step = sft.jit_train_step(
        sft.make_train_step(CFG, tx, schedule, microbatches=microbatches, chunk=16, mesh=mesh, shardings=sh), mesh, sh)
    data = RandomTokenBatches(batch, 32, CFG.text.vocab_size, seed=1)
    out = []
    with parallel.use_mesh(mesh):
        for _ in range(steps):
            state, m = step(state, parallel.global_batch(next(data), mesh))
            out.append(float(m["loss"]))
    return np.array(out)


@pytest.fixture(scope="module")
def single():
    return _losses(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))


def test_loss_decreases(single):
    assert single[-5:].mean() < single[:5].mean() - 0.3, single


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_eight_devices_any_mesh_equals_one_device(single, shape):
    got = _losses(parallel.make_mesh(shape))
    np.testing.assert_allclose(got, single, rtol=TOL, atol=0)


def test_grad_accumulation_4x2_equals_batch_8(single):
    got = _losses(parallel.make_mesh((2, 1, 1), jax.devices()[:2]), microbatches=4)
    np.testing.assert_allclose(got, single, rtol=TOL, atol=0)


def test_layouts_that_do_not_divide_fail_with_both_numbers():
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(parallel.MeshError, match=r"6 rows .* data x fsdp = 4 .* multiple of 8"):
        sft.check_batch_layout(12, 2, mesh)
    with pytest.raises(parallel.MeshError, match=r"text.num_heads 4 is not divisible by the mesh's tensor axis 8"):
        parallel.check_model_fits_mesh(CFG, parallel.make_mesh((1, 1, 8)))
