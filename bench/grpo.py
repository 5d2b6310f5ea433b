"""One GRPO step split into rollout and update: xr_jax beside a plain transformers + PyTorch counterpart.

xr_jax: `Sampler.generate` draws `group` samples per prompt (temperature 1, exactly `new` tokens: no stop
ids), then one jitted `grpo.make_update_step` optimizer step (clipped-ratio token-mean loss, entropy
logged, AdamW) on all prompt + response rows. PyTorch: `generate` with `num_return_sequences=group`,
sampling at temperature 1, `min_new_tokens = max_new_tokens` and the per-step logits kept (the old
log-probs, as the xr_jax sampler returns them), then one step of the same clipped-ratio loss
(clip 0.2 / 0.28, token mean), backward, global-norm clipping and AdamW. Rewards are not timed (both sides
would score the same strings in the same worker pool); advantages are random, fixed per row.
Both sides: the model's compute dtype (bf16 autocast over fp32 weights on GPU; fp32 on CPU).
"""

from __future__ import annotations

import time

import jax
import numpy as np

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def xr_runner(cfg, params, prompts: np.ndarray, group: int, new: int):
    """Compile and warm up; returns `run() -> (rollout seconds, update seconds)`."""
    from xr_jax import parallel
    from xr_jax.config import OptimSection
    from xr_jax.sampling.sampler import Prompt, Sampler, SamplingConfig, prepare_prompts
    from xr_jax.train import grpo, setup
    from xr_jax.train.grpo_loss import GRPOLossConfig

    scfg = SamplingConfig(temperature=1.0, max_new_tokens=new, stop_ids=(), pad_id=0,
                          prompt_buckets=(prompts.shape[1],))
    sampler = Sampler(cfg, scfg)
    batch = prepare_prompts([Prompt(r) for r in prompts], cfg, scfg)
    st = setup.state_setup(OptimSection(lr=1e-6, schedule="constant"), cfg, parallel.make_mesh((-1, 1, 1)), 1000)
    state = st.fresh(0, params)
    update = jax.jit(grpo.make_update_step(cfg, st.tx, st.schedule, GRPOLossConfig(CLIP_LOW, CLIP_HIGH),
                                           temperature=1.0, prompt_len=prompts.shape[1]), donate_argnums=0)
    adv = np.random.RandomState(0).randn(len(prompts) * group).astype(np.float32)
    holder = [state]

    def run():
        t0 = time.perf_counter()
        out = sampler.generate(holder[0].params, [Prompt(r) for r in prompts], rng=0, group_size=group)
        t1 = time.perf_counter()
        rows = grpo.build_rows(batch, out, adv, group, mask_forced=False)
        rows.update(ref_logp=np.zeros_like(rows["old_logp"]), num_seqs=np.ones_like(adv))
        holder[0], m = update(holder[0], rows)
        jax.block_until_ready((holder[0], m))
        return t1 - t0, time.perf_counter() - t1

    run()
    return run


def torch_runner(model, prompts: np.ndarray, group: int, new: int, device: str, bf16: bool):
    """Warm up; returns `run() -> (rollout seconds, update seconds)` for the HF model (fp32 weights)."""
    import torch

    ids = torch.tensor(prompts, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    adv = torch.tensor(np.random.RandomState(0).randn(len(prompts) * group), dtype=torch.float32, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    p = prompts.shape[1]

    def run():
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=None,
                top_p=None, num_return_sequences=group, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                pad_token_id=0, return_dict_in_generate=True, output_logits=True)
            tokens = out.sequences[:, p:]
            logits = torch.stack(out.logits, 1).float()
            old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        sync()
        t1 = time.perf_counter()
        with autocast:
            logits = model(input_ids=out.sequences).logits[:, p - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
        ratio = torch.exp(logp - old)
        a = adv[:, None]
        loss = -torch.minimum(ratio * a, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * a).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t1

    run()
    return run
