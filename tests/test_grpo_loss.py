"""GRPO advantages and loss against literal NumPy (float64) references of the published formulas.

Values are compared at rtol 1e-5 / atol 1e-6 (float32 against float64); gradients wrt logp are compared
with central finite differences of the NumPy reference (h = 1e-6) at atol 2e-6.
"""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xr_jax.train.grpo_loss import GRPOLossConfig, group_advantages, grpo_loss

G = 4
# Four groups: mixed, all-correct (zero variance), partial credit, all-wrong (zero variance).
REWARDS = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0.5, 1, 0, 0, 0, 0, 0], np.float32)


# --- NumPy references, written as literally as possible -------------------------------------------


def ref_advantages(rewards, group_size, mode, eps=1e-6):
    out, zero = [], []
    for g in range(len(rewards) // group_size):
        r = [float(x) for x in rewards[g * group_size : (g + 1) * group_size]]
        mean = sum(r) / group_size
        zero.append(all(x == r[0] for x in r))
        for x in r:
            if zero[-1]:
                out.append(0.0)
            elif mode == "grpo":
                out.append((x - mean) / (statistics.stdev(r) + eps))  # sample std (n - 1)
            else:
                out.append(x - mean)
    return np.array(out), np.array(zero)


def ref_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    x = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1.0, -10.0), 10.0)


def ref_loss(logp, old, adv, mask, cfg, ref=None, ent=None, global_tokens=None, global_seqs=None):
    batch, length = logp.shape
    per_token = np.zeros((batch, length))
    for i in range(batch):
        a = adv[i]
        for t in range(length):
            rho = math.exp(min(max(logp[i, t] - old[i, t], -20.0), 20.0))
            clipped = min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
            loss = max(-a * rho, -a * clipped)
            if cfg.dual_clip is not None and a < 0:
                loss = min(loss, -a * cfg.dual_clip)
            if ref is not None:
                loss += cfg.kl_coef * ref_kl(logp[i, t], ref[i, t], cfg.kl_type)
            if ent is not None:
                loss -= cfg.entropy_coef * ent[i, t]
            per_token[i, t] = loss
    masked = per_token * mask
    seqs = [i for i in range(batch) if mask[i].sum() > 0]
    n_seqs = len(seqs) if global_seqs is None else global_seqs
    if cfg.agg == "token-mean":
        return masked.sum() / (mask.sum() if global_tokens is None else global_tokens)
    if cfg.agg == "seq-mean-token-mean":
        return sum(masked[i].sum() / mask[i].sum() for i in seqs) / n_seqs
    return masked.sum() / (n_seqs * cfg.dr_grpo_max_len)  # dr-grpo


def finite_difference_grad(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (fn(up) - fn(down)) / (2 * h)
    return grad


def make_inputs(seed, batch=16, length=6):
    """Random inputs that reach every regime: both clip sides for both signs, ratios past the dual clip,
    log-ratios past the +-20 clamp, masked tokens, a fully masked row, zero-variance groups."""
    rng = np.random.default_rng(seed)
    adv = np.asarray(group_advantages(REWARDS, G)[0], np.float64)
    old = rng.normal(-1.5, 0.5, (batch, length))
    logp = old + rng.normal(0.0, 0.8, (batch, length))
    logp[0, 0] = old[0, 0] + 25.0  # A > 0: clipped high, and the log-ratio clamp holds
    logp[2, 1] = old[2, 1] - 25.0  # A < 0: clipped low
    mask = (rng.random((batch, length)) < 0.8).astype(np.float64)
    mask[5] = 0.0  # a padding row
    ref = logp + rng.normal(0.0, 0.5, (batch, length))
    ref[3, 3] = logp[3, 3] + 5.0  # k3 = e^5 - 6 > 10: its clamp holds
    ent = rng.uniform(0.0, 3.0, (batch, length))
    # Round through float32 so the JAX side sees exactly the reference's inputs.
    return [np.asarray(np.float32(x), np.float64) for x in (logp, old, adv, mask, ref, ent)]


CONFIGS = {
    "token-mean": GRPOLossConfig(),
    "symmetric-clip": GRPOLossConfig(clip_low=0.2, clip_high=0.2),
    "dual-clip": GRPOLossConfig(dual_clip=3.0),
    "seq-mean-token-mean": GRPOLossConfig(agg="seq-mean-token-mean", dual_clip=3.0),
    "dr-grpo": GRPOLossConfig(agg="dr-grpo", dr_grpo_max_len=8),
    "kl-k1": GRPOLossConfig(kl_coef=0.05, kl_type="k1"),
    "kl-k2": GRPOLossConfig(kl_coef=0.05, kl_type="k2"),
    "kl-k3": GRPOLossConfig(kl_coef=0.05, kl_type="k3"),
    "entropy": GRPOLossConfig(entropy_coef=0.01, kl_coef=0.01, agg="seq-mean-token-mean"),
}


def jax_loss(logp, old, adv, mask, cfg, ref, ent, **normalisers):
    f = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    return grpo_loss(f(logp), f(old), f(adv), f(mask), cfg, ref_logp=f(ref), entropy=f(ent), **normalisers)


# --- advantages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
def test_group_advantages_match_reference(mode):
    rewards = np.random.default_rng(0).integers(0, 2, 64).astype(np.float32)
    rewards[8:16] = 0.1  # a zero-variance group whose mean is not exactly 0.1 in float32
    adv, zero = group_advantages(rewards, 8, mode)
    want_adv, want_zero = ref_advantages(rewards, 8, mode)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), want_zero)
    assert np.all(np.asarray(adv)[np.repeat(want_zero, 8)] == 0.0)  # exactly zero, not a residue


