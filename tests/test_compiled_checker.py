"""bench.compiled at tiny size on XLA:CPU (the loop on a 4-device FSDP mesh: no collectives but the per-chunk stop
test, no layer-sized copies, a token loop of known trip count) and the bytes of one 0.5B decode step (B=64, 128 +
256: within 1.3x of the ideal once gathers are charged their real traffic)."""

import argparse
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from bench import compiled
from xr_jax.models.presets import preset

SHAPE = compiled.DecodeShape("tiny", rows=8, prompt=16, new=12, mesh=(1, 4, 1))  # 11 fed tokens: a chunk of 8 + 3


@pytest.fixture(scope="module")
def report():
    return compiled.check_decode(SHAPE)


def test_report_structure_and_ideal(report):
    t = preset("tiny").text
    weights = t.num_layers * (t.hidden_size * t.head_dim * (t.num_heads + 2 * t.num_kv_heads)
                              + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    weights += t.hidden_size * t.vocab_size
    kv = 2 * t.num_layers * 8 * (16 + 12) * t.num_kv_heads * t.head_dim
    assert report["ideal_bytes_per_token"] == 4 * (weights + kv)
    assert report["ratio"] == report["bytes_per_token"] / report["ideal_bytes_per_token"] > 1.0
    assert report["step_bytes"]["corrected"] > report["model_step_bytes"]["corrected"]  # + the token choice
    loop = report["loop"]
    assert set(loop) >= {"known_trip_count", "enclosing_trip_counts", "nested_trip_counts", "collectives_per_token",
                         "layer_sized_moves_per_token", "layer_bytes_threshold"}
    assert "bytes per token" in compiled.format_report(report)


def test_trip_count_detection_on_a_fixed_count_loop():
    """The checker reads XLA's known_trip_count: a fori_loop has one, a while_loop on a data flag has none."""
    x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32)
    fixed = jax.jit(lambda x, w: jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w), x))
    open_ended = jax.jit(lambda x, w: jax.lax.while_loop(
        lambda c: jnp.all(c[1] < 10.0), lambda c: (c[0] + 1, jnp.tanh(c[1] @ w) + 1.0), (0, x))[1])
    report = compiled.loop_report(fixed.lower(x, w).compile().as_text(), 1 << 30)
    assert report["known_trip_count"] == 7 and report["condition_bound"] == 7  # the TPU fallback agrees
    report = compiled.loop_report(open_ended.lower(x, w).compile().as_text(), 1 << 30)
    assert report["known_trip_count"] is None and report["condition_bound"] is None
    assert report["collectives_per_token"] == {}


def test_mesh_argument():
    assert compiled._mesh("1x4x1") == (1, 4, 1)
    for bad in ("4", "1x0x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="data x fsdp x tensor"):
            compiled._mesh(bad)


def test_sft_attention_has_no_bias_on_hopper_or_ampere_or_says_why_not_checked():
    report = compiled.check_sft_attention()
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        assert "skipped" in report
        return
    assert set(report) == {"sm_90", "sm_80"}
    assert not any(r["bias"] or r["dbias"] for r in report.values())
    assert report["sm_90"]["mask_types"] == ["CAUSAL"] and "mha_backward" in report["sm_80"]["triton_kernels"]


def test_target_bytes_within_1_3x_of_ideal_at_0_5b():
    """The model step reads each weight and KV entry about once: raw cost_analysis charges the embedding
    gather the whole [vocab, D] table, the corrected count its 64 rows."""
    r = compiled.check_decode(compiled.DecodeShape("qwen2.5-0.5b", rows=64, prompt=128, new=256), loop=False)
    table = 151936 * 896 * 4
    assert r["model_step_bytes"]["gather_overcount"] >= 0.99 * table
    assert r["model_step_bytes"]["raw"] / r["ideal_bytes_per_token"] > 1.3
    assert r["ratio"] <= 1.3


def test_target_no_weight_collectives_in_the_token_loop(report):
    """Weights replicated for decoding: nothing moves between devices inside the token loop, and once per
    chunk only the stop test's all-reduce of a pred[] (all rows done?)."""
    loop = report["loop"]
    assert loop["collectives_per_token"] == {} and loop["collectives_per_chunk"] == {}
    assert loop["stop_test_collectives_per_chunk"] == {"all-reduce": 1}
    assert "stop test (scalar, not weights) {'all-reduce': 1} per chunk" in compiled.format_report(report)


def test_target_no_layer_sized_copies_in_the_token_loop(report):
    assert report["loop"]["layer_sized_moves_per_token"] == []


def test_target_token_loop_has_a_known_trip_count(report):
    """The token loop is the chunk's loop of 8 inside the stop-test while (no known count: it syncs per chunk)."""
    assert report["loop"]["known_trip_count"] == 8 and report["loop"]["enclosing_trip_counts"] == [None]
