"""The decoder's einsum attention: its hand-written backward and its causal query blocks.

The reference is the textbook formula differentiated by JAX (scores * scale + mask bias, softmax, @ v),
which is what transformers' eager attention computes; the model-level parity tests cover the forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xr_jax.models import attention

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
    mask = attention.attention_mask(jnp.asarray(seg), jnp.asarray(seg), idx, idx)
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
    got = _value_and_grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask), q, k, v, w)
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, mask), q, k, v, w)
    assert _rel(got[0], want[0]) < 1e-5
    for g, r in zip(got[1], want[1]):
        assert _rel(g, r) < 1e-5


@pytest.mark.parametrize("t", [130, 200, 256])
def test_causal_blocks_equal_one_block_on_rows_that_see_a_key(t):
    q, k, v, mask, w, seg = _inputs(t, seed=t)
    assert len(attention.causal_blocks(t)) > 2  # the test must cross block bounds
    w = w * jnp.asarray(seg > 0)[:, :, None, None]  # padding rows carry no loss, as in training
    att = lambda causal: lambda q, k, v: attention.dot_product_attention(  # noqa: E731
        q, k, v, mask, causal=causal)
    blocked, whole = _value_and_grads(att(True), q, k, v, w), _value_and_grads(att(False), q, k, v, w)
    visible = (seg > 0)[:, :, None, None]
    assert _rel(jnp.where(visible, att(True)(q, k, v), 0), jnp.where(visible, att(False)(q, k, v), 0)) < 1e-6
    assert _rel(blocked[0], whole[0]) < 1e-6
    for g, r in zip(blocked[1], whole[1]):
        assert _rel(g, r) < 1e-5


def test_causal_block_bounds():
    assert attention.causal_blocks(17) == [0, 17]
    assert attention.causal_blocks(256) == [0, 64, 128, 192, 256]
    for t in (64, 100, 1000, 4096, 32768):
        b = attention.causal_blocks(t)
        assert b[0] == 0 and b[-1] == t and len(b) - 1 <= 8
        assert min(np.diff(b)) >= 64


# ---------------------------------------------------------------- kernels vs the einsum path (CPU, interpret)


@pytest.mark.parametrize("impl,t", [("splash", 128), ("pallas_gpu", 128), ("pallas_gpu", 100)])
def test_training_kernels_match_einsum_loss_and_grads_on_packed_and_padded_rows(impl, t):
    """The TPU (Splash) and GPU (Triton flash) training kernels in Pallas interpret mode against the einsum
    path: GQA, three packed segments, left and right padding; padding rows carry no loss (their outputs
    differ by design). t = 100 is no whole number of the GPU kernel's blocks: it pads and cuts back."""
    q, k, v, _, w, seg = _inputs(t, seed=3)
    seg[1, :10] = 0  # left padding too, as GRPO's rows have
    seg = jnp.asarray(seg)
    w = w * (seg > 0)[:, :, None, None]
    run = lambda impl: lambda q, k, v: attention.attention(q, k, v, seg, impl=impl, interpret=True)  # noqa: E731
    got, want = _value_and_grads(run(impl), q, k, v, w), _value_and_grads(run("einsum"), q, k, v, w)
    assert _rel(got[0], want[0]) < 1e-5
    for g, r in zip(got[1], want[1]):
        assert _rel(g, r) < 1e-5


def test_packed_segments_rebuild_the_reference_mask():
    """cuDNN's packed layout (per-row segment lengths and first slots) describes exactly the segment-causal
    mask on every non-padding query, and flags rows with more segments than it holds."""
    t = 48
    seg = np.zeros((3, t), np.int32)
    seg[0, :10], seg[0, 10:30], seg[0, 30:47] = 1, 2, 3  # packed, right padding
    seg[1, 5:] = 1  # left padding (GRPO)
    seg[2, :] = 1
    seqlen, offsets, overflow = attention.packed_segments(jnp.asarray(seg), max_segments=4)
    assert offsets.shape == (3, 5) and not bool(overflow)
    np.testing.assert_array_equal(np.asarray(seqlen)[0], [10, 20, 17, -1])
    np.testing.assert_array_equal(np.asarray(offsets)[1], [5, -1, -1, -1, -1])
    rebuilt = np.zeros((3, t, t), bool)
    for b in range(3):
        for n, o in zip(np.asarray(seqlen)[b], np.asarray(offsets)[b]):
            if n > 0:
                rebuilt[b, o:o + n, o:o + n] = np.tril(np.ones((n, n), bool))
    idx = jnp.arange(t)
    want = attention.attention_mask(jnp.asarray(seg), jnp.asarray(seg), idx, idx)
    np.testing.assert_array_equal(rebuilt, np.asarray(want)[:, 0])
    assert bool(attention.packed_segments(jnp.asarray(seg), max_segments=2)[2])


def _decode_inputs(dtype, b=3, k=2, g=3, s=256, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, k * g, h)), dtype)
    kv = [jnp.asarray(rng.standard_normal((b, k, s, h)), dtype) for _ in range(2)]
    # rows with their own left padding, all ending before the cache does; one row crosses a 128-slot block
    start, end = jnp.array([0, 37, 130][:b], jnp.int32), jnp.array([200, 200, 131][:b], jnp.int32)
    return q, kv[0], kv[1], start, end