def test_group_advantages_use_sample_std():
    adv, _ = group_advantages(np.array([1.0] + [0.0] * 7), 8)
    # (1 - 1/8) / sqrt(1/8): ddof=1; ddof=0 would give 2.6458.
    assert float(adv[0]) == pytest.approx(0.875 / math.sqrt(1 / 8), rel=1e-5)
    assert float(adv[0]) == pytest.approx(2.4749, abs=1e-4)


def test_rloo_advantages_by_hand():
    """Leave-one-out baseline (Ahmadian et al. 2024): each sample minus the mean of the OTHER G - 1 rewards.
    Group [1, 0, 0, 1]: sample 0's others average (0 + 0 + 1) / 3 = 1/3, so A_0 = 2/3; sample 1's others
    (1 + 0 + 1) / 3 = 2/3, so A_1 = -2/3. Group [0, .5, 1, 0]: others average .5, 1/3, 1/6, .5, so the
    advantages are -1/2, 1/6, 5/6, -1/2. The all-equal groups get 0."""
    adv, zero = group_advantages(REWARDS, G, "rloo")
    want = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, -1 / 2, 1 / 6, 5 / 6, -1 / 2, 0, 0, 0, 0]
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-6, atol=1e-7)
    assert list(np.asarray(zero)) == [False, True, False, True]
    pair, _ = group_advantages(np.array([1.0, 0.0, 0.25, 0.75]), 2, "rloo")  # G = 2: the other sample is the baseline
    np.testing.assert_allclose(np.asarray(pair), [1.0, -1.0, -0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=np.zeros(8), group_size=3), "multiple of group_size"),
        (dict(rewards=np.zeros(8), group_size=1), "group_size"),
        (dict(rewards=np.zeros((2, 4)), group_size=4), "1-D"),
        (dict(rewards=np.zeros(8), group_size=4, mode="ppo"), "mode"),
    ],
)
def test_group_advantages_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


# --- loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_value_and_grad_match_reference(name, seed):
    cfg = CONFIGS[name]
    logp, old, adv, mask, ref, ent = make_inputs(seed)
    ref = ref if cfg.kl_coef > 0 else None
    ent = ent if cfg.entropy_coef > 0 else None

    loss, metrics = jax_loss(logp, old, adv, mask, cfg, ref, ent)
    want = ref_loss(logp, old, adv, mask, cfg, ref, ent)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)

    grad = jax.grad(lambda lp: jax_loss(lp, old, adv, mask, cfg, ref, ent)[0])(jnp.asarray(logp, jnp.float32))
    want_grad = finite_difference_grad(lambda lp: ref_loss(lp, old, adv, mask, cfg, ref, ent), logp)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=2e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)

    # The inputs reach every regime, so a wrong branch would show above.
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    if cfg.dual_clip is not None:
        assert float(metrics["dual_clip_frac"]) > 0
    assert float(metrics["num_loss_tokens"]) == mask.sum()


