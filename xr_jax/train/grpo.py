"""GRPO (stage 2 of the recipe): rollout -> reward -> group advantages -> clipped policy-gradient updates.

One rollout step, for a batch of prompts:
  1. the sampler draws `group_size` responses per prompt (prompt prefilled once per group), returning the
     tokens, their log-probs at the sampling temperature and the forced-exit mask;
  2. the reward functions (`grpo.rewards`, a weighted sum) score the decoded responses in a killable worker
     pool (timeouts score 0);
  3. advantages are normalised within each group;
  4. reference log-probs come from the frozen initial policy when `kl_coef` > 0;
  5. `minibatches` x `update_passes` optimizer steps run the jitted update on prompt + response rows (each
     minibatch whole groups), with pi_old = the rollout's log-probs (or a recomputed training forward).
Everything random derives from `state.rng`, and the data position lives in the checkpoint, so a resumed
run continues exactly. The run setup and the loop (checkpoints, preemption, NaN guard, logging) are SFT's
(`train/setup.py`, `train/loop.py`).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xr_jax import parallel
from xr_jax.models.config import ModelConfig
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL
from xr_jax.rewards.choice import reward_ground_truth
from xr_jax.sampling.sampler import FINISH_NAMES, ForcedExit, Prompt, Sampler, SamplingConfig, prepare_prompts
from xr_jax.train import setup
from xr_jax.train.grpo_loss import AGGREGATIONS, GRPOLossConfig, group_advantages, grpo_loss
from xr_jax.train.losses import target_logprobs_and_lse
from xr_jax.train.sft import compute_grads
from xr_jax.train.state import TrainState, apply_update, schedule_count

# Metric names a reward's `reward_<name>` must not take.
REWARD_METRICS = ("reward_mean", "reward_std", "reward_timeouts", "reward_errors")
UPDATE_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask", "old_logp", "ref_logp", "adv")


def loss_config(g) -> GRPOLossConfig:
    """`GRPOLossConfig` from the config's `grpo` section (it validates the values, naming the key)."""
    return GRPOLossConfig(
        clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip, agg=g.loss_agg, kl_coef=g.kl_coef,
        kl_type=g.kl_type, entropy_coef=g.entropy_coef,
        dr_grpo_max_len=g.max_new_tokens if g.loss_agg == "dr-grpo" else None,
    )


# ----------------------------------------------------------------------------- the jitted pieces


def response_logprobs(model_cfg: ModelConfig, params, batch: dict, temperature: float, prompt_len: int,
                      chunk: int = 1024, with_entropy: bool = False):
    """Per-token log-probs [N, T] (and entropies) of the response part of prompt + response rows.

    Row layout: `prompt_len` left-padded prompt slots, then T response slots; the log-prob of response
    token k comes from position prompt_len - 1 + k. Computed in chunks (no [tokens, vocab] buffer).
    """
    model = Qwen2_5_VL(model_cfg)
    hidden, _ = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
                            return_hidden=True)
    hidden = hidden[:, prompt_len - 1: -1]
    head = lambda h: model.apply({"params": params}, h, method="logits")  # noqa: E731
    out = target_logprobs_and_lse(hidden, batch["targets"], head, temperature, chunk, with_entropy)
    return (out[0], out[2]) if with_entropy else out[0]


def make_update_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, schedule, lcfg: GRPOLossConfig, *,
                     temperature: float, prompt_len: int, microbatches: int = 1, chunk: int = 1024,
                     frozen: tuple[str, ...] = (), mesh: Optional[Mesh] = None) -> Callable:
    """The pure update `(state, rows) -> (state, metrics)` on one minibatch of rollout rows.

    The token-mean normaliser is the minibatch's loss-token count (all microbatches and devices); sequence
    modes use its number of rows with loss tokens. Metrics are token-weighted means over the minibatch.
    """
    want_entropy = True  # entropy is always logged (one more vocab reduction per chunk)
    per_token = AGGREGATIONS.get(lcfg.agg).counts == "tokens"

    def loss_fn(params, rows, count):
        params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
        logp, entropy = response_logprobs(model_cfg, params, rows, temperature, prompt_len, chunk, want_entropy)
        mask = rows["loss_mask"]
        loss, m = grpo_loss(
            logp, rows["old_logp"], rows["adv"], mask, lcfg,
            ref_logp=rows["ref_logp"] if lcfg.kl_coef > 0 else None, entropy=entropy,
            **({"global_tokens": count} if per_token else {"global_seqs": rows["num_seqs"][0]}),
        )
        n = jnp.sum(mask)
        weighted = {k: v * n for k, v in m.items() if k not in ("ratio_min", "ratio_max", "num_loss_tokens")}
        return loss, (loss, weighted)

    def step(state: TrainState, rows: dict):
        grads, (loss, weighted), count = compute_grads(loss_fn, state.params, rows, microbatches, mesh)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = apply_update(tx, grads, state.params, state.opt_state, ok)
        # state.step counts rollout steps (the loop's unit); the optimizer's own count drives the schedule
        new_state = TrainState(step=state.step, params=params, opt_state=opt_state, rng=state.rng)
        metrics = {k: v / count for k, v in weighted.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(schedule_count(state.opt_state)),
                       skipped=(~ok).astype(jnp.int32), loss_tokens=count)
        return new_state, metrics

    return step


