"""`xr-jax plan` on the tiny preset and 8 simulated devices: per-device bytes follow the shardings (FSDP
divides the params by 8), the compiled program's memory grows with rows per microbatch, fits/doesn't-fit
follows the budget, and the layout search finds the fewest microbatches that fit. The search logic and
the KV-cache arithmetic are also checked on their own (no compile)."""

import math

import flax.linen as nn
import jax
import pytest

from xr_jax import config as config_lib
from xr_jax.cli import plan as plan_lib
from xr_jax.models.presets import preset
from xr_jax.models.qwen2_5_vl import init_params
from xr_jax.cli.plan import Budget, Layout, Measurement

OVERRIDES = ["train.batch_size=16", "train.seq_len=128", "train.microbatches=1", "mesh.shape=[1,8,1]",
             "model.remat=none"]
ROWS, SEQ = 16, 128
FSDP = (1, 8, 1)


@pytest.fixture(scope="module")
def worker():
    with plan_lib.Worker(8) as w:
        yield w


@pytest.fixture(scope="module")
def config():
    return config_lib.load("configs/tiny.yaml", OVERRIDES)


@pytest.fixture(scope="module")
def measured(worker, config):
    """Requested layout (2 rows per device per microbatch) and the most microbatches (1 row)."""
    d = config_lib.to_dict(config)
    return {mb: worker.measure(d, Layout(FSDP, "none", mb)) for mb in (1, 2)}


