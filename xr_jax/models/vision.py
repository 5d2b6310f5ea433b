"""The Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`) in Flax Linen.

Two halves:

* `vision_layout` (host, numpy) turns `grid_thw` into fixed-shape index arrays — the JAX form of
  transformers' `cu_seqlens`, `window_index` and `cu_window_seqlens`. Shapes depend only on the
  buffer sizes (`num_patches`, `num_windows`), so the tower jits once per buffer size whatever the
  image mix.
* `VisionTower` (device) runs patch embed -> depth x block -> patch merger on a `(P, patch_dim)`
  pixel buffer and returns `(P // 4, out_hidden_size)` merged features.

Ordering. transformers permutes the sequence into window order (at merged-token granularity),
runs every block there and un-permutes after the merger. Every op except attention is row-wise and
the permutation moves whole 2x2 merge groups, so xr_jax keeps the processor's merge-block order
throughout and does the permutation only inside window attention: gather each window's patches
into a `(num_windows, 64)` slab (one window per row, padded and masked), attend, gather back.
Full-attention blocks attend over the whole buffer with a dense segment-id mask (one segment per
image per frame, padding in segment -1, which real patches never see).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from xr_jax.models.config import VisionConfig
from xr_jax.models.layers import MLP, RMSNorm, remat_policy

PADDING_SEGMENT = -1

# ----------------------------------------------------------------------------------------------
# Host-side layout
# ----------------------------------------------------------------------------------------------


def _check_grid(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape (n_images >= 1, 3), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer, got {grid.dtype}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < m or w < m or h % m or w % m:
            raise ValueError(
                f"grid_thw[{i}] = {(t, h, w)}: need t >= 1 and h, w positive multiples of "
                f"spatial_merge_size {m}"
            )
    return grid.astype(np.int64)


def _windows(grid: np.ndarray, cfg: VisionConfig) -> list[np.ndarray]:
    """Merged-token indices of each non-empty window, in transformers' `get_vision_window_index` order.

    Per image and frame, the merged grid is padded bottom/right by `ws - H' % ws` (a whole empty
    window row/column when H' is already a multiple — transformers' quirk; the empty windows are
    dropped, as its `unique_consecutive` does), cut into ws x ws windows in row-major window order,
    each window read row-major. Indices are global (offset by earlier images' merged tokens).
    """
    m, ws = cfg.spatial_merge_size, cfg.window_merged
    windows, offset = [], 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m
        pad_h, pad_w = ws - gh % ws, ws - gw % ws
        index = np.full((t, gh + pad_h, gw + pad_w), -1, np.int64)
        index[:, :gh, :gw] = offset + np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        index = index.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        windows.extend(row[row >= 0] for row in index if (row >= 0).any())
        offset += t * gh * gw
    return windows


def window_count(grid_thw: np.ndarray, cfg: VisionConfig) -> int:
    """Number of non-empty attention windows `grid_thw` needs (to size `num_windows` budgets)."""
    return len(_windows(_check_grid(grid_thw, cfg), cfg))


def _patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
    """(t*h*w, 2) (row, col) of each patch in the processor's merge-block-major order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = [a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
    return np.tile(np.stack(blocks, axis=-1), (t, 1))


@flax.struct.dataclass
class VisionLayout:
    """Where every patch sits, for one pixel buffer of P patch rows and W window slabs of L patches.

    Every field is an int/bool array whose shape depends only on (P, W, L); pass it to the jitted
    tower as a pytree argument. Rows past the real patches are padding.

    pos_hw:         (P, 2) int32  patch (row, col) for the 2-D rotary; 0 for padding.
    segment_ids:    (P,) int32    full-attention segment = image-frame number; -1 for padding.
    window_patches: (W, L) int32  patch row held by each window slot (0 in empty slots).
    window_valid:   (W, L) bool   which slots hold a patch.
    patch_slot:     (P,) int32    flat slot (in W*L) of each patch, inverse of `window_patches`;
                                  0 for padding patches (their output is discarded).
    """

    pos_hw: np.ndarray
    segment_ids: np.ndarray
    window_patches: np.ndarray
    window_valid: np.ndarray
    patch_slot: np.ndarray


def vision_layout(
    grid_thw: np.ndarray,
    cfg: VisionConfig,
    num_patches: int | None = None,
    num_windows: int | None = None,
) -> VisionLayout:
    """Host-side layout of `grid_thw` images packed (in order) into a buffer of `num_patches` rows.

    num_patches: padded buffer length P, a multiple of `merge_unit` (4) and >= the real patch count
      (default: exactly the real count).
    num_windows: window slabs W (each `window_merged**2 * merge_unit` = 64 patches), >= the windows
      the grids need, see `window_count` (default: exactly that). For one compiled shape across
      batches, fix both budgets; an image of H' x W' merged tokens needs
      t * ceil(H'/4) * ceil(W'/4) windows.
    """
    grid = _check_grid(grid_thw, cfg)
    unit = cfg.merge_unit
    n_real = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    P = n_real if num_patches is None else int(num_patches)
    if P < n_real or P % unit:
        raise ValueError(
            f"num_patches {P} must be a multiple of {unit} and >= the {n_real} patches of grid_thw {grid.tolist()}"
        )
    windows = _windows(grid, cfg)
    W = len(windows) if num_windows is None else int(num_windows)
    if W < len(windows):
        raise ValueError(f"num_windows {W} is less than the {len(windows)} windows grid_thw {grid.tolist()} needs")
    L = cfg.window_merged**2 * unit

    pos_hw = np.zeros((P, 2), np.int32)
    pos_hw[:n_real] = np.concatenate([_patch_positions(t, h, w, cfg.spatial_merge_size) for t, h, w in grid])
    segment_ids = np.full((P,), PADDING_SEGMENT, np.int32)
    segment_ids[:n_real] = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))

    # Window w's patches: its merged tokens expanded to their 4 patches, in transformers' order.
    lengths = np.array([len(w) for w in windows]) * unit
    patches = (np.concatenate(windows)[:, None] * unit + np.arange(unit)).reshape(-1)
    window_of = np.repeat(np.arange(len(windows)), lengths)
    offset_in_window = np.arange(n_real) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    window_patches = np.zeros((W, L), np.int32)
    window_valid = np.zeros((W, L), bool)
    window_patches[window_of, offset_in_window] = patches
    window_valid[window_of, offset_in_window] = True
    patch_slot = np.zeros((P,), np.int32)
    patch_slot[patches] = window_of * L + offset_in_window
    return VisionLayout(pos_hw, segment_ids, window_patches, window_valid, patch_slot)