def row_shardings(mesh: Mesh) -> dict:
    """Shardings of the update rows: rows over ('data', 'fsdp')."""
    specs = {k: parallel.batch_sharding(mesh, 2) for k in UPDATE_KEYS}
    specs["positions"] = parallel.batch_sharding(mesh, 3)
    specs["adv"] = specs["num_seqs"] = parallel.batch_sharding(mesh, 1)
    return specs


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Rollout:
    """One rollout batch as training rows (numpy), plus what the metrics need."""

    rows: dict
    rewards: np.ndarray
    components: dict[str, np.ndarray]  # "reward_<name>": that reward's unweighted scores, in `grpo.rewards` order
    zero_var_groups: int
    lengths: np.ndarray
    finish: list[str]
    forced_rows: np.ndarray
    timeouts: int
    errors: int


def build_rows(batch, out, adv: np.ndarray, group: int, mask_forced: bool) -> dict:
    """Prompt (left-padded, as the sampler laid it out) + response rows for the update, numpy."""
    n, t = out.tokens.shape
    rep = lambda x: np.repeat(x, group, axis=0)  # noqa: E731
    ids = np.concatenate([rep(batch.input_ids), out.tokens], axis=1).astype(np.int32)
    mask = out.mask
    seg = np.concatenate([rep(batch.segment_ids), mask.astype(np.int32)], axis=1)
    resp_pos = rep(batch.next_position)[:, None, None] + np.arange(t)  # [N, 1, T]: all three axes advance together
    positions = np.concatenate([rep(batch.positions), np.broadcast_to(resp_pos, (n, 3, t))], axis=2)
    loss_mask = mask & ~out.forced if mask_forced else mask
    return {
        "input_ids": ids, "positions": positions.astype(np.int32), "segment_ids": seg,
        "targets": out.tokens.astype(np.int32), "loss_mask": loss_mask.astype(np.float32),
        "old_logp": out.logprobs.astype(np.float32), "adv": adv.astype(np.float32),
    }


