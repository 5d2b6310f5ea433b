"""The decoder's attention kernels: one entry point for training / prefill and one for decode, per backend.

  attention(q, k, v, segment_ids, impl)           causal self-attention within packed segments (no KV cache)
      "einsum"  CPU: scores + mask, fp32 softmax; hand-written backward (it exists for CPU speed).
      "cudnn"   GPU: cuDNN flash attention, CAUSAL mask over the packed segments (ragged offsets from the
                segment ids): no [T, T] bias operand, no dbias. jax's packed layout needs sm_90+ (Hopper);
                older GPUs (A100, L4) take "pallas_gpu" instead of cuDNN with the mask as a dense bias.
      "pallas_gpu"  GPU: jax's Pallas (Triton) flash attention (`pallas.ops.gpu.attention.mha`), causal with
                segment ids, forward and backward kernels that skip the blocks above the diagonal; kv heads
                repeated to the query heads (the kernel has no GQA).
      "splash"  TPU: Splash attention (Pallas) with a causal mask and segment ids.
  decode_attention(q, k, v, start, end, impl)     one query token per row over the live slots [start, end)
      "einsum"      CPU and the reference.
      "pallas_gpu"  jax's Pallas GPU decode kernel (`decode_attn_unbatched`), vmapped over [B, K]: it reads
                    only the key blocks before `end` and skips the slot splits wholly before `start`.
      "pallas_tpu"  a Pallas TPU kernel (`_decode_pallas_tpu`) over [B, K, S / 128 blocks]: blocks outside
                    [start, end) are neither fetched nor computed (S not a multiple of 128: one block).

Layouts (the decode contract of issue #17): training q [B, T, N, H], k/v [B, T, K, H]; decode q [B, N, H],
per-layer caches k/v [B, K, S, H], head-major as the dots consume them (no transpose per step). GQA: query head i uses kv head i // (N / K). Kernel paths run per shard (`_per_shard`)
under a mesh, as Pallas calls cannot be partitioned by XLA.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS = ("einsum", "cudnn", "pallas_gpu", "splash")
DECODE_IMPLS = ("einsum", "pallas_gpu", "pallas_tpu")
# query heads of one kv head padded to this in the Pallas GPU decode kernel (Triton dots need >= 16 rows)
_GPU_BLOCK_H = 16


def resolve_attention(impl: str, decoding: bool, dtype: str = "bfloat16", backend: str | None = None) -> str:
    """The kernel for a `ModelConfig.attention` setting: "auto" picks by backend (GPU cuDNN / Pallas GPU
    decode, TPU Splash / Pallas TPU decode, CPU einsum; cuDNN takes only 16-bit inputs, so fp32 training on
    GPU stays einsum); "einsum" forces einsum for both; "cudnn", "pallas_gpu" and "splash" name the training
    kernel and imply their backend's decode kernel."""
    backend = backend or jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "einsum")
        if impl == "cudnn" and not decoding and dtype not in ("bfloat16", "float16"):
            impl = "einsum"
    if not decoding:
        return impl
    return {"einsum": "einsum", "cudnn": "pallas_gpu", "pallas_gpu": "pallas_gpu", "splash": "pallas_tpu"}[impl]


# ---------------------------------------------------------------------------------------------- masks


def attention_mask(q_segment, kv_segment, q_index, kv_index):
    """bool [B, 1, T, S]: same (non-zero) segment and causal by slot index."""
    same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (q_segment[:, :, None] != 0)
    causal = kv_index[None, None, :] <= q_index[None, :, None]
    return (same & causal)[:, None]