# ----------------------------------------------------------------------------------------------
# Device-side model
# ----------------------------------------------------------------------------------------------


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def rotary_cos_sin(pos_hw: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """fp32 (P, head_dim) cos/sin of the axial 2-D rotary: [row freqs, col freqs] repeated twice."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[:, :, None] * inv_freq.astype(np.float32)  # (P, 2, spatial/2)
    emb = freqs.reshape(pos_hw.shape[0], spatial)
    emb = jnp.concatenate([emb, emb], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """rotate_half rotary on (P, H, D), computed in fp32 and cast back (as transformers)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Non-causal attention of (..., L, H, D) inputs under a (..., Lq, Lk) mask; fp32 softmax.

    Masked scores get the most negative finite fp32, so a fully masked row (empty window slot,
    padding) stays finite instead of producing NaN.
    """
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * q.shape[-1] ** -0.5
    scores = jnp.where(mask[..., None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def _window_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: VisionLayout) -> jax.Array:
    """Attention inside each window: gather to (W, L) slabs, attend, gather back to patch order."""
    W, L = layout.window_patches.shape
    slabs = [x[layout.window_patches] for x in (q, k, v)]  # (W, L, H, D)
    mask = jnp.broadcast_to(layout.window_valid[:, None, :], (W, L, L))
    out = _attend(*slabs, mask)
    return out.reshape((W * L,) + out.shape[2:])[layout.patch_slot]


def _full_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: VisionLayout) -> jax.Array:
    """Attention over the whole buffer, within each image-frame segment (dense segment mask)."""
    seg = layout.segment_ids
    return _attend(q, k, v, seg[:, None] == seg[None, :])


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, is_full, cos, sin, layout: VisionLayout):
        cfg = self.cfg
        qkv = _dense(3 * cfg.hidden_size, ("vision_embed", "vision_qkv"), self.dtype, self.param_dtype, "qkv")(x)
        # transformers: reshape(seq, 3, heads, head_dim) -> feature j*hidden + head*head_dim + d.
        qkv = qkv.reshape(x.shape[0], 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = jax.lax.cond(is_full, _full_attention, _window_attention, q, k, v, layout)
        out = out.reshape(x.shape[0], cfg.hidden_size)
        return _dense(cfg.hidden_size, ("vision_heads", "vision_embed"), self.dtype, self.param_dtype, "proj")(out)


class VisionBlock(nn.Module):
    """One pre-norm block; `is_full` (traced bool) picks full or window attention via `lax.cond`."""

    cfg: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, is_full, cos, sin, layout: VisionLayout):
        cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, "vision_embed", dt, pdt, name=name)  # noqa: E731
        x = x + VisionAttention(cfg, dt, pdt, name="attn")(norm("norm1")(x), is_full, cos, sin, layout)
        x = x + MLP(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), True, dt, pdt, name="mlp")(
            norm("norm2")(x)
        )
        return x, None


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = one patch, i.e. a bias-free Linear on (C, T, P, P)-flat rows."""

    cfg: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixel_values):
        proj = _dense(self.cfg.hidden_size, ("vision_patch", "vision_embed"), self.dtype, self.param_dtype, "proj",
                      use_bias=False)
        return proj(pixel_values)


