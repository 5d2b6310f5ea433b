"""Qwen2.5-VL (and text-only Qwen2/Qwen2.5): vision features merged into the text decoder.

`Qwen2_5_VL.apply(params, ...)` is the whole model as a pure function (training, full sequences).
Decoding is `prefill` then `decode_step`, over `qwen2.decode_weights` and per-layer KV buffers: the
sampler's step, and what the cached-decoding tests check against the full forward. Host-side helpers
compute what jit cannot: M-RoPE positions (`get_rope_index`) and the image-token count check.
"""

from __future__ import annotations

import itertools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xr_jax.models.attention import attention_mask
from xr_jax.models.config import ModelConfig
from xr_jax.models.layers import Dense, as_dtype
from xr_jax.models.qwen2 import TextModel, init_layer_cache, run_layers


class Qwen2_5_VL(nn.Module):
    """Param tree: `model` (text decoder), `visual` (vision tower, VL only), `lm_head` (unless tied)."""

    cfg: ModelConfig

    def setup(self):
        self.model = TextModel(self.cfg)
        if self.cfg.vision is not None:
            from xr_jax.models.vision import VisionTower

            self.visual = VisionTower(
                self.cfg.vision, dtype=as_dtype(self.cfg.dtype), param_dtype=as_dtype(self.cfg.param_dtype),
                scan_layers=self.cfg.scan_layers, remat=self.cfg.remat,
            )
        if not self.cfg.text.tie_word_embeddings:
            self.lm_head = Dense(
                self.cfg.text.vocab_size, ("embed", "vocab"), False, as_dtype(self.cfg.dtype),
                as_dtype(self.cfg.param_dtype),
            )

    def __call__(
        self,
        input_ids,
        positions,
        segment_ids,
        pixel_values=None,
        vision_layout=None,
        return_hidden: bool = False,
    ):
        """input_ids/segment_ids [B,T]; positions [B,3,T] (or [B,T] for text-only models).

        pixel_values [P, patch_dim] with its `vision_layout` fill the `<|image_pad|>` rows in batch
        order (the count must have been checked on the host: `check_image_tokens`).
        Returns (logits [B,T,V] in the compute dtype — or the final hidden states — , None).
        """
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[:, None], (positions.shape[0], 3, positions.shape[1]))
        hidden = self.model(self.embed_inputs(input_ids, pixel_values, vision_layout), positions, segment_ids)
        return (hidden if return_hidden else self.logits(hidden)), None

    def embed_inputs(self, input_ids, pixel_values=None, vision_layout=None):
        """Token embeddings [B, T, D] with the image features merged in (what the decoder layers take)."""
        embeds = self.model.embed(input_ids)
        if pixel_values is not None:
            embeds = self.merge_image_features(input_ids, embeds, self.visual(pixel_values, vision_layout))
        return embeds

    def final_logits(self, hidden):
        """Logits of the last decoder layer's output (final norm, then the LM head): for `decode_step`."""
        return self.logits(self.model.norm(hidden))

    def merge_image_features(self, input_ids, embeds, features):
        """Scatter merged image features into `<|image_pad|>` rows, images in batch order (as masked_scatter)."""
        b, t, d = embeds.shape
        is_img = (input_ids == self.cfg.image_token_id).reshape(-1)
        idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, features.shape[0] - 1)
        gathered = features.astype(embeds.dtype)[idx]
        return jnp.where(is_img[:, None], gathered, embeds.reshape(b * t, d)).reshape(b, t, d)

    def logits(self, hidden):
        if self.cfg.text.tie_word_embeddings:
            return self.model.attend(hidden)
        return self.lm_head(hidden)

    def head_weight(self):
        """The LM head as a [D, V] matrix in the compute dtype (the embedding, transposed, when tied):
        `logits(h) == h @ head_weight()`, for losses that run the head themselves."""
        dtype = as_dtype(self.cfg.dtype)
        if self.cfg.text.tie_word_embeddings:
            return self.model.embed_tokens.embedding.astype(dtype).T
        return self.lm_head.variables["params"]["kernel"].astype(dtype)


def prefill(weights, input_ids, positions, segment_ids, pixel_values=None, vision_layout=None, *,
            model: ModelConfig, all_logits: bool = False):
    """The prompt forward of decoding, over `qwen2.decode_weights`, into per-layer buffers of the prompt's L slots.

    input_ids/segment_ids [B, L] (left padding: segment 0), positions [B, 3, L]. Returns (cache, logits):
    cache {"kv": per-layer (k, v) [B, K, L, H], "start": [B] first live slot (after the padding)}; logits
    [B, V] of the last prompt token (what the first sampled token needs), or of every token [B, L, V]
    with `all_logits`."""
    net, rest = Qwen2_5_VL(model), {"params": weights["rest"]}
    b, length = input_ids.shape
    embeds = net.apply(rest, input_ids, pixel_values, vision_layout, method=Qwen2_5_VL.embed_inputs)
    idx = jnp.arange(length)
    mask = attention_mask(segment_ids, segment_ids, idx, idx)
    hidden, kv = run_layers(model, weights["layers"], embeds, positions, mask, init_layer_cache(model, b, length), 0)
    start = (length - jnp.sum(segment_ids != 0, axis=1)).astype(jnp.int32)
    logits = net.apply(rest, hidden if all_logits else hidden[:, -1], method=Qwen2_5_VL.final_logits)
    return {"kv": kv, "start": start}, logits