def packed_segments(segment_ids, max_segments: int):
    """cuDNN's packed layout for segment ids [B, T] (1..k, each contiguous; 0 = padding): per row the
    length and first slot of segments 1..max_segments, -1 where a row has fewer (seqlen [B, M],
    offsets [B, M + 1]), and whether some row holds more segments than that (its attention would be wrong)."""
    t = segment_ids.shape[1]
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    hit = segment_ids[:, None, :] == ids[None, :, None]  # [B, M, T]
    length = jnp.sum(hit, axis=-1, dtype=jnp.int32)
    first = jnp.min(jnp.where(hit, jnp.arange(t, dtype=jnp.int32), t), axis=-1)
    present = length > 0
    seqlen = jnp.where(present, length, -1)
    offsets = jnp.concatenate([jnp.where(present, first, -1), jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)], 1)
    overflow = jnp.any(segment_ids > max_segments)
    return seqlen, offsets, overflow


# -------------------------------------------------------------------------------- training / prefill


def attention(q, k, v, segment_ids, *, impl: str, max_segments: int = 32, interpret: bool = False):
    """Causal self-attention within segments: q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T]
    (contiguous segments 1..k, 0 = padding) -> [B, T, N, H] in q's dtype.

    Rows of padding (segment 0) see no key: their output is not defined across impls (each kernel gives
    its own), and no other row sees them. `max_segments` bounds the segments per row of the cuDNN packed
    layout (static); a row with more turns the output into NaN rather than attend across segments.
    `interpret` runs the Pallas kernels in interpret mode (CPU tests). Splash tiles the sequence by 128:
    other lengths take the einsum path; the Pallas GPU kernel pads them to its block."""
    t = q.shape[1]
    if impl == "einsum" or (impl == "splash" and t % 128):
        idx = jnp.arange(t)
        return dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, idx, idx), causal=True)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids, max_segments)
    if impl == "pallas_gpu":
        return _pallas_gpu_attention(q, k, v, segment_ids, interpret)
    if impl == "splash":
        return _splash_attention(q, k, v, segment_ids, interpret)
    raise ValueError(f"unknown attention impl {impl!r}: use one of {IMPLS}")


def _cudnn_attention(q, k, v, segment_ids, max_segments):
    """cuDNN flash attention, CAUSAL mask per packed segment (ragged q/kv offsets): no bias, no dbias."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    if not cudnn.check_compute_capability("9.0"):  # jax's packed layout needs Hopper
        return _pallas_gpu_attention(q, k, v, segment_ids, False)
    seqlen, offsets, overflow = packed_segments(segment_ids, max_segments)
    out = cudnn.dot_product_attention(
        q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.CAUSAL,
    )
    # padding slots belong to no segment: cuDNN leaves them unwritten
    out = jnp.where((segment_ids > 0)[:, :, None, None], out, 0)
    return jnp.where(overflow, jnp.nan, out).astype(q.dtype)


def _pallas_gpu_attention(q, k, v, segment_ids, interpret):
    """Triton flash attention (jax's Pallas GPU `mha`), causal within segments, per shard; jax's default
    tiles (forward 128 x 128, backward 32 x 32: untuned here, no GPU was at hand). The sequence is padded to
    a whole number of tiles with segment 0 (seen by no real token) and cut back after."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, n, h = q.shape
    blocks = gpu_attention.BlockSizes.get_default()
    step = max(blocks.block_q, blocks.block_k)
    pad = -t % step
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))

    def run(q, k, v, seg):
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # GQA: the grads sum back over the copies
        return gpu_attention.mha(q, k, v, seg, sm_scale=h**-0.5, causal=True, block_sizes=blocks,
                                 interpret=interpret)

    out = _per_shard(run, (q, k, v, segment_ids),
                     (("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None),
                      ("act_batch", None, "act_kv_heads", None), ("act_batch", None)),
                     ("act_batch", None, "act_heads", None))
    return out[:, :t].astype(q.dtype)


def _splash_kernel(t: int, n: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t))] * n)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, segment_ids, interpret):
    """Splash attention (TPU), causal mask and segment ids, per row (vmap) and per shard."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, n, h = q.shape
    block = next(s for s in (512, 256, 128) if t % s == 0)

    def run(q, k, v, seg):
        kernel = _splash_kernel(t, q.shape[1], block, interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(q, k, v, seg)

    # head-major, the kernel's layout; the scale goes on q (splash does not scale)
    qh = jnp.transpose(q * jnp.asarray(h**-0.5, q.dtype), (0, 2, 1, 3))
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    out = _per_shard(run, (qh, kh, vh, segment_ids),
                     (("act_batch", "act_heads", None, None), ("act_batch", "act_kv_heads", None, None),
                      ("act_batch", "act_kv_heads", None, None), ("act_batch", None)),
                     ("act_batch", "act_heads", None, None))
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _per_shard(fn, args, in_names, out_names):
    """fn on each device's shard under the current mesh (specs from the logical axis rules), else fn."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    spec = lambda names: jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(names))  # noqa: E731
    return jax.shard_map(fn, in_specs=tuple(spec(s) for s in in_names), out_specs=spec(out_names),
                         check_vma=False)(*args)


