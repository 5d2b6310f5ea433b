"""Token losses computed from final hidden states in chunks, never materialising [tokens, vocab] logits.

At 4096 tokens x 152k vocab the fp32 logits of one row are 2.5 GB; here the sequence is cut into
chunks of `chunk` tokens, each chunk's logits are made, reduced to (log p(target), logsumexp) in fp32
and dropped. Two paths:
- `target_logprobs_and_lse` (GRPO: per-token cotangents known only in the backward): `jax.checkpoint` on
  the chunk body makes the backward recompute a chunk's logits instead of keeping all of them. A sequence
  that fits in one chunk skips the map and the checkpoint (same peak, one vocab-sized matmul fewer).
- `fused_cross_entropy` (SFT: the per-token cotangents are the loss weights, known in the forward): each
  chunk's d hidden and d weight are made in the forward, so no logits are kept or recomputed.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from xr_jax.models.layers import matmul_grads

HeadFn = Callable[[jax.Array], jax.Array]  # hidden [..., D] -> logits [..., V]


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], padding T up to a multiple of `chunk` (batch axis kept second so
    its sharding is untouched)."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def _from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[n, B, chunk, ...] -> [B, T, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])[:, :t]


def _target_logit(logits, targets):
    """logits[..., target]. Elsewhere than CPU by comparison, not a gather: that stays local when the vocab
    axis is sharded. On CPU a gather, as XLA:CPU writes the compared logits out in full before summing
    (about 3% of a small model's step)."""
    if jax.default_backend() == "cpu":
        return jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(_is_target(logits, targets), logits, 0.0), axis=-1)


def _is_target(logits, targets):
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


@jax.custom_vjp
def logprob_and_lse(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log softmax(logits)[target], logsumexp(logits)) over the last axis, fp32 logits [..., V].

    A custom VJP: the backward is one fused pass, d logits = softmax * (g_lse - g_logp) + onehot * g_logp,
    where autodiff would materialise the target selection over the whole vocab in the forward and add
    the selection's and the softmax's cotangents in separate passes (on CPU about 8% of a small model's step).
    """
    return _logprob_and_lse_fwd(logits, targets)[0]


def _logprob_and_lse_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    return (_target_logit(logits, targets) - lse, lse), (logits, lse, targets)


def _d_logits(logits, lse, targets, g_logp, g_lse):
    """d logits of g_logp * log p(target) + g_lse * logsumexp, in one pass: softmax * (g_lse - g_logp) + onehot * g_logp."""
    probs = jnp.exp(logits - lse[..., None])
    return probs * (g_lse - g_logp)[..., None] + jnp.where(_is_target(logits, targets), g_logp[..., None], 0.0)


def _logprob_and_lse_bwd(res, g):
    logits, lse, targets = res
    return _d_logits(logits, lse, targets, *g).astype(logits.dtype), None


logprob_and_lse.defvjp(_logprob_and_lse_fwd, _logprob_and_lse_bwd)


def target_logprobs_and_lse(
    hidden: jax.Array, targets: jax.Array, head_fn: HeadFn, temperature: float = 1.0, chunk: int = 1024,
    with_entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """(log p(targets), logsumexp of the scaled logits[, entropy]), fp32 [B, T] each, from hidden [B, T, D].

    logits = head_fn(hidden) / temperature, upcast to fp32 before the softmax statistics; the entropy
    (of softmax(logits / temperature)) is only computed when asked, as it costs one more vocab pass.
    """
    t = hidden.shape[1]
    chunk = min(chunk, t)

    def one(args):
        h, tgt = args
        logits = head_fn(h).astype(jnp.float32) / temperature
        logp, lse = logprob_and_lse(logits, tgt)
        if not with_entropy:
            return logp, lse
        probs = jnp.exp(logits - lse[..., None])
        return logp, lse, lse - jnp.sum(probs * logits, axis=-1)

    if chunk == t:
        return one((hidden, targets))
    out = jax.lax.map(jax.checkpoint(one), (_to_chunks(hidden, chunk), _to_chunks(targets, chunk)))
    return tuple(_from_chunks(x, t) for x in out)


def fused_cross_entropy(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, ce_weights: jax.Array, z_weights: jax.Array,
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, log p(targets), logsumexp) for the LM head `weight` [D, V] on hidden [B, T, D]:
    objective = sum of ce_weights * -log p(target) + z_weights * logsumexp^2 (fp32, weights [B, T]).

    For the SFT loss, whose per-token cotangents are these fixed weights: each chunk of `chunk` tokens per
    row makes its logits, its d logits and its share of d hidden and d weight in the forward, while the
    chunk is still in cache, and drops the logits. No logits are kept and none are recomputed (the chunked
    path of `target_logprobs_and_lse` runs the head matmul a fourth time). Only the objective is
    differentiable; the per-token values are returned for metrics (their gradient is zero).
    """
    objective, logp, lse = _fused_ce(hidden, weight, targets, ce_weights, z_weights, chunk)
    return objective, jax.lax.stop_gradient(logp), jax.lax.stop_gradient(lse)


def _fused_ce_chunks(hidden, weight, targets, ce_weights, z_weights, chunk):
    t = hidden.shape[1]
    chunk = min(chunk, t)

    def one(d_weight, xs):
        h, tgt, w_ce, w_z = xs
        logits = jnp.dot(h, weight).astype(jnp.float32)
        (logp, lse), _ = _logprob_and_lse_fwd(logits, tgt)
        # the objective's per-token cotangents: -w_ce for log p, 2 w_z lse for lse
        d = _d_logits(logits, lse, tgt, -w_ce, 2 * w_z * lse)
        dh, dw = matmul_grads(h, weight, d.astype(h.dtype))
        objective = jnp.sum(-w_ce * logp + w_z * lse * lse)
        return d_weight + dw.astype(jnp.float32), (objective, logp, lse, dh)

    xs = tuple(_to_chunks(x, chunk) for x in (hidden, targets, ce_weights, z_weights))
    d_weight, (objective, logp, lse, dh) = jax.lax.scan(one, jnp.zeros(weight.shape, jnp.float32), xs)
    return jnp.sum(objective), _from_chunks(logp, t), _from_chunks(lse, t), _from_chunks(dh, t), d_weight


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_ce(hidden, weight, targets, ce_weights, z_weights, chunk):
    return _fused_ce_chunks(hidden, weight, targets, ce_weights, z_weights, chunk)[:3]


def _fused_ce_fwd(hidden, weight, targets, ce_weights, z_weights, chunk):
    objective, logp, lse, dh, d_weight = _fused_ce_chunks(hidden, weight, targets, ce_weights, z_weights, chunk)
    return (objective, logp, lse), (dh, d_weight.astype(weight.dtype))


def _fused_ce_bwd(chunk, res, g):
    dh, d_weight = res
    g_objective = g[0]  # logp and lse leave `fused_cross_entropy` through a stop_gradient
    # the loss weights are constants of the objective: no cotangent (None = zeros)
    return g_objective.astype(dh.dtype) * dh, g_objective.astype(d_weight.dtype) * d_weight, None, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