def test_metrics_match_reference():
    logp, old, adv, mask, ref, ent = make_inputs(0)
    cfg = GRPOLossConfig(dual_clip=3.0, kl_coef=0.1)
    _, metrics = jax_loss(logp, old, adv, mask, cfg, ref, ent)
    on = mask > 0
    a = np.broadcast_to(adv[:, None], logp.shape)[on]
    ratio = np.exp(np.clip(logp - old, -20, 20))[on]
    expected = {
        "clip_frac_low": np.mean((a < 0) & (ratio < 0.8)),
        "clip_frac_high": np.mean((a > 0) & (ratio > 1.28)),
        "dual_clip_frac": np.mean((a < 0) & (ratio > 3.0)),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "ppo_kl": np.mean((old - logp)[on]),
        "kl": np.mean([ref_kl(lp, r, "k3") for lp, r in zip(logp[on], ref[on])]),
        "entropy": ent[on].mean(),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "adv, ratio, dual, want_loss, want_grad",
    [
        (1.0, 1.5, None, -1.28, 0.0),  # A > 0, above the band: clipped, no gradient
        (1.0, 0.5, None, -0.5, -0.5),  # A > 0, below the band: unclipped, pushes up
        (-1.0, 1.5, None, 1.5, 1.5),  # A < 0, above the band: unclipped, pushes down (EasyDeL zeroes it)
        (-1.0, 0.5, None, 0.8, 0.0),  # A < 0, below the band: clipped, no gradient
        (-1.0, 4.0, 3.0, 3.0, 0.0),  # dual clip caps the loss at -A c
        (-1.0, 2.5, 3.0, 2.5, 2.5),  # below c the dual clip is inactive
    ],
)
def test_clip_cases_by_hand(adv, ratio, dual, want_loss, want_grad):
    """Pitfall #1 of the peers: -min(rho A, clip(rho) A) for BOTH advantage signs."""
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=dual)
    old = jnp.zeros((1, 1))
    adv_arr, mask = jnp.array([adv]), jnp.ones((1, 1))
    fn = lambda lp: grpo_loss(lp, old, adv_arr, mask, cfg)[0]  # noqa: E731
    logp = jnp.full((1, 1), math.log(ratio))
    assert float(fn(logp)) == pytest.approx(want_loss, rel=1e-6)
    assert float(jax.grad(fn)(logp)[0, 0]) == pytest.approx(want_grad, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_on_policy(agg):
    """logp == old_logp: ratio 1, nothing clipped, and the gradient is -A m / normaliser (REINFORCE)."""
    logp, _, adv, mask, _, _ = make_inputs(3)
    cfg = GRPOLossConfig(agg=agg, dual_clip=3.0)
    lp = jnp.asarray(logp, jnp.float32)
    fn = lambda x: grpo_loss(x, lp, jnp.asarray(adv, jnp.float32), jnp.asarray(mask), cfg)  # noqa: E731
    (_, metrics), grad = jax.value_and_grad(fn, has_aux=True)(lp)
    for key in ["ratio_mean", "ratio_min", "ratio_max"]:
        assert float(metrics[key]) == 1.0
    for key in ["clip_frac_low", "clip_frac_high", "dual_clip_frac", "ppo_kl"]:
        assert float(metrics[key]) == 0.0
    if agg == "token-mean":
        want = -adv[:, None] * mask / mask.sum()
    else:
        lengths = mask.sum(1, keepdims=True)
        want = -adv[:, None] * mask / np.maximum(lengths, 1) / (lengths > 0).sum()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean", "dr-grpo", "entropy"])
def test_microbatches_with_global_normaliser_sum_to_full_batch(name):
    cfg = CONFIGS[name]
    logp, old, adv, mask, ref, ent = make_inputs(4)
    full, _ = jax_loss(logp, old, adv, mask, cfg, ref, ent)
    if cfg.agg == "token-mean":
        normaliser = dict(global_tokens=jnp.asarray(mask.sum()))
    else:
        normaliser = dict(global_seqs=jnp.asarray((mask.sum(1) > 0).sum()))
    halves = (slice(0, 7), slice(7, None))  # uneven split, padding row in the first part
    parts = [jax_loss(logp[s], old[s], adv[s], mask[s], cfg, ref[s], ent[s], **normaliser)[0] for s in halves]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6, atol=1e-7)
    # Without the global normaliser, the mean of per-microbatch means is a different (wrong) number.
    local = [jax_loss(logp[s], old[s], adv[s], mask[s], cfg, ref[s], ent[s])[0] for s in halves]
    assert abs(float(sum(local)) / 2 - float(full)) > 1e-4