def minibatch_order(key, rows: int, group: int) -> np.ndarray:
    """Row order for the minibatches: whole groups in a random order. A group's advantages sum to zero (those of
    every built-in estimator), so the tokens its responses share (the answer format) get no net push; a group
    split over minibatches pushes them by the unbalanced part, which on the learning test flipped `<answer>` to
    `</answer>` in one step."""
    groups = np.asarray(jax.random.permutation(key, rows // group))
    return (groups[:, None] * group + np.arange(group)).ravel()


class GRPOTrainer:
    """Holds the sampler, reward pool, reference params and jitted functions; `step` is the loop's step_fn."""

    def __init__(self, config, model_cfg: ModelConfig, tokenizer, mesh: Mesh, tx, schedule, shardings: TrainState,
                 ref_params=None, frozen: tuple[str, ...] = ()):
        from xr_jax.rewards import RewardPool, get as get_reward

        g = config.grpo
        self.g, self.model_cfg, self.tok, self.mesh, self.shardings = g, model_cfg, tokenizer, mesh, shardings
        self.lcfg = loss_config(g)
        for module in g.reward_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"grpo.reward_modules: cannot import {module!r} ({e})") from None
        for i, term in enumerate(g.rewards):  # fail at start on an unknown reward name
            get_reward(term.name, f"grpo.rewards[{i}].name")
            if f"reward_{term.name}" in REWARD_METRICS:
                raise ValueError(f"grpo.rewards[{i}].name {term.name!r} would log as {REWARD_METRICS}; rename it")
        if g.kl_coef > 0 and ref_params is None:
            raise ValueError("grpo.kl_coef > 0 needs reference params")
        self.ref_params = ref_params
        stops = tuple(tokenizer.special.stop_ids)
        forced = ForcedExit.from_tokenizer(tokenizer, model_cfg.text.vocab_size) if g.forced_exit else None
        self.scfg = SamplingConfig(
            temperature=g.temperature, max_new_tokens=g.max_new_tokens, stop_ids=stops, pad_id=tokenizer.special.pad,
            max_think=g.max_think if g.forced_exit else None, max_answer=g.max_answer if g.forced_exit else 0,
            prompt_buckets=(g.max_prompt_len,), weight_dtype=g.sampler_dtype,
        )
        self.sampler = Sampler(model_cfg, self.scfg, forced, mesh=mesh)
        self.pool = RewardPool(g.reward_workers)
        self.prompt_len = g.max_prompt_len
        update = make_update_step(model_cfg, tx, schedule, self.lcfg, temperature=g.temperature,
                                  prompt_len=self.prompt_len, microbatches=g.microbatches, chunk=config.train.loss_chunk,
                                  frozen=frozen, mesh=mesh)
        self.row_specs = row_specs = row_shardings(mesh)
        self.update = jax.jit(update, in_shardings=(shardings, row_specs),
                              out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
        self.logprobs = jax.jit(
            lambda p, rows: response_logprobs(model_cfg, p, rows, g.temperature, self.prompt_len, config.train.loss_chunk),
            in_shardings=(shardings.params, row_specs), out_shardings=parallel.batch_sharding(mesh, 2))

    def decode(self, ids) -> str:
        """Response text; ids past the tokenizer's vocabulary (unused embedding rows) decode to nothing."""
        return self.tok.decode([i for i in ids if i < self.tok.vocab_size], skip_special_tokens=True)

    # -- rollout ----------------------------------------------------------------------------------------

    def rollout(self, params, batch: dict, key) -> Rollout:
        g = self.g
        if "pixel_values" in batch:
            raise ValueError("GRPO on image prompts is not supported yet: the recipe's RL data is text only")
        lengths = batch["prompt_lengths"]
        ids = batch["prompt_ids"]
        prompts = [Prompt(ids[i, ids.shape[1] - lengths[i]:]) for i in range(len(lengths))]
        out = self.sampler.generate(params, prompts, rng=key, group_size=g.group_size)
        texts = [self.decode(out.row_ids(i)) for i in range(len(out.lengths))]
        rewards = np.zeros(len(texts), np.float32)
        components, timeouts, errors = {}, 0, 0
        for term in g.rewards:
            truths = [reward_ground_truth(term.name, a, c) for a, c in zip(batch["answers"], batch["choices"])]
            answers = [a for a in truths for _ in range(g.group_size)]
            scores, stats = self.pool.score_batch(term.name, texts, answers, timeout=g.reward_timeout)
            components[f"reward_{term.name}"] = np.asarray(scores, np.float32)
            rewards = rewards + term.weight * components[f"reward_{term.name}"]
            timeouts, errors = timeouts + stats.timeouts, errors + stats.errors
        adv, zero_var = group_advantages(jnp.asarray(rewards), g.group_size, g.advantage)
        pbatch = prepare_prompts(prompts, self.model_cfg, self.scfg)
        rows = build_rows(pbatch, out, np.asarray(adv), g.group_size, g.mask_forced)
        # Each process sampled and scored its own prompts (whole groups); the update sees the global batch.
        g_all = parallel.all_rows({**rows, **components, "rewards": rewards, "lengths": out.lengths,
                                   "finish": out.finish_reason, "forced": out.forced.any(axis=1)}, self.mesh)
        rows = {k: g_all[k] for k in rows}
        counts = parallel.each_process(np.array([int(np.asarray(zero_var).sum()), timeouts, errors]))
        return Rollout(rows, g_all["rewards"], {k: g_all[k] for k in components}, int(counts[:, 0].sum()),
                       g_all["lengths"], [FINISH_NAMES[int(r)] for r in g_all["finish"]], g_all["forced"],
                       timeouts=int(counts[:, 1].sum()), errors=int(counts[:, 2].sum()))

    # -- one rollout step ---------------------------------------------------------------------------------

    def step(self, state: TrainState, batch: dict):
        g = self.g
        t0 = time.perf_counter()
        rollout_key, update_key = jax.random.split(state.rng)
        ro = self.rollout(state.params, batch, rollout_key)
        t_rollout = time.perf_counter() - t0
        rows = ro.rows
        n = len(ro.rewards)
        put = lambda r: {k: parallel.put_global(v, self.row_specs[k]) for k, v in r.items()}  # noqa: E731
        if self.ref_params is not None:
            rows["ref_logp"] = parallel.host_array(self.logprobs(self.ref_params, put(self._with_placeholders(rows))))
        else:
            rows["ref_logp"] = np.zeros_like(rows["old_logp"])
        check_gap = g.gap_every > 0 and int(state.step) % g.gap_every == 0
        if g.old_logprobs == "recompute":  # verl's way: pi_old from a training forward of the rollout policy
            train = parallel.host_array(self.logprobs(state.params, put(self._with_placeholders(rows))))
            gap = {"sampler_logp_gap": self._gap(train, rows)} if check_gap else {}
            rows["old_logp"] = train
        else:
            gap = {"sampler_logp_gap": self._sampler_mismatch(state.params, rows, put)} if check_gap else {}
        t1 = time.perf_counter()
        order = minibatch_order(update_key, n, g.group_size)
        per = n // g.minibatches
        step_metrics = []
        for _ in range(g.update_passes):
            for mb in range(g.minibatches):
                sel = order[mb * per:(mb + 1) * per]
                mb_rows = {k: v[sel] for k, v in rows.items()}
                mb_rows["num_seqs"] = np.full((per,), max(1, int((mb_rows["loss_mask"].sum(1) > 0).sum())), np.float32)
                state, m = self.update(state, put(mb_rows))
                step_metrics.append(jax.device_get(m))
            order = minibatch_order(jax.random.fold_in(update_key, len(step_metrics)), n, g.group_size)
        t_update = time.perf_counter() - t1
        state = state.replace(step=state.step + 1, rng=jax.random.split(state.rng)[0])
        last = step_metrics[-1]
        first = step_metrics[0]
        mask = rows["loss_mask"] > 0
        metrics = {
            "loss": float(last["loss"]), "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"]),
            "skipped": int(max(m["skipped"] for m in step_metrics)),
            "reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
            "accuracy": float(next(iter(ro.components.values())).mean()),  # the first reward is the task's
            **{name: float(scores.mean()) for name, scores in ro.components.items()},
            "zero_var_frac": ro.zero_var_groups / (n // g.group_size),
            "response_len_mean": float(ro.lengths.mean()), "response_len_max": int(ro.lengths.max()),
            "truncated_frac": float(np.mean([f == "length" for f in ro.finish])),
            "forced_exit_frac": float(ro.forced_rows.mean()),
            "clip_frac_low": float(last["clip_frac_low"]), "clip_frac_high": float(last["clip_frac_high"]),
            "ratio_mean_first": float(first["ratio_mean"]), "ratio_mean_last": float(last["ratio_mean"]),
            "kl": float(last.get("kl", 0.0)), "entropy": float(last.get("entropy", 0.0)),
            "reward_timeouts": ro.timeouts, "reward_errors": ro.errors,
            "rollout_time": t_rollout, "update_time": t_update,
            "input_tokens": float(rows["segment_ids"].sum() * g.update_passes),
            "response_tokens": float(mask.sum()),
            **gap,
        }
        return state, metrics

    def _with_placeholders(self, rows: dict) -> dict:
        out = {k: rows[k] for k in ("input_ids", "positions", "segment_ids", "targets")}
        zeros = np.zeros_like(rows["old_logp"])
        out.update(loss_mask=rows["loss_mask"], old_logp=zeros, ref_logp=zeros, adv=rows["adv"],
                   num_seqs=np.ones_like(rows["adv"]))
        return out

    def _sampler_mismatch(self, params, rows, put) -> float:
        """Mean |logp_sampler - logp_train| over loss tokens: a sampler/trainer mismatch biases the importance
        ratios away from 1 (0 up to fp error here)."""
        return self._gap(parallel.host_array(self.logprobs(params, put(self._with_placeholders(rows)))), rows)

    @staticmethod
    def _gap(train: np.ndarray, rows: dict) -> float:
        mask = rows["loss_mask"] > 0
        return float(np.abs(train - rows["old_logp"])[mask].mean()) if mask.any() else 0.0

    def close(self) -> None:
        self.pool.close()


# ----------------------------------------------------------------------------- main


def prompt_batch_config(config, plan=None):
    """The `pipeline.PromptBatchConfig` of a run; `plan` (an `epochs.StepPlan`) sets the epochs (None: forever)."""
    from xr_jax.data import pipeline

    g, d = config.grpo, config.data
    return pipeline.PromptBatchConfig(
        batch_size=config.train.batch_size, max_prompt_len=g.max_prompt_len, seed=config.train.seed,
        shuffle=d.shuffle, prompt=setup.prompt_config(d), image=setup.image_config(d),
        num_epochs=None if plan is None else plan.num_epochs,
        epoch_batches=None if plan is None else plan.epoch_batches)


def plan_steps(config, tokenizer):
    """Rollout steps (`epochs.StepPlan`): fixed, or `train.epochs` passes over the usable prompts."""
    from xr_jax.data import pipeline
    from xr_jax.train import epochs

    cfg = prompt_batch_config(config)
    settings = {"max_prompt_len": cfg.max_prompt_len, "prompt": dataclasses.asdict(cfg.prompt),
                "image": dataclasses.asdict(cfg.image)}
    return epochs.plan_from_data(
        config, "grpo", lambda: setup.make_source(config), tokenizer, settings,
        lambda ex: pipeline.encode_prompt(ex, tokenizer, cfg), "prompt_ids",
        lambda table, n: pipeline.rl_epoch_batches(table, cfg, n, jax.process_count()))


def load_prompts(config, tokenizer, plan=None):
    """The RL prompt iterator (grain; its state is saved in checkpoints) for `data.source`, over the epochs of
    `plan` (`plan_steps`; None: the prompts repeat without end)."""
    from xr_jax.data import pipeline

    return iter(pipeline.rl_pipeline(setup.make_source(config), tokenizer, prompt_batch_config(config, plan)))


def check_layout(config, mesh: Mesh) -> None:
    g, tr = config.grpo, config.train
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if tr.batch_size % dp:
        raise parallel.MeshError(
            f"train.batch_size {tr.batch_size} prompts do not split over data x fsdp = {dp} devices (prompts are "
            f"prefilled sharded); use a multiple of {dp} or change mesh.shape")
    if tr.batch_size % g.minibatches:
        raise parallel.MeshError(
            f"train.batch_size {tr.batch_size} prompts do not split into grpo.minibatches {g.minibatches} "
            "(each minibatch holds whole groups)")
    per = tr.batch_size * g.group_size // g.minibatches
    if per % (dp * g.microbatches):
        raise parallel.MeshError(
            f"each minibatch has {per} rows but needs a multiple of data x fsdp x grpo.microbatches = "
            f"{dp * g.microbatches}; change train.batch_size, grpo.minibatches or mesh.shape")


def updates_per_step(g) -> int:
    """Optimizer updates per rollout step: every pass over the rollout updates once per minibatch."""
    return g.minibatches * g.update_passes


def main(config) -> dict:
    """Run (or resume) GRPO from a resolved `xr_jax.config.Config`; returns the last step's metrics."""
    from xr_jax.train import epochs

    run = setup.Run.start(config, lambda mesh: check_layout(config, mesh))
    plan = plan_steps(config, run.tokenizer)
    # The schedule counts optimizer updates: warmup_ratio is a share of every update of every epoch (paper: 10%).
    st = run.state_setup(plan.scaled(updates_per_step(config.grpo)))
    batches = load_prompts(config, run.tokenizer, plan)
    ref = None
    if config.grpo.kl_coef > 0:  # the frozen initial policy: re-derived identically on resume
        ref = jax.tree_util.tree_map(jnp.copy, run.fresh(st).params)
    state, checkpointer = run.resume_or_start(st, batches)
    trainer = GRPOTrainer(config, run.model_cfg, run.tokenizer, run.mesh, st.tx, st.schedule, st.shardings, ref,
                          st.frozen)
    return run.train(state, checkpointer, epochs.with_data_metrics(trainer.step, batches, truncation=False), batches,
                     plan.total, put_batch=lambda b: b, close=trainer.close)