def test_einsum_decode_is_softmax_over_the_live_slots():
    q, k, v, start, end = _decode_inputs(jnp.float32)
    out = attention.decode_attention(q, k, v, start, end, impl="einsum")
    kk, vv = (np.repeat(np.asarray(x), 3, axis=1) for x in (k, v))  # [B, N, S, H]
    for b in range(q.shape[0]):
        lo, hi = int(start[b]), int(end[b])
        scores = np.einsum("nh,nsh->ns", np.asarray(q[b]), kk[b, :, lo:hi]) / np.sqrt(q.shape[-1])
        p = np.exp(scores - scores.max(-1, keepdims=True))
        want = np.einsum("ns,nsh->nh", p / p.sum(-1, keepdims=True), vv[b, :, lo:hi])
        np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decode_kernels_match_einsum_in_interpret_mode(impl, dtype, tol):
    q, k, v, start, end = _decode_inputs(dtype)
    got = attention.decode_attention(q, k, v, start, end, impl=impl, interpret=True)
    want = attention.decode_attention(q, k, v, start, end, impl="einsum")
    assert got.dtype == dtype and got.shape == q.shape
    assert _rel(got.astype(jnp.float32), want.astype(jnp.float32)) < tol


def test_resolve_attention_by_backend_and_dtype():
    r = attention.resolve_attention
    assert [r("auto", False, "bfloat16", b) for b in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "einsum"]
    assert [r("auto", True, "bfloat16", b) for b in ("gpu", "tpu", "cpu")] == ["pallas_gpu", "pallas_tpu", "einsum"]
    assert r("auto", False, "float32", "gpu") == "einsum"  # cuDNN takes 16-bit inputs only
    assert r("einsum", True, "bfloat16", "gpu") == "einsum"
    assert r("pallas_gpu", False, "bfloat16", "gpu") == "pallas_gpu" and r("pallas_gpu", True) == "pallas_gpu"
    assert attention.gpu_decode_blocks(5120) == (16, 64) and attention.gpu_decode_blocks(48) == (1, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        attention.gpu_decode_blocks(383)


def test_gpu_flash_attention_runs_per_shard_under_a_mesh():
    """Rows sharded over 2 devices: each runs the Triton kernel on its own rows."""
    from xr_jax.parallel import make_mesh, use_mesh

    q, k, v, _, _, seg = _inputs(64, seed=4)
    seg = jnp.asarray(seg)
    run = lambda impl: lambda q, k, v: attention.attention(q, k, v, seg, impl=impl, interpret=True)  # noqa: E731
    with use_mesh(make_mesh((1, 2, 1), jax.devices()[:2])):
        assert "shard_map" in str(jax.make_jaxpr(run("pallas_gpu"))(q, k, v))
        got = jax.jit(run("pallas_gpu"))(q, k, v)
    visible = (seg > 0)[:, :, None, None]
    assert _rel(jnp.where(visible, got, 0), jnp.where(visible, run("einsum")(q, k, v), 0)) < 1e-5


def test_decode_kernel_runs_per_shard_under_a_mesh():
    """Under a mesh the Pallas call runs on each device's rows (shard_map): XLA cannot partition it."""
    from xr_jax.parallel import make_mesh, use_mesh

    q, k, v, start, end = (x[:2] for x in _decode_inputs(jnp.float32))
    run = lambda *a: attention.decode_attention(*a, impl="pallas_tpu", interpret=True)  # noqa: E731
    with use_mesh(make_mesh((1, 2, 1), jax.devices()[:2])):
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, start, end))
        got = jax.jit(run)(q, k, v, start, end)
    assert _rel(got, attention.decode_attention(q, k, v, start, end, impl="einsum")) < 1e-5


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="compiled kernels need a GPU or a TPU")
def test_compiled_kernels_match_einsum_on_the_accelerator():
    """On a GPU (cuDNN, Pallas GPU decode) or a TPU (Splash, Pallas TPU decode), compiled, in bf16: the same
    loss and grads as the einsum path within bf16 rounding, and decode as in interpret mode."""
    rng = np.random.default_rng(5)
    t, h = 256, 64
    q = jnp.asarray(rng.standard_normal((B, t, N, h)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((B, t, K, h)), jnp.bfloat16) for _ in range(2))
    seg = np.ones((B, t), np.int32)
    seg[0, 100:], seg[1, 200:] = 2, 0
    seg = jnp.asarray(seg)
    w = jnp.asarray(rng.standard_normal((B, t, N, h)), jnp.bfloat16) * (seg > 0)[:, :, None, None]
    run = lambda impl: jax.jit(lambda q, k, v: attention.attention(q, k, v, seg, impl=impl))  # noqa: E731
    want = _value_and_grads(run("einsum"), q, k, v, w)
    kernels = [attention.resolve_attention("auto", False)] + (["pallas_gpu"] if jax.default_backend() == "gpu" else [])
    for impl in kernels:
        got = _value_and_grads(run(impl), q, k, v, w)
        assert _rel(got[0].astype(jnp.float32), want[0].astype(jnp.float32)) < 2e-2, impl
        for g, r in zip(got[1], want[1]):
            assert _rel(g.astype(jnp.float32), r.astype(jnp.float32)) < 2e-2, impl
    q, k, v, start, end = _decode_inputs(jnp.bfloat16, h=64)
    dec = jax.jit(lambda *a: attention.decode_attention(*a, impl="auto"))(q, k, v, start, end)
    assert _rel(dec.astype(jnp.float32),
                attention.decode_attention(q, k, v, start, end, impl="einsum").astype(jnp.float32)) < 2e-2