def test_jit_with_static_config():
    logp, old, adv, mask, ref, ent = make_inputs(5)
    cfg = CONFIGS["kl-k3"]
    eager, _ = jax_loss(logp, old, adv, mask, cfg, ref, ent)
    jitted = jax.jit(grpo_loss, static_argnames="config")
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, _ = jitted(f(logp), f(old), f(adv), f(mask), config=cfg, ref_logp=f(ref), entropy=f(ent))
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)


def test_fully_masked_batch_gives_zero_loss():
    z = jnp.zeros((2, 3))
    loss, metrics = grpo_loss(z, z, jnp.ones(2), z, GRPOLossConfig(agg="seq-mean-token-mean"))
    assert float(loss) == 0.0 and float(metrics["num_loss_tokens"]) == 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "dr-grpo"])
def test_nan_outside_the_mask_leaves_loss_and_grads_finite(agg):
    """Prompt/padding positions may hold NaN or inf (e.g. a -inf logit); `where` keeps them out, where
    multiplying by a 0 mask would give NaN * 0 = NaN. The masked-in values must equal a clean batch's."""
    rng = np.random.default_rng(3)
    logp = -rng.uniform(0.1, 2.0, (3, 5)).astype(np.float32)
    old = logp + rng.normal(0, 0.2, logp.shape).astype(np.float32)
    ref = logp + rng.normal(0, 0.2, logp.shape).astype(np.float32)
    ent = rng.uniform(0, 1, logp.shape).astype(np.float32)
    mask = np.ones_like(logp)
    mask[0, 3:] = 0
    mask[2, :] = 0  # a padding row: its advantage is NaN too
    adv = np.array([1.0, -0.5, 0.0], np.float32)
    cfg = GRPOLossConfig(agg=agg, kl_coef=0.01, entropy_coef=0.001, dual_clip=3.0,
                         dr_grpo_max_len=5 if agg == "dr-grpo" else None)

    def run(lp, o, a, r, e):
        f = lambda lp_: grpo_loss(lp_, o, a, jnp.asarray(mask), cfg, ref_logp=r, entropy=e)[0]  # noqa: E731
        return jax.value_and_grad(f)(lp), grpo_loss(lp, o, a, jnp.asarray(mask), cfg, ref_logp=r, entropy=e)[1]

    (clean, clean_grad), clean_m = run(*map(jnp.asarray, (logp, old, adv, ref, ent)))
    dirty = [x.copy() for x in (logp, old, ref, ent)]
    for x, bad in zip(dirty, (np.nan, np.inf, np.nan, -np.inf)):
        x[mask == 0] = bad
    bad_adv = adv.copy()
    bad_adv[2] = np.nan
    (loss, grad), m = run(*map(jnp.asarray, (dirty[0], dirty[1], bad_adv, dirty[2], dirty[3])))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    assert all(np.isfinite(float(v)) for v in m.values())
    np.testing.assert_allclose(float(loss), float(clean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(clean_grad), rtol=1e-6, atol=1e-9)
    assert float(m["ratio_mean"]) == float(clean_m["ratio_mean"])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_low=-0.1), "clip_low"),
        (dict(clip_high=float("nan")), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(agg="mean"), "agg"),
        (dict(kl_coef=-0.01), "kl_coef"),
        (dict(kl_type="k4"), "kl_type"),
        (dict(entropy_coef=-1.0), "entropy_coef"),
        (dict(agg="dr-grpo"), "dr_grpo_max_len"),
        (dict(dr_grpo_max_len=4096), "dr_grpo_max_len"),
        (dict(clip_high="0.28"), "clip_high"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"GRPOLossConfig.{key}"):
        GRPOLossConfig(**kwargs)


def test_loss_bad_arguments():
    x, adv = jnp.zeros((2, 3)), jnp.zeros(2)
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(x, x, adv, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="adv must have shape"):
        grpo_loss(x, x, jnp.zeros(3), x)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, adv, x, GRPOLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(x, x, adv, x, GRPOLossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="global_seqs"):
        grpo_loss(x, x, adv, x, global_seqs=2)
    with pytest.raises(ValueError, match="global_tokens"):
        grpo_loss(x, x, adv, x, GRPOLossConfig(agg="seq-mean-token-mean"), global_tokens=6)
