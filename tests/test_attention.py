"""The decoder's einsum attention: its hand-written backward and its causal query blocks.

The reference is the textbook formula differentiated by JAX (scores * scale + mask bias, softmax, @ v),
which is what transformers' eager attention computes; the model-level parity tests cover the forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xr_jax.models import qwen2

B, N, K, H = 2, 4, 2, 8


def _inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, t, K, H)), jnp.float32) for _ in range(2))
    # row 0: three packed segments; row 1: one segment and right padding (segment 0)
    seg = np.ones((B, t), np.int32)
    seg[0, t // 3:] = 2
    seg[0, 2 * t // 3:] = 3
    seg[1, t - t // 4:] = 0
    idx = jnp.arange(t)
    mask = qwen2.attention_mask(jnp.asarray(seg), jnp.asarray(seg), idx, idx)
    w = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    return q, k, v, mask, w, seg


def _reference(q, k, v, mask):
    b, t, n, h = q.shape
    kk = jnp.repeat(k, n // k.shape[2], axis=2)
    vv = jnp.repeat(v, n // v.shape[2], axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, kk) * h**-0.5
    scores = scores + jnp.where(mask, 0, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), vv)


def _value_and_grads(fn, q, k, v, w):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_backward_matches_autodiff_of_the_formula_including_padding_rows():
    q, k, v, mask, w, _ = _inputs(24)
    got = _value_and_grads(lambda q, k, v: qwen2.dot_product_attention(q, k, v, mask, "einsum"), q, k, v, w)
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, mask), q, k, v, w)
    assert _rel(got[0], want[0]) < 1e-5
    for g, r in zip(got[1], want[1]):
        assert _rel(g, r) < 1e-5


@pytest.mark.parametrize("t", [130, 200, 256])
def test_causal_blocks_equal_one_block_on_rows_that_see_a_key(t):
    q, k, v, mask, w, seg = _inputs(t, seed=t)
    assert len(qwen2.causal_blocks(t)) > 2  # the test must cross block bounds
    w = w * jnp.asarray(seg > 0)[:, :, None, None]  # padding rows carry no loss, as in training
    att = lambda causal: lambda q, k, v: qwen2.dot_product_attention(  # noqa: E731
        q, k, v, mask, "einsum", causal=causal)
    blocked, whole = _value_and_grads(att(True), q, k, v, w), _value_and_grads(att(False), q, k, v, w)
    visible = (seg > 0)[:, :, None, None]
    assert _rel(jnp.where(visible, att(True)(q, k, v), 0), jnp.where(visible, att(False)(q, k, v), 0)) < 1e-6
    assert _rel(blocked[0], whole[0]) < 1e-6
    for g, r in zip(blocked[1], whole[1]):
        assert _rel(g, r) < 1e-5


def test_causal_block_bounds():
    assert qwen2.causal_blocks(17) == [0, 17]
    assert qwen2.causal_blocks(256) == [0, 64, 128, 192, 256]
    for t in (64, 100, 1000, 4096, 32768):
        b = qwen2.causal_blocks(t)
        assert b[0] == 0 and b[-1] == t and len(b) - 1 <= 8
        assert min(np.diff(b)) >= 64
