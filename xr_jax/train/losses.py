"""Token losses computed from final hidden states in chunks, never materialising [tokens, vocab] logits.

At 4096 tokens x 152k vocab the fp32 logits of one row are 2.5 GB; here the sequence is cut into
chunks of `chunk` tokens, each chunk's logits are made, reduced to (log p(target), logsumexp) in fp32
and dropped. `jax.checkpoint` on the chunk body makes the backward pass recompute a chunk's logits
instead of keeping all of them, so peak memory is one chunk of logits in both directions. A sequence that
fits in one chunk skips the map and the checkpoint: keeping its logits for the backward costs the same peak
as recomputing them, and saves a vocab-sized matmul (about a tenth of a small model's step on CPU).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

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
    """[n, B, chunk] -> [B, T]."""
    n, b, c = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c)[:, :t]


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


def _logprob_and_lse_bwd(res, g):
    logits, lse, targets = res
    g_logp, g_lse = g
    probs = jnp.exp(logits - lse[..., None])
    d = probs * (g_lse - g_logp)[..., None] + jnp.where(_is_target(logits, targets), g_logp[..., None], 0.0)
    return d.astype(logits.dtype), None


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


def token_logprobs(
    hidden: jax.Array, targets: jax.Array, head_fn: HeadFn, temperature: float = 1.0, chunk: int = 1024,
) -> jax.Array:
    """Per-token log-probabilities [B, T] (fp32) of `targets` under softmax(logits / temperature) — what
    the policy-gradient loss needs at the sampling temperature."""
    return target_logprobs_and_lse(hidden, targets, head_fn, temperature, chunk)[0]


def cross_entropy_sums(
    hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array, head_fn: HeadFn, chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token cross-entropy, sum of masked logsumexp^2), fp32 scalars.

    Sums, not means: the caller divides by the token count of the *global* batch, which is what makes
    the loss independent of packing, microbatching and the mesh. The second sum is the z-loss term
    (PaLM): it keeps the softmax normaliser near 1.
    """
    logp, lse = target_logprobs_and_lse(hidden, targets, head_fn, 1.0, chunk)
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(logp * mask), jnp.sum(jnp.square(lse) * mask)