class PatchMerger(nn.Module):
    """RMSNorm per patch, concatenate each 2x2 merge group, Linear -> exact GELU -> Linear."""

    cfg: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
        x = RMSNorm(cfg.rms_norm_eps, "vision_embed", dt, pdt, name="ln_q")(x)
        width = cfg.hidden_size * cfg.merge_unit
        x = x.reshape(-1, width)
        x = _dense(width, ("vision_merge", "vision_merge_mlp"), dt, pdt, "mlp_0")(x)
        x = nn.gelu(x, approximate=False)
        return _dense(cfg.out_hidden_size, ("vision_merge_mlp", "embed"), dt, pdt, "mlp_2")(x)


class VisionTower(nn.Module):
    """pixel_values (P, patch_dim) + layout -> merged features (P // 4, out_hidden_size).

    Output rows are in the processor's merge-block order (image by image, exactly transformers'
    `pooler_output` for the real patches); rows of padding patches come last and are finite junk.

    Block params are always stacked on a leading layer axis (`blocks/...`, logical axis
    'vision_layers'). scan_layers=True runs them under `nn.scan`; False fully unrolls the same scan,
    so the param tree is identical either way. remat: "none", "full" or "dots" (per block).
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        cfg = self.cfg
        P = pixel_values.shape[0]
        if pixel_values.shape != (P, cfg.patch_dim) or layout.pos_hw.shape[0] != P:
            raise ValueError(
                f"pixel_values shape {pixel_values.shape} must be (layout patches {layout.pos_hw.shape[0]}, "
                f"patch_dim {cfg.patch_dim})"
            )
        if any(not 0 <= i < cfg.depth for i in cfg.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {cfg.fullatt_block_indexes} out of range for depth {cfg.depth}")

        x = PatchEmbed(cfg, self.dtype, self.param_dtype, name="patch_embed")(pixel_values)
        cos, sin = rotary_cos_sin(jnp.asarray(layout.pos_hw), cfg)
        is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
        block = VisionBlock
        if self.remat != "none":
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            unroll=1 if self.scan_layers else cfg.depth,
            metadata_params={nn.PARTITION_NAME: "vision_layers"},
        )
        x, _ = blocks(cfg, self.dtype, self.param_dtype, name="blocks")(x, is_full, cos, sin, layout)
        return PatchMerger(cfg, self.dtype, self.param_dtype, name="merger")(x)