def decode_step(weights, token_ids, positions, bounds, kv, index, *, model: ModelConfig):
    """One decode token per row: token_ids [B] at positions [B] (M-RoPE: all three axes advance together after
    the prompt) written at slot `index` of the per-layer buffers `kv`, attending over the live slots
    bounds = (start, end) [B] (end includes this token). Returns (logits [B, V], the new buffers)."""
    net, rest = Qwen2_5_VL(model), {"params": weights["rest"]}
    pos = jnp.broadcast_to(positions[:, None, None], (positions.shape[0], 3, 1))
    h = net.apply(rest, token_ids[:, None], method=Qwen2_5_VL.embed_inputs)
    h, kv = run_layers(model, weights["layers"], h, pos, bounds, kv, index)
    return net.apply(rest, h, method=Qwen2_5_VL.final_logits)[:, 0], kv


def check_image_tokens(input_ids: np.ndarray, image_grid_thw: Optional[np.ndarray], cfg: ModelConfig) -> None:
    """Raise the transformers error, with both counts, when image tokens and features differ.

    A text-only model has no image tokens: its `image_token_id` is an ordinary token there."""
    if cfg.vision is None and (image_grid_thw is None or not len(image_grid_thw)):
        return
    tokens = int((np.asarray(input_ids) == cfg.image_token_id).sum())
    feats = 0
    if image_grid_thw is not None and len(image_grid_thw):
        if cfg.vision is None:
            raise ValueError("images given to a text-only model (config has no vision tower)")
        feats = int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // cfg.vision.merge_unit
    if tokens != feats:
        raise ValueError(f"Image features and image tokens do not match: tokens {tokens}, features {feats}")


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Optional[np.ndarray],
    attention_mask: Optional[np.ndarray],
    cfg: ModelConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions [B, 3, L] and rope deltas [B] (numpy; transformers 5.x rules, padding -> 0).

    Text runs advance all three axes together; an image of grid (t, h, w) occupies (t, h/2, w/2)
    merged tokens laid out row-major, with t/h/w positions offset from the running position, and
    advances it by max(h, w)/2. `rope_deltas = max(position) + 1 - unpadded length` gives decode
    positions: token k after a prompt of unpadded length L sits at L + k + delta.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions = np.zeros((b, 3, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    merge = cfg.vision.spatial_merge_size if cfg.vision is not None else 2
    grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())
    for row in range(b):
        ids = input_ids[row][mask[row]]
        pieces, pos = [], 0
        is_img = ids == cfg.image_token_id
        for img, run in itertools.groupby(is_img):
            n = len(list(run))
            if not img:
                pieces.append(np.broadcast_to(pos + np.arange(n), (3, n)))
                pos += n
                continue
            while n > 0:  # consecutive images without text between them
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more <|image_pad|> runs than images in image_grid_thw") from None
                hh, ww = h // merge, w // merge
                tt_, hh_, ww_ = np.meshgrid(np.arange(t), np.arange(hh), np.arange(ww), indexing="ij")
                pieces.append(np.stack([tt_.ravel(), hh_.ravel(), ww_.ravel()]) + pos)
                pos += max(h, w) // merge
                n -= t * hh * ww
            if n < 0:
                raise ValueError("an <|image_pad|> run is shorter than its image grid")
        row_pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[row][:, mask[row]] = row_pos
        deltas[row] = (row_pos.max() + 1 - len(ids)) if len(ids) else 0
    return positions, deltas


def _dummy_inputs(cfg: ModelConfig):
    ids = jnp.zeros((1, 8), jnp.int32)
    args = dict(input_ids=ids, positions=jnp.zeros((1, 3, 8), jnp.int32), segment_ids=jnp.ones((1, 8), jnp.int32))
    if cfg.vision is not None:
        from xr_jax.models.vision import vision_layout

        grid = np.array([[1, 2 * cfg.vision.spatial_merge_size, 2 * cfg.vision.spatial_merge_size]])
        args["pixel_values"] = jnp.zeros((int(grid.prod()), cfg.vision.patch_dim), jnp.float32)
        args["vision_layout"] = vision_layout(grid, cfg.vision)
    return args


def init_params(cfg: ModelConfig, rng) -> dict:
    """Random params (boxed with logical axis metadata; `nn.unbox` or `parallel.shard_params` to use)."""
    return Qwen2_5_VL(cfg).init(rng, **_dummy_inputs(cfg))["params"]


def abstract_params(cfg: ModelConfig) -> dict:
    """Unboxed ShapeDtypeStructs of the params — shapes without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
