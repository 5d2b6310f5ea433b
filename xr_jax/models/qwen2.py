"""The Qwen2 / Qwen2.5 text decoder (also the language model inside Qwen2.5-VL).

Training runs the full sequence (packed rows via segment ids) with the decoder layers under `nn.scan`,
params stacked on a leading `layers` axis — the layout of `xr_jax.models.naming`; `scan_layers=False`
unrolls the same scan, so the param tree never changes.

Decoding (the sampler, `qwen2_5_vl.prefill` / `decode_step`) goes through `decode_weights` / `run_layers`:
the same `DecoderLayer`, applied layer by layer to per-layer weights (split from the stack and cast once
per rollout) and per-layer KV buffers [B, K, S, H], so that a decode step reads each weight and each
cache entry once, with no per-layer slice or transpose copies.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xr_jax.models.attention import (
    attention,
    decode_attention,
    head_major_attention,
    resolve_attention,
)
from xr_jax.models.config import ModelConfig, TextConfig
from xr_jax.models.layers import MLP, Dense, RMSNorm, apply_rotary, as_dtype, matmul, remat_policy

def text_rotary(positions, cfg: TextConfig, dtype):
    """cos/sin [B, T, head_dim] for positions [B, 3, T] (M-RoPE) — cast to the compute dtype as transformers does.

    Frequency chunk i of `mrope_section` takes its angle from axis i % 3 (t, h, w); a text-only model
    (`mrope_section` None) uses axis 0. Each frequency picks its position axis before the multiply, so
    only [B, T, hd/2] angles are computed. inv_freq is computed in float64 and rounded once, the closest
    float32 to the exact value.
    """
    hd = cfg.head_dim
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
    if cfg.mrope_section is None:
        axis_of = np.zeros(hd // 2, np.int32)
    else:
        axis_of = np.concatenate([np.full(n, i % 3) for i, n in enumerate(cfg.mrope_section)])
    pos = jnp.swapaxes(positions, 1, 2)[..., axis_of]  # [B, T, hd/2]: the position each frequency rotates by
    freqs = pos.astype(jnp.float32) * inv_freq
    # cos/sin of the hd/2 angles, widened to [cos, cos] by a 0/1 matmul (exact at HIGHEST precision): XLA
    # keeps a dot's output, where it would fuse cos/sin into every layer's q and k rotation of an unrolled
    # stack and evaluate them there again (on CPU, the slowest fusions of a small model's prefill)
    widen = np.concatenate([np.eye(hd // 2), np.eye(hd // 2)], axis=1).astype(np.float32)
    both = jnp.einsum("...f,fh->...h", jnp.stack([jnp.cos(freqs), jnp.sin(freqs)]), widen,
                      precision=jax.lax.Precision.HIGHEST)
    return both[0].astype(dtype), both[1].astype(dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        """Without a cache (training), `mask` is the segment ids [B, T]: causal attention within segments
        (`attention.attention`). With this layer's per-layer KV buffers (`run_layers`): (k, v) [B, K, S, H];
        the new k/v go in at slot cache_index, and `mask` is either (start, end) [B] for one decode token
        (`attention.decode_attention` over the live slots) or the [B, 1, T, T] mask of a prompt written at
        slot 0 into buffers of T slots (it attends over its own k/v)."""
        tc, dtype, pdt = self.cfg.text, as_dtype(self.cfg.dtype), as_dtype(self.cfg.param_dtype)
        b, t, _ = x.shape
        hd = tc.head_dim
        dense = lambda f, axes, bias, name: Dense(f, axes, bias, dtype, pdt, name=name)  # noqa: E731
        q = dense(tc.num_heads * hd, ("embed", "heads"), True, "q_proj")(x).reshape(b, t, tc.num_heads, hd)
        k = dense(tc.num_kv_heads * hd, ("embed", "kv_heads"), True, "k_proj")(x).reshape(b, t, tc.num_kv_heads, hd)
        v = dense(tc.num_kv_heads * hd, ("embed", "kv_heads"), True, "v_proj")(x).reshape(b, t, tc.num_kv_heads, hd)
        q = apply_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
        k = apply_rotary(k, cos[:, :, None, :], sin[:, :, None, :])
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        new_kv = None
        if cache_kv is None:
            out = attention(q, k, v, mask, impl=resolve_attention(self.cfg.attention, False, self.cfg.dtype))
        else:
            new_kv = tuple(
                jax.lax.dynamic_update_slice(c, jnp.swapaxes(a, 1, 2).astype(c.dtype), (0, 0, cache_index, 0))
                for c, a in zip(cache_kv, (k, v))
            )
            if isinstance(mask, tuple):
                impl = resolve_attention(self.cfg.attention, True, self.cfg.dtype)
                out = decode_attention(q[:, 0], *(c.astype(dtype) for c in new_kv), *mask, impl=impl)[:, None]
            else:
                # a prompt written at slot 0 fills its buffers: attend over them as written, causally
                out = head_major_attention(q, *(c.astype(dtype) for c in new_kv), mask, causal=True)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        out = Dense(tc.hidden_size, ("heads", "embed"), False, dtype, pdt, name="o_proj")(out.reshape(b, t, -1))
        return out, new_kv


class DecoderLayer(nn.Module):
    """Pre-norm block; scan signature `((h, cache_kv), *broadcast) -> ((h, new_cache_kv), None)` (cache_kv None
    in training; one layer's buffers when `run_layers` applies it)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_index):
        h, cache_kv = carry
        tc, dtype, pdt = self.cfg.text, as_dtype(self.cfg.dtype), as_dtype(self.cfg.param_dtype)
        norm = lambda name: RMSNorm(tc.rms_norm_eps, "embed", dtype, pdt, name=name)  # noqa: E731
        a, new_kv = Attention(self.cfg, name="self_attn")(
            norm("input_layernorm")(h), cos, sin, mask, cache_kv, cache_index
        )
        h = h + a
        h = h + MLP(tc.hidden_size, tc.intermediate_size, dtype=dtype, param_dtype=pdt, name="mlp")(
            norm("post_attention_layernorm")(h)
        )
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
        return (h, new_kv), None


class TextModel(nn.Module):
    """`model.*` of the HF checkpoint: embed_tokens, layers (stacked), norm."""

    cfg: ModelConfig

    def setup(self):
        tc, dtype, pdt = self.cfg.text, as_dtype(self.cfg.dtype), as_dtype(self.cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            tc.vocab_size, tc.hidden_size, dtype=dtype, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        layer = DecoderLayer
        if self.cfg.remat != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=remat_policy(self.cfg.remat))
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=tc.num_layers,
            unroll=1 if self.cfg.scan_layers else tc.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg)
        self.norm = RMSNorm(tc.rms_norm_eps, "embed", dtype, pdt)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, positions, segment_ids):
        """embeds [B,T,D], positions [B,3,T], segment_ids [B,T] (0 = padding) -> final hidden [B,T,D]."""
        dtype = as_dtype(self.cfg.dtype)
        cos, sin = text_rotary(positions, self.cfg.text, dtype)
        h = nn.with_logical_constraint(embeds.astype(dtype), ("act_batch", "act_length", "act_embed"))
        (h, _), _ = self.layers((h, None), cos, sin, segment_ids, None)
        return self.norm(h)

    def attend(self, h):
        """Tied LM head: logits = h @ embedding.T (as `nn.Embed.attend`, through `layers.matmul`)."""
        dtype = as_dtype(self.cfg.dtype)
        return matmul(h.astype(dtype), self.embed_tokens.embedding.astype(dtype).T)


