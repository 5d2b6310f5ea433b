"""Pipeline helpers only tests use: the plain attention mask of packed rows, and prompt batches of every
example once, in order (the batching the evaluation runner does its own way)."""

from typing import Optional

import grain
import numpy as np

from xr_jax.data import pipeline as P


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Reference mask [B, L, L] of packed rows: query i sees key j iff j <= i, same segment, and not padding."""
    seg = np.asarray(segment_ids)
    n = seg.shape[-1]
    causal = np.tril(np.ones((n, n), bool))
    same = seg[..., :, None] == seg[..., None, :]
    return causal & same & (seg[..., :, None] > 0)


def eval_pipeline(
    source: P.Source, tokenizer, config: P.PromptBatchConfig, *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
) -> P.Pipeline:
    """Every example once, in order, with metadata; this host's rows only; a short last batch filled with
    copies of its last row marked `valid=False`."""
    process_index, process_count = P._process(process_index, process_count)
    local_batch = P._local_batch_size(config.batch_size, process_count)
    rows = P._indices(len(source), process_index, process_count, trim=False).map(
        P._reader(source, lambda ex: P.encode_prompt(ex, tokenizer, config)))
    batch_fn = P._prompt_batch_fn(config.max_prompt_len, tokenizer.special.pad, batch_size=local_batch)

    def make(epoch: int, stats: P.RowStats) -> grain.IterDataset:
        skip = P._SkipBadRows(rows.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads)), "eval", stats)
        return skip.batch(local_batch, drop_remainder=False, batch_fn=batch_fn)

    return P.Pipeline(make, 1, None, "eval")
