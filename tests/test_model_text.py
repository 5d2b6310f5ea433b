"""Qwen2.5-VL language model vs transformers: logits, M-RoPE positions, KV cache, bf16, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import hf_reference as ref
from xr_jax import parallel
from xr_jax.models import hf
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL, get_rope_index

TOL = 1e-4  # max |Δlogits| / max |logits|, fp32


def _text_only(tree):
    return {k: v for k, v in tree.items() if k != "visual"}


@pytest.fixture(scope="module")
def vl():
    model = ref.tiny_vl(seed=0)
    return model, hf.tree_from_hf(ref.state_dict_numpy(model))


def _rel_err(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - b)[mask].max() / np.abs(b[mask]).max())


def test_text_logits_padded_batch_match_transformers(vl):
    model, tree = vl
    cfg = tiny_vl_config(vision=None)
    rng = np.random.RandomState(1)
    ids = rng.randint(2, 60, size=(3, 17))
    am = np.ones_like(ids)
    am[1, :5] = 0  # left padding
    am[2, :11] = 0
    pos, _ = get_rope_index(ids, None, am, cfg)
    want = ref.hf_logits(model, ids, am, pos)
    got, _ = Qwen2_5_VL(cfg).apply({"params": _text_only(tree)}, ids, pos, am)
    err = _rel_err(got, want, am.astype(bool))
    assert err < TOL, err


def test_rope_index_matches_transformers_with_images():
    model = ref.tiny_vl(seed=0)
    cfg = tiny_vl_config()
    rng = np.random.RandomState(2)
    rows = [
        ref.image_prompt(rng, [(1, 4, 6)], [3, 3]),
        ref.image_prompt(rng, [(1, 8, 12), (1, 4, 4)], [2, 5, 1]),
        list(rng.randint(2, 60, size=9)),
        ref.image_prompt(rng, [(1, 10, 10)], [0, 4]),
    ]
    grids = [(1, 4, 6), (1, 8, 12), (1, 4, 4), (1, 10, 10)]
    length = max(map(len, rows)) + 2
    ids = np.zeros((len(rows), length), np.int64)
    am = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding
        ids[i, length - len(r):] = r
        am[i, length - len(r):] = 1
    pos, deltas = get_rope_index(ids, np.array(grids), am, cfg)
    with torch.no_grad():
        want_pos, want_d = model.model.get_rope_index(
            torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == ref.IMAGE_TOKEN).astype(np.int64)),
            image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(am),
        )
    np.testing.assert_array_equal(pos, ref.swap_rope_axes(want_pos.numpy()))
    np.testing.assert_array_equal(deltas, want_d.numpy()[:, 0])
    # the worked example of reference/qwen2_5_vl.md §7.2
    one = np.array([ref.image_prompt(np.random.RandomState(0), [(1, 4, 6)], [3, 3])])
    p, d = get_rope_index(one, np.array([(1, 4, 6)]), None, cfg)
    assert p[0].tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10],
    ] and d.tolist() == [-3]


def test_kv_cache_prefill_then_decode_equals_full_forward(vl):
    _, tree = vl
    cfg = tiny_vl_config(vision=None)
    params = {"params": _text_only(tree)}
    model = Qwen2_5_VL(cfg)
    rng = np.random.RandomState(3)
    ids = rng.randint(2, 60, size=(2, 14))
    am = np.ones_like(ids)
    am[0, :4] = 0
    pos, _ = get_rope_index(ids, None, am, cfg)
    full, _ = model.apply(params, ids, pos, am)
    got, kv = ref.cached_logits(cfg, params["params"], ids, pos, am, prompt=6)
    mask = am.astype(bool)
    assert np.abs(got - np.asarray(full))[mask].max() < 1e-5
    assert kv[0][0].shape[2] == ids.shape[1]


def test_bf16_compute_within_bf16_tolerance(vl):
    model, tree = vl
    cfg32 = tiny_vl_config(vision=None)
    cfg16 = tiny_vl_config(vision=None, dtype="bfloat16")
    ids = np.random.RandomState(4).randint(2, 60, size=(2, 16))
    am = np.ones_like(ids)
    pos, _ = get_rope_index(ids, None, am, cfg32)
    f32, _ = Qwen2_5_VL(cfg32).apply({"params": _text_only(tree)}, ids, pos, am)
    b16, _ = Qwen2_5_VL(cfg16).apply({"params": _text_only(tree)}, ids, pos, am)
    assert b16.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (rel. step 2^-8 = 3.9e-3); two layers of rounding stay within 4 steps
    assert _rel_err(b16, np.asarray(f32), am.astype(bool)) < 1.6e-2


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_on_8_devices_equals_single_device(vl, shape):
    _, tree = vl
    cfg = tiny_vl_config(vision=None)
    ids = np.random.RandomState(5).randint(2, 60, size=(8, 16))
    am = np.ones_like(ids)
    am[3, :6] = 0
    pos, _ = get_rope_index(ids, None, am, cfg)
    model = Qwen2_5_VL(cfg)
    single, _ = model.apply({"params": _text_only(tree)}, ids, pos, am)
    mesh = parallel.make_mesh(shape)
    params = jax.device_put(_text_only(tree), parallel.param_shardings(_boxed(cfg), mesh))
    sharded = [not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(params)]
    assert any(sharded) == (shape[1] * shape[2] > 1)  # pure data parallel replicates params
    with parallel.use_mesh(mesh):
        fn = jax.jit(lambda p, i, q, s: model.apply({"params": p}, i, q, s)[0],
                     in_shardings=(None, parallel.batch_sharding(mesh), None, parallel.batch_sharding(mesh)))
        out = fn(params, ids, pos, am)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def _boxed(cfg):
    from xr_jax.models.qwen2_5_vl import init_params

    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
