"""The plain attention mask of packed rows: the reference the model's segment-id attention is checked against."""

import numpy as np


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Reference mask [B, L, L] of packed rows: query i sees key j iff j <= i, same segment, and not padding."""
    seg = np.asarray(segment_ids)
    n = seg.shape[-1]
    causal = np.tril(np.ones((n, n), bool))
    same = seg[..., :, None] == seg[..., None, :]
    return causal & same & (seg[..., :, None] > 0)
