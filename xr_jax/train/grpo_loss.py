"""GRPO group advantages and the clipped policy-gradient loss, as pure jnp functions.

Formulas (the peers' conventions: verl `core_algos.py`, TRL `GRPOConfig`, Tunix `algo_core.py`):

- advantage, "grpo":    A_i = (r_i - mean_g) / (std_g + eps), std with Bessel's correction (ddof=1),
  as verl, EasyR1, TRL and Tunix do (`jnp.std` defaults to ddof=0, which would give other advantages:
  G=8 with one correct sample gives 2.47 with ddof=1 and 2.65 with ddof=0).
- advantage, "dr_grpo": A_i = r_i - mean_g (Dr.GRPO, arXiv 2503.20783: no std division).
- advantage, "rloo":    A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Ahmadian et al. 2024,
  arXiv 2402.14740; TRL's RLOO: baseline = (sum - r_i) / (G - 1)).
- ratio:   rho = exp(clip(logp - old_logp, -20, 20)).
- PPO clip, both advantage signs: l = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)).
- dual clip (A < 0 only): l = min(l, -A c), c = dual_clip > 1.
- KL to a frozen reference, per token, with x = ref_logp - logp:
  k1 = -x;  k2 = x^2 / 2;  k3 = exp(x') - x' - 1 with x' = clip(x, -20, 20), result clipped to [-10, 10]
  (verl's `low_var_kl` clamps). k1 has zero expected gradient on-policy, hence the k3 default.
- total per token: l + kl_coef * kl - entropy_coef * entropy, aggregated by `agg` (linear, so each term
  is aggregated the same way).

Advantage estimators, aggregations and KL estimators are registries (`ADVANTAGES`, `AGGREGATIONS`,
`KL_ESTIMATORS`): a new one is one registered function, and the config (`grpo.advantage`, `grpo.loss_agg`,
`grpo.kl_type`) accepts its name.

`mask` is 1 on the tokens the policy sampled and 0 elsewhere: prompt, padding, and the forced-exit
tokens the sampler wrote itself (they are not samples of the policy, so they carry no policy gradient).
Every mean below, loss or metric, is over these "loss tokens" only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from xr_jax.registry import Registry

_LOG_RATIO_CLAMP = 20.0  # verl and Tunix clamp log-ratios at +-20 before exp
_K3_CLAMP = 10.0  # verl clamps the k3 value at +-10

# (rewards [groups, G] float32, eps) -> advantages [groups, G]
ADVANTAGES: Registry[Callable[[jax.Array, float], jax.Array]] = Registry("advantage estimator")
# (per-token values [B, T], mask [B, T], count, max_len) -> scalar; `count` is the number of loss tokens or of
# sequences in the whole mini-batch, as the function's `counts` ("tokens" or "seqs", set by `_counts`) says
AGGREGATIONS: Registry[Callable] = Registry("loss aggregation")
# (logp [B, T], ref_logp [B, T]) -> per-token KL(pi || pi_ref) estimate [B, T]
KL_ESTIMATORS: Registry[Callable[[jax.Array, jax.Array], jax.Array]] = Registry("KL estimator")


@ADVANTAGES.register("grpo")
def grpo_advantage(groups: jax.Array, eps: float) -> jax.Array:
    """(r - mean) / (std + eps), std with Bessel's correction (module doc)."""
    return (groups - groups.mean(axis=1, keepdims=True)) / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)


@ADVANTAGES.register("dr_grpo")
def dr_grpo_advantage(groups: jax.Array, eps: float) -> jax.Array:
    """r - mean: Dr.GRPO drops the std division, which up-weights groups of low reward variance."""
    del eps
    return groups - groups.mean(axis=1, keepdims=True)


@ADVANTAGES.register("rloo")
def rloo_advantage(groups: jax.Array, eps: float) -> jax.Array:
    """r_i minus the mean of the group's OTHER rewards: a baseline independent of the sample it scores."""
    del eps
    size = groups.shape[1]
    return groups - (groups.sum(axis=1, keepdims=True) - groups) / (size - 1)


def _counts(what: Literal["tokens", "seqs"]):
    """Marks what an aggregation's `count` argument counts, so that callers pass the right normaliser."""

    def mark(fn):
        fn.counts = what
        return fn

    return mark


@AGGREGATIONS.register("token-mean")
@_counts("tokens")
def token_mean(x: jax.Array, m: jax.Array, count: jax.Array, max_len) -> jax.Array:
    """Sum over loss tokens / their count: every token weighs the same, whatever its sequence's length."""
    return (x * m).sum() / count


@AGGREGATIONS.register("seq-mean-token-mean")
@_counts("seqs")
def seq_mean_token_mean(x: jax.Array, m: jax.Array, count: jax.Array, max_len) -> jax.Array:
    """Mean over sequences of per-sequence token means (original GRPO): long responses weigh less per token."""
    return ((x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)).sum() / count