def test_bytes_follow_the_shardings(measured):
    m = measured[1]
    # FSDP over 8: every param with an 'embed' axis is split 8 ways (tiny's 64 divides); the q/k/v biases
    # (axes 'heads'/'kv_heads', mapped to tensor = 1) stay whole on every device.
    boxed = jax.eval_shape(lambda: init_params(preset("tiny"), jax.random.PRNGKey(0)))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    nbytes = lambda x: math.prod(x.value.shape) * 4  # noqa: E731
    want = sum(nbytes(x) // 8 if "embed" in x.names else nbytes(x) for x in leaves)
    assert m.params == want, (m.params, want, sum(map(nbytes, leaves)) / 8)
    assert abs(m.opt_state - 2 * m.params) <= 64  # AdamW mu and nu, sharded like the params, + counters
    assert m.grads == m.params  # nothing frozen in the text-only tiny model
    assert m.batch == 5 * (ROWS // 8) * SEQ * 4  # five int32/float32 [rows, SEQ] arrays per device
    # XLA's own view: the arguments are exactly the state + batch (+ step and rng), outputs are donated
    assert 0 <= m.argument - m.static < 64
    assert m.alias >= m.params + m.opt_state and m.output - m.alias < 1024  # + the metrics scalars
    assert m.peak > m.argument and m.temp > 0


def test_activation_memory_shrinks_with_microbatches(measured):
    assert measured[2].temp < measured[1].temp
    assert measured[2].argument == measured[1].argument


def test_plan_fits_and_search(worker, config, measured):
    """Memory between the two layouts: the configured one does not fit, the search finds the one that
    does, and the report says so (the worker remembers what it compiled: no compile here)."""
    mid = (measured[1].peak + measured[2].peak) // 2
    p = plan_lib.plan(config, 8, mid, usable_fraction=1.0, worker=worker, max_compiles=4)
    assert not p.fits(p.requested) and p.requested.peak == measured[1].peak
    assert p.best is not None and p.fits(p.best) and p.best.layout.microbatches == 2
    assert p.best.layout.remat == "none" and p.best.layout.mesh == FSDP
    text = plan_lib.format_report(p)
    assert "does not fit as configured" in text and "train.microbatches=" in text
    assert "XLA:CPU" in text

    roomy = plan_lib.plan(config, 8, 1 << 30, worker=worker, search_layouts=False)
    assert roomy.fits(roomy.requested) and roomy.best is roomy.requested
    assert "fits as configured" in plan_lib.format_report(roomy)

    tiny = plan_lib.plan(config, 8, 1 << 10, worker=worker, search_layouts=False)
    assert not tiny.fits(tiny.requested) and tiny.best is None
    assert "nothing measured fits" in plan_lib.format_report(tiny)


def _fake(peaks: dict, static: int = 10):
    """measure_fn over synthetic layouts: peak = peaks[(remat, microbatches)]; counts compiles."""
    compiled = []

    def measure(layout, compile=True):
        m = Measurement(layout, params=static, batch=0)
        if compile:
            compiled.append(layout)
            peak = peaks[(layout.remat, layout.microbatches)]
            m.argument, m.output, m.alias, m.temp = static, static, static, peak - static
        return m

    return measure, compiled


def test_search_order_and_bisection_without_compiling():
    # 16 rows per device: microbatches 1, 2, 4, 8, 16. "none" never fits; "dots" fits from 4 on.
    peaks = {("none", mb): 1000 for mb in (1, 2, 4, 8, 16)}
    peaks.update({("dots", 1): 400, ("dots", 2): 200, ("dots", 4): 100, ("dots", 8): 60, ("dots", 16): 50})
    measure, compiled = _fake(peaks)
    best, tried = plan_lib.search(measure, Budget(120), 128, [FSDP], max_compiles=10)
    assert best.layout == Layout(FSDP, "dots", 4)
    assert compiled[0] == Layout(FSDP, "none", 16) and compiled[1] == Layout(FSDP, "dots", 16)
    assert len(compiled) <= 2 + math.ceil(math.log2(5))  # bisection, not a sweep
    # inputs larger than the budget: nothing is compiled
    measure, compiled = _fake(peaks, static=500)
    best, tried = plan_lib.search(measure, Budget(120), 128, [FSDP], max_compiles=10)
    assert best is None and compiled == [] and tried
    # GRPO's reference params (here 10 bytes, sharded like the params) count against the budget
    for reference, microbatches in ((False, 4), (True, 8)):
        measure, _ = _fake(peaks)
        best, _ = plan_lib.search(measure, Budget(105, reference), 128, [FSDP], max_compiles=10)
        assert best.layout == Layout(FSDP, "dots", microbatches), reference
    # the compile budget is respected
    measure, compiled = _fake(peaks)
    plan_lib.search(measure, Budget(120), 128, [FSDP], max_compiles=1)
    assert len(compiled) == 1


def test_kv_cache_of_the_7b_grpo_rollout():
    """bf16 cache of Qwen2.5-VL-7B: 28 layers x 2 x 4 kv heads x 128 x 2 bytes = 57,344 B per token."""
    cfg = preset("qwen2.5-vl-7b", dtype="bfloat16")
    kv = plan_lib.kv_cache(cfg, (1, 32, 1), rows=128 * 8, length=1024 + 4096, sampling_params=0)
    assert kv.bytes_per_token == 57344
    assert kv.total == 1024 * 5120 * 57344 and kv.per_device == kv.total // 32
    # tensor=2 splits the 4 kv heads too; tensor=8 cannot (4 heads) and leaves them whole
    assert plan_lib.kv_cache(cfg, (1, 16, 2), 1024, 5120, 0).shards == 32
    assert plan_lib.kv_cache(cfg, (1, 4, 8), 1024, 5120, 0).shards == 4


def test_rollout_memory_of_the_7b_grpo_config():
    """configs/x_reasoner_grpo.yaml on 32 devices as the sampler lays it out: its bf16 copy of all of
    Qwen2.5-VL-7B's params (8,292,166,656: the 7,615,616,512 of the language model, Qwen2.5-7B's published
    count, + the vision tower, which `decode_weights` casts too) on every device, 1024 rows split 32 per device
    with 5120 slots x 57,344 B of bf16 per-layer cache each, and one step's logits."""
    config = config_lib.load("configs/x_reasoner_grpo.yaml")
    g, cfg = config.grpo, plan_lib.model_config(config)
    r = plan_lib.rollout_memory(cfg, 32, config.train.batch_size * g.group_size, g.max_prompt_len + g.max_new_tokens,
                                g.sampler_dtype or cfg.dtype)
    assert (r.rows, r.length, r.data, r.rows_per_device) == (1024, 5120, 32, 32)
    assert r.params == plan_lib.sampler_params(cfg, "bfloat16") == 8_292_166_656 * 2
    assert r.kv_cache == 32 * 5120 * 57344
    assert r.logits == 32 * 152064 * (2 + 4)


def test_parse_bytes_and_bad_input():
    assert plan_lib.parse_bytes("40GB") == 40 * 10**9
    assert plan_lib.parse_bytes("40GiB") == 40 * 2**30
    assert plan_lib.parse_bytes("4.3e10") == 43 * 10**9
    with pytest.raises(plan_lib.PlanError, match="not a size"):
        plan_lib.parse_bytes("forty")


def test_grpo_plan_adds_reference_params_and_kv_cache(worker):
    """The GRPO update step on rollout rows (prompts x group_size of max_prompt_len + max_new_tokens),
    the frozen reference params counted beside it, and the sampler's cache from the model config."""
    config = config_lib.load("configs/tiny.yaml", ["mesh.shape=[1,8,1]", "train.batch_size=8", "grpo.group_size=2",
                                                   "grpo.max_prompt_len=32", "grpo.max_new_tokens=32"])
    p = plan_lib.plan(config, 8, 1 << 30, stage="grpo", worker=worker, search_layouts=False)
    m = p.requested
    assert m.error is None and (p.batch_size, p.seq_len) == (16, 64)
    assert p.budget.reference and p.budget.held(m) == m.peak + m.params
    t = preset("tiny").text  # fp32 cache: layers x (k, v) x kv heads x head_dim x 4 bytes
    assert p.kv_cache.bytes_per_token == t.num_layers * 2 * t.num_kv_heads * t.head_dim * 4
    assert p.kv_cache.total == 16 * 64 * p.kv_cache.bytes_per_token and p.kv_cache.shards == 8
    text = plan_lib.format_report(p)
    assert "KV cache" in text
    # the sampler's layout: an fp32 copy of all params on each device (tiny's sampler_dtype unset, compute fp32:
    # counted although no sampler_dtype is set), 2 of the 16 rows' caches, the train state + reference beside them
    r = p.rollout
    assert r.params == p.kv_cache.sampling_params == p.params_total * 4
    assert r.kv_cache == 2 * p.kv_cache.bytes_per_token * 64
    assert r.held == m.params + m.opt_state + m.params
    assert "rollout   sampler layout (weights copy replicated, rows split over 8)" in text
    assert f"{p.params_total * 4 / 2**20:.2f} sampling params" in text  # MiB: 1 GiB devices
