"""The two training stages and what they share.

  setup.py      run setup shared by both trainers, `xr-jax plan` and the benches: mesh, model, optimizer,
                state shardings, fresh or resume, the loop, the export
  state.py      TrainState, the optimizer and its schedules, state shardings
  losses.py     chunked cross-entropy and per-token log-probs
  sft.py        SFT: loss, microbatch accumulation, jitted step, its data, `main`
  grpo_loss.py  GRPO advantages, loss aggregations, KL estimators (registries) and the clipped loss
  grpo.py       GRPO: rollout -> rewards -> advantages -> updates, its prompts, `main`
  loop.py       the loop: checkpoints, preemption, NaN guard, logging, progress
  epochs.py     `train.epochs` counted on the data; per-epoch metrics
  flops.py      FLOPs of a step, device peak FLOP/s
"""