# ------------------------------------------------------------------------------------- einsum path


def dot_product_attention(q, k, v, mask, causal: bool = False):
    """q [B,T,N,H], k/v [B,S,K,H] in the compute dtype; mask [B,1,T,S] bool. The CPU path (and the
    reference of the kernels); its custom backward exists for CPU speed.

    `causal=True` promises that the mask is causal by position (query i sees no key j > i, S = T): the
    queries are then cut into blocks that skip the keys after them (`causal_blocks`). Rows with no
    visible key at all (padding) are the one difference: they average over their block's keys instead of
    all keys; such rows are never seen by any other row.

    Mirrors transformers' eager path in the forward (scores in the compute dtype plus an additive mask of
    the dtype's min, softmax in fp32, cast back); its backward is written out flash-style (see
    `_attention_core`).
    """
    # head-major operands (k/v [B, K, S, H]): batched matmuls in the canonical layout (XLA:CPU otherwise
    # transposes the [.., T, S] scores around each dot: attention fwd+bwd 36 -> 13 ms per layer of the
    # `small` preset)
    return head_major_attention(q, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3)), mask, causal)


def head_major_attention(q, k, v, mask, causal: bool = False):
    """The einsum path of `dot_product_attention` over k/v already head-major [B, K, S, H] (the layout of
    the decode buffers: the prefill attends over what it has just written, with no second transpose)."""
    b, t, n, h = q.shape
    kh = k.shape[1]
    scale = h**-0.5
    g = n // kh
    # 5-D scores throughout (q [B, K, G, T, H]), so the backward keeps a single copy of the probs
    q = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 3, 1, 4))
    if not causal:
        out = _attention_core(q, k, v, mask, scale)
    else:
        bounds = causal_blocks(t)
        out = jnp.concatenate([
            _attention_core(q[:, :, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, :, lo:hi, :hi], scale)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ], axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def causal_blocks(t: int, min_rows: int = 64, max_blocks: int = 8) -> list[int]:
    """Query block bounds [0, ..., t] for causal attention: block i attends only to keys before its end, so
    n blocks skip (n - 1) / 2n of the scores. At least `min_rows` rows a block (smaller dots lose more
    than they skip), at most `max_blocks` (the blocks are unrolled). Measured on CPU, fwd+bwd of one layer of
    the `small` preset at T = 256: 16.4 ms in one block, 10.5 ms in 2, 7.0 ms in 4."""
    n = max(1, min(max_blocks, t // min_rows))
    return [t * i // n for i in range(n + 1)]


def _scores(q, k, mask, scale, select: bool = False):
    """Masked scores [B, K, G, T, S] in the compute dtype: q [B, K, G, T, H] . k [B, K, S, H] * scale + mask bias.

    `select` applies the mask as a select instead, with the same values (s + 0 = s, s + min = min): without
    gradients (prefill, decode) XLA:CPU then fuses the mask's broadcast, where it materialises the additive
    bias [B, K, G, T, S] once for a whole unrolled stack of layers (the tiny prefill at batch 64: 2.2 vs 2.8 ms);
    under gradients the additive bias keeps the CPU SFT step 5-10% faster."""
    dtype = q.dtype
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k) * jnp.asarray(scale, dtype)
    if select:
        return jnp.where(mask[:, :, None], scores, jnp.finfo(dtype).min)
    return scores + jnp.where(mask, 0, jnp.finfo(dtype).min).astype(dtype)[:, :, None]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, mask, scale):
    """softmax(scores) @ v, head-major; the softmax in fp32 and cast back to the compute dtype.

    The backward recomputes the probabilities from q, k and the saved row max and normaliser instead of
    keeping [T, S] probabilities per layer, and gets the softmax's row term from out . d_out (one reduction
    over H, not S). On CPU the SFT step of the `small` preset went 0.40 -> 0.36 s; the memory saved is
    B x heads x T x S per layer (at T = 4096 with 28 heads, 1.9 GB per row and layer in fp32). Called
    without gradients, it masks by select (`_scores`)."""
    return _attention_core_fwd(q, k, v, mask, scale, select=True)[0]


def _attention_core_fwd(q, k, v, mask, scale, select: bool = False):
    scores = _scores(q, k, mask, scale, select).astype(jnp.float32)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / total).astype(q.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    # the max and the log-normaliser kept apart: in a fully masked row (scores near the dtype's min) their
    # sum would round to the max and lose the normaliser
    return out, (q, k, v, mask, top, jnp.log(total), out)


def _attention_core_bwd(scale, res, g):
    q, k, v, mask, top, log_total, out = res
    probs = jnp.exp(_scores(q, k, mask, scale).astype(jnp.float32) - top - log_total)
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(q.dtype), g)
    dp = jnp.einsum("bkgth,bksh->bkgts", g, v).astype(jnp.float32)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta)).astype(q.dtype) * jnp.asarray(scale, q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", ds, k)
    dk = jnp.einsum("bkgts,bkgth->bksh", ds, q)
    return dq, dk, dv, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ------------------------------------------------------------------------------------------ decode


def decode_attention(q, k, v, start, end, *, impl: str = "auto", interpret: bool = False):
    """One query token per row over its live cache slots (CONTRACT.md): q [B, N, H], k/v [B, K, S, H],
    start/end [B] int32 -> softmax(q k^T / sqrt(H)) v over start <= s < end, fp32 softmax, [B, N, H] in q's
    dtype. "auto" picks by backend (`resolve_attention`); `interpret` runs the Pallas kernels on CPU. The
    Pallas GPU kernel tiles the slots by 16: other cache lengths take the einsum path."""
    if impl == "auto":
        impl = resolve_attention("auto", decoding=True)
    if impl == "pallas_gpu" and k.shape[2] % 16:
        impl = "einsum"
    b, n, h = q.shape
    kh = k.shape[1]
    q4 = q.reshape(b, kh, n // kh, h)  # query heads grouped by their kv head: a free reshape
    start, end = start.astype(jnp.int32), end.astype(jnp.int32)
    if impl == "einsum":
        live = (jnp.arange(k.shape[2]) >= start[:, None]) & (jnp.arange(k.shape[2]) < end[:, None])
        out = _attention_core(q4[:, :, :, None], k, v, live[:, None, None, :], h**-0.5)
    elif impl == "pallas_gpu":
        out = _per_shard(partial(_decode_pallas_gpu, interpret=interpret), (q4, k, v, start, end),
                         _DECODE_NAMES, ("act_batch", "act_kv_heads", None, None))
    elif impl == "pallas_tpu":
        out = _per_shard(partial(_decode_pallas_tpu, interpret=interpret), (q4, k, v, start, end),
                         _DECODE_NAMES, ("act_batch", "act_kv_heads", None, None))
    else:
        raise ValueError(f"unknown decode attention impl {impl!r}: use one of {DECODE_IMPLS}")
    return out.reshape(b, n, h).astype(q.dtype)


_DECODE_NAMES = (("act_batch", "act_kv_heads", None, None), ("act_batch", "act_kv_heads", None, None),
                 ("act_batch", "act_kv_heads", None, None), ("act_batch",), ("act_batch",))


def gpu_decode_blocks(s: int) -> tuple[int, int]:
    """(k_splits, block_k) for the Pallas GPU decode kernel over S slots: up to 16 splits of the slots run
    in parallel (each a whole number of >= 16-slot blocks), so one row's attention fills more than B x K
    programs."""
    for splits in (16, 8, 4, 2, 1):
        per = s // splits
        if s % splits == 0 and per % 16 == 0:
            return splits, next(bk for bk in (128, 64, 32, 16) if per % bk == 0)
    raise ValueError(f"the Pallas GPU decode kernel needs a cache length that is a multiple of 16, got {s}")


def _decode_pallas_gpu(q4, k, v, start, end, interpret):
    """jax's per-(batch, kv-head) Pallas GPU kernel, vmapped over [B, K] of the head-major cache (no copy)."""
    from jax.experimental.pallas.ops.gpu.decode_attention import decode_attn_unbatched

    splits, block_k = gpu_decode_blocks(k.shape[2])
    inner = partial(decode_attn_unbatched, sm_scale=q4.shape[-1] ** -0.5, block_h=_GPU_BLOCK_H, block_k=block_k,
                    k_splits=splits, num_warps=None, num_stages=2, grid=None, interpret=interpret, debug=False,
                    return_residuals=False, normalize_output=True)
    per_head = jax.vmap(inner, in_axes=(0, 0, 0, None, None))
    return jax.vmap(per_head)(q4, k, v, start, end)


def _decode_pallas_tpu(q4, k, v, start, end, interpret, block: int = 128):
    """A Pallas TPU decode kernel: grid [B, K, S / block], online softmax in VMEM scratch. The k/v block
    index is clamped to the row's live blocks, so blocks outside [start, end) repeat the previous index
    (the pipeline skips their copy) and their compute is skipped."""
    from jax.experimental.pallas import tpu as pltpu

    b, kh, s, h = k.shape
    g = q4.shape[2]
    bs = block if s % block == 0 else s
    nb = s // bs
    scale = h**-0.5
    neg = jnp.finfo(jnp.float32).min

    def kv_block(i, j, n, st, en):
        # truncating division (non-negative slots): floor division lowers through `sign`, which asks the
        # local device's TPU generation and so breaks deviceless compiles
        first, last = jax.lax.div(st[i], bs), jax.lax.div(jnp.maximum(en[i] - 1, 0), bs)
        return i, j, jnp.minimum(jnp.maximum(n, first), last), 0

    def kernel(st_ref, en_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc):
        i, n = pl.program_id(0), pl.program_id(2)
        st, en = st_ref[i], en_ref[i]
        lo = n * bs

        @pl.when(n == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, neg, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when((lo < en) & (lo + bs > st))
        def _block():
            sc = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
            slot = lo + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
            sc = jnp.where((slot >= st) & (slot < en), sc, neg)
            m_prev = m_sc[...]
            m_next = jnp.maximum(m_prev, jnp.max(sc, axis=-1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(sc - m_next[:, :1])
            l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
            pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv
            m_sc[...] = m_next

        @pl.when(n == nb - 1)
        def _write():
            o_ref[...] = (acc_sc[...] / l_sc[...][:, :1]).astype(o_ref.dtype)

    row = pl.BlockSpec((None, None, g, h), lambda i, j, n, st, en: (i, j, 0, 0))
    kv = pl.BlockSpec((None, None, bs, h), kv_block)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kh, nb), in_specs=[row, kv, kv], out_specs=row,
            scratch_shapes=[pltpu.VMEM((g, 128), jnp.float32), pltpu.VMEM((g, 128), jnp.float32),
                            pltpu.VMEM((g, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q4.shape, q4.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(start, end, q4, k, v)