# ----------------------------------------------------------------------------------- per-layer decoding


def decode_weights(params, dtype) -> dict:
    """The params as decoding reads them: {"layers": one param tree per decoder layer, "rest": the others},
    floating-point leaves cast to `dtype`. Made once per rollout: a decode step then reads each layer's
    weights where they lie (no per-token slice out of the stack, no per-token cast of fp32 master weights).
    Casting to the compute dtype changes no result (every layer casts its params to it before use)."""
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    stacked = params["model"]["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda x, i=i: cast(x[i]), stacked) for i in range(n))
    rest = {**params, "model": {k: v for k, v in params["model"].items() if k != "layers"}}
    return {"layers": layers, "rest": jax.tree_util.tree_map(cast, rest)}


def init_layer_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> tuple:
    """Empty per-layer KV buffers: one (k, v) pair per layer, each [B, kv_heads, S, head_dim]."""
    tc = cfg.text
    shape = (batch, tc.num_kv_heads, slots, tc.head_dim)
    dtype = as_dtype(dtype or cfg.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(tc.num_layers))


LAYER_CACHE_AXES = ("act_batch", "act_kv_heads", "act_length", None)


def extend_layer_cache(kv: tuple, extra: int, repeat: int = 1) -> tuple:
    """Prompt-sized per-layer buffers made ready for decoding: each row repeated `repeat` times (a sampling
    group shares one prefill), then `extra` empty slots appended for the tokens fed back."""
    def grow(c):
        c = jnp.repeat(c, repeat, axis=0) if repeat > 1 else c
        return nn.with_logical_constraint(jnp.pad(c, ((0, 0), (0, 0), (0, extra), (0, 0))), LAYER_CACHE_AXES)
    return tuple((grow(k), grow(v)) for k, v in kv)


def run_layers(cfg: ModelConfig, layers: tuple, embeds, positions, mask, kv: tuple, index):
    """The decoder layers unrolled over per-layer weights (`decode_weights`) and buffers (`init_layer_cache`):
    embeds [B, T, D] at positions [B, 3, T] written at slot `index`; `mask` as `Attention` takes it with
    per-layer buffers. Returns (hidden [B, T, D] before the final norm, the new buffers)."""
    dtype = as_dtype(cfg.dtype)
    cos, sin = text_rotary(positions, cfg.text, dtype)
    h = nn.with_logical_constraint(embeds.astype(dtype), ("act_batch", "act_length", "act_embed"))
    layer, new_kv = DecoderLayer(cfg), []
    for params, layer_kv in zip(layers, kv):
        (h, layer_kv), _ = layer.apply({"params": params}, (h, layer_kv), cos, sin, mask, index)
        new_kv.append(layer_kv)
    return h, tuple(new_kv)
