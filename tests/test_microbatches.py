"""`split_microbatches` gives every key the same rows per microbatch, including M-RoPE positions
[B, 3, T] (GRPO update rows); an earlier [3, B, T] layout once had them split along the 3."""

import jax.numpy as jnp
import numpy as np

from xr_jax.train.sft import split_microbatches


def test_positions_rows_follow_the_other_keys():
    b, t, n = 8, 5, 4
    ids = np.arange(b * t).reshape(b, t)
    positions = np.stack([ids, ids + 1000, ids + 2000], axis=1)  # [B, 3, T]: row r of each axis derives from ids[r]
    out = split_microbatches({"input_ids": jnp.asarray(ids), "positions": jnp.asarray(positions)}, n)
    assert out["input_ids"].shape == (n, b // n, t) and out["positions"].shape == (n, b // n, 3, t)
    for m in range(n):
        rows = ids[m::n]  # strided: rows m, m + n, ...
        np.testing.assert_array_equal(out["input_ids"][m], rows)
        np.testing.assert_array_equal(out["positions"][m], np.stack([rows, rows + 1000, rows + 2000], axis=1))
