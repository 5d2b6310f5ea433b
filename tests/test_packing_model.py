"""Packed SFT rows through the model: no attention crosses a segment boundary."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from tests.pipeline_reference import attention_mask as reference_mask
from xr_jax.data.pipeline import SFTConfig, sft_pipeline
from xr_jax.data.synthetic import SyntheticConfig, synthetic_source
from xr_jax.data.tokenizer import load_tokenizer
from xr_jax.models import attention
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL, init_params


def test_packed_row_logits_equal_each_example_alone():
    tok = load_tokenizer("tiny")
    cfg = tiny_vl_config(vision=None)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size))
    pipe = sft_pipeline(synthetic_source(SyntheticConfig(num_examples=16)), tok,
                        SFTConfig(max_len=1024, batch_size=2, shuffle=False))
    batch = next(iter(pipe))
    assert batch["segment_ids"].max() >= 2  # several examples share a row
    # the model's mask is the pipeline's reference mask
    idx = np.arange(batch["segment_ids"].shape[1])
    model_mask = np.asarray(attention.attention_mask(batch["segment_ids"], batch["segment_ids"], idx, idx))[:, 0]
    np.testing.assert_array_equal(model_mask, reference_mask(batch["segment_ids"]))

    model = Qwen2_5_VL(cfg)
    params = {"params": nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))}
    packed, _ = model.apply(params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    packed = np.asarray(packed)
    for row in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = np.nonzero(seg == s)[0]
            ids = batch["input_ids"][row, where][None]
            alone, _ = model.apply(params, ids, np.arange(len(where))[None], np.ones_like(ids))
            np.testing.assert_allclose(packed[row, where], np.asarray(alone)[0], atol=1e-5)