@AGGREGATIONS.register("dr-grpo")
@_counts("seqs")
def dr_grpo_sum(x: jax.Array, m: jax.Array, count: jax.Array, max_len: int) -> jax.Array:
    """Sum over loss tokens / (sequences x a constant length): Dr.GRPO's length-unbiased normaliser."""
    return (x * m).sum() / (count * max_len)


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """log(pi / pi_ref): unbiased, but zero expected gradient on-policy."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """(log(pi_ref / pi))^2 / 2."""
    return 0.5 * (ref_logp - logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """exp(x) - x - 1 with x = log(pi_ref / pi): unbiased and non-negative; clamped as verl's low_var_kl."""
    x = jnp.clip(ref_logp - logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(x) - x - 1.0, -_K3_CLAMP, _K3_CLAMP)


def group_advantages(
    rewards: jax.Array, group_size: int, mode: str = "grpo", eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Group-relative advantages for rewards laid out as consecutive groups of `group_size` samples.

    Args:
      rewards: [N] rewards, N a multiple of `group_size`; samples i*G .. i*G+G-1 share a prompt.
      group_size: G >= 2 (the std, and the baseline, of one sample are meaningless).
      mode: a registered advantage estimator (`ADVANTAGES`: "grpo", "dr_grpo", "rloo"; module doc).
      eps: added to the std.

    Returns:
      (advantages [N] float32, zero_variance [N // G] bool). Groups whose rewards are all equal get
      advantage exactly 0 (not a rounding residue of r - mean); log `zero_variance.mean()`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards length {rewards.shape[0]} is not a multiple of group_size {group_size}")
    estimator = ADVANTAGES.get(mode, "mode")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    groups = rewards.reshape(-1, group_size)
    zero_variance = jnp.all(groups == groups[:, :1], axis=1)
    advantages = jnp.where(zero_variance[:, None], 0.0, estimator(groups, eps))
    return advantages.reshape(-1), zero_variance


def _check_number(cfg, key, *, low=None, high=None, low_open=False, high_open=False) -> None:
    value = getattr(cfg, key)
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"GRPOLossConfig.{key} must be a number in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """Options of `grpo_loss`; validated on construction (hashable, so usable as a jit static argument).

    Attributes:
      clip_low: epsilon_low, the ratio's lower clip bound is 1 - clip_low (paper: 0.2).
      clip_high: epsilon_high, the upper bound is 1 + clip_high (clip-higher; DAPO's 0.28).
      dual_clip: c > 1 caps the loss of negative-advantage tokens at -A c (verl uses 3.0); None is off.
      agg: a registered aggregation (`AGGREGATIONS`): "token-mean" (the paper's token-level loss: sum over
        loss tokens / their global count), "seq-mean-token-mean" (original GRPO: mean over sequences of
        per-sequence token means), "dr-grpo" (sum over loss tokens / (number of sequences * dr_grpo_max_len)).
      kl_coef: beta of the KL term in the loss; > 0 needs `ref_logp`.
      kl_type: a registered KL estimator (`KL_ESTIMATORS`): "k1", "k2" or "k3" (module doc).
      entropy_coef: weight of the entropy bonus (subtracted from the loss); > 0 needs `entropy`.
      dr_grpo_max_len: the constant length normaliser of agg="dr-grpo" (the max response length);
        required for that mode, rejected for the others.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    dr_grpo_max_len: int | None = None

    def __post_init__(self):
        _check_number(self, "clip_low", low=0.0, high=1.0, high_open=True)
        _check_number(self, "clip_high", low=0.0)
        if self.dual_clip is not None:
            _check_number(self, "dual_clip", low=1.0, low_open=True)
        AGGREGATIONS.get(self.agg, "GRPOLossConfig.agg")
        _check_number(self, "kl_coef", low=0.0)
        KL_ESTIMATORS.get(self.kl_type, "GRPOLossConfig.kl_type")
        _check_number(self, "entropy_coef", low=0.0)
        max_len = self.dr_grpo_max_len
        if self.agg == "dr-grpo":
            if not (isinstance(max_len, int) and not isinstance(max_len, bool) and max_len >= 1):
                raise ValueError(
                    f"GRPOLossConfig.dr_grpo_max_len must be an int >= 1 for agg='dr-grpo', got {max_len!r}"
                )
        elif max_len is not None:
            raise ValueError(
                f"GRPOLossConfig.dr_grpo_max_len is only used by agg='dr-grpo' (agg is {self.agg!r})"
            )


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    adv: jax.Array,
    mask: jax.Array,
    config: GRPOLossConfig = GRPOLossConfig(),
    *,
    ref_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
    global_tokens: jax.Array | float | None = None,
    global_seqs: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss of one (micro)batch, and diagnostics.

    Args:
      logp: [B, T] log-probs of the sampled tokens under the policy being trained (at the sampling
        temperature).
      old_logp: [B, T] the same under the policy that sampled them (pi_old).
      adv: [B] one advantage per sequence (`group_advantages`).
      mask: [B, T] 1 on loss tokens: sampled response tokens, NOT prompt, padding or forced-exit tokens.
      config: the options (`GRPOLossConfig`).
      ref_logp: [B, T] reference-model log-probs; needed when kl_coef > 0, else only logged.
      entropy: [B, T] per-token policy entropy; needed when entropy_coef > 0, else only logged.
      global_tokens: for agg="token-mean", the number of loss tokens in the whole mini-batch (the
        optimizer step's batch: all microbatches, all devices). With it, the losses of the microbatches
        SUM to the mini-batch loss; without it, this call's own count is used, which is right only when
        this call sees the whole mini-batch. (Under jit on a sharded global batch the sums are already
        global; the argument is for gradient accumulation and per-shard code such as shard_map.)
      global_seqs: for the sequence modes, the number of sequences (rows with at least one loss token)
        in the whole mini-batch, with the same meaning. Rows without loss tokens are padding and never
        count as sequences.

    Returns:
      (loss, metrics). Metrics are over this call's loss tokens: `pg_loss`, `kl_loss`, `entropy_loss`
      (the aggregated terms), `clip_frac_low` (A < 0 and rho < 1 - clip_low: the lower bound binds),
      `clip_frac_high` (A > 0 and rho > 1 + clip_high), `dual_clip_frac` (A < 0 and rho > c),
      `ratio_mean/min/max`, `ppo_kl` (mean old_logp - logp), `kl` and `entropy` (token means, when given),
      `num_loss_tokens` (forced-exit tokens excluded, as they are by `mask`).
    """
    batch, length = logp.shape
    for name, value, shape in [
        ("old_logp", old_logp, (batch, length)),
        ("adv", adv, (batch,)),
        ("mask", mask, (batch, length)),
        ("ref_logp", ref_logp, (batch, length)),
        ("entropy", entropy, (batch, length)),
    ]:
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match logp {logp.shape}, got {value.shape}")
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    counts = AGGREGATIONS.get(config.agg).counts
    if global_tokens is not None and counts != "tokens":
        raise ValueError(f"global_tokens is for token-normalised aggregations; agg={config.agg!r} takes global_seqs")
    if global_seqs is not None and counts != "seqs":
        raise ValueError(f"global_seqs is for the sequence modes; agg={config.agg!r} takes global_tokens")

    f32 = jnp.float32
    m = mask.astype(f32)
    on = m > 0
    # Off-mask values are replaced (`where`), not multiplied by 0: NaN * 0 is NaN, in the loss and in the
    # gradient, and padded or prompt positions may hold anything (e.g. -inf logits -> NaN log-probs).
    logp = jnp.where(on, logp.astype(f32), 0.0)
    old_logp = jnp.where(on, old_logp.astype(f32), 0.0)
    a = jnp.where(on.any(axis=1), adv.astype(f32), 0.0)[:, None]

    ratio = jnp.exp(jnp.clip(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    lo, hi = 1.0 - config.clip_low, 1.0 + config.clip_high
    pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, lo, hi))
    if config.dual_clip is not None:
        pg = jnp.where(a < 0, jnp.minimum(pg, -a * config.dual_clip), pg)

    if counts == "tokens":
        count = m.sum() if global_tokens is None else jnp.asarray(global_tokens, f32)
    else:
        count = (m.sum(axis=1) > 0).sum().astype(f32) if global_seqs is None else jnp.asarray(global_seqs, f32)

    def aggregate(x: jax.Array) -> jax.Array:
        return AGGREGATIONS.get(config.agg)(x, m, jnp.maximum(count, 1.0), config.dr_grpo_max_len)

    pg_loss = aggregate(pg)
    loss = pg_loss
    n_tokens = m.sum()

    def token_mean(x: jax.Array) -> jax.Array:
        return jnp.where(on, x, 0.0).sum() / jnp.maximum(n_tokens, 1.0)

    metrics = {
        "pg_loss": pg_loss,
        "clip_frac_low": token_mean(((a < 0) & (ratio < lo)).astype(f32)),
        "clip_frac_high": token_mean(((a > 0) & (ratio > hi)).astype(f32)),
        "ratio_mean": token_mean(ratio),
        "ratio_min": jnp.min(jnp.where(m > 0, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(m > 0, ratio, -jnp.inf)),
        "ppo_kl": token_mean(old_logp - logp),
        "num_loss_tokens": n_tokens,
    }
    if config.dual_clip is not None:
        metrics["dual_clip_frac"] = token_mean(((a < 0) & (ratio > config.dual_clip)).astype(f32))
    if ref_logp is not None:
        kl = KL_ESTIMATORS.get(config.kl_type)(logp, jnp.where(on, ref_logp.astype(f32), 0.0))
        metrics["kl_loss"] = aggregate(kl)
        metrics["kl"] = token_mean(kl)
        loss = loss + config.kl_coef * metrics["kl_loss"]
    if entropy is not None:
        entropy = jnp.where(on, entropy.astype(f32), 0.0)
        metrics["entropy_loss"] = aggregate(entropy)
        metrics["entropy"] = token_mean(entropy)
        loss = loss - config.entropy_coef * metrics["entropy_loss"]
    metrics["loss"] = loss
    return loss, metrics
