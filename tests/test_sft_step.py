"""SFT loss, gradients and AdamW update vs transformers + PyTorch; chunked losses; packing; accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from tests import hf_reference as ref
from xr_jax.config import OptimSection
from xr_jax.models import hf
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL
from xr_jax.train import losses, sft
from xr_jax.train.state import make_optimizer, make_schedule

CFG = tiny_vl_config(vision=None)


@pytest.fixture(scope="module")
def reference():
    model = ref.tiny_vl(seed=0)
    tree = {k: v for k, v in hf.tree_from_hf(ref.state_dict_numpy(model)).items() if k != "visual"}
    return model, jax.tree_util.tree_map(jnp.asarray, tree)


def _batch(seed=0, b=3, t=16):
    """Right-padded rows (segment 0 = padding) with a random loss mask over real tokens."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, 60, size=(b, t + 1))
    lengths = [t, t - 5, t - 9][:b] + [t] * max(0, b - 3)
    seg = np.zeros((b, t), np.int32)
    for i, n in enumerate(lengths):
        seg[i, :n] = 1
    mask = (rng.rand(b, t) < 0.7) & (seg > 0)
    pos = np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)
    return {"input_ids": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": mask.astype(np.float32), "segment_ids": seg, "positions": pos}


def _torch_loss(model, batch):
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    am = torch.tensor(batch["segment_ids"] > 0, dtype=torch.long)
    pos = torch.tensor(batch["positions"], dtype=torch.long)[None].expand(3, -1, -1)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
    mask = torch.tensor(batch["loss_mask"])
    return -(logp * mask).sum() / mask.sum()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_loss_and_grads_match_transformers_and_one_adamw_step_matches_torch(reference):
    model, params = reference
    batch = _batch()
    model.zero_grad()
    model.train()  # no dropout in Qwen2.5; train() only enables autograd bookkeeping the same way
    want_loss = _torch_loss(model, batch)
    want_loss.backward()
    loss_fn = sft.make_loss_fn(CFG, chunk=5)  # 5 does not divide 16: exercises chunk padding
    grads, (ce, _), count = sft.compute_grads(loss_fn, params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert _rel(ce / count, want_loss.item()) < 1e-5
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters() if "visual" not in n}
    want_grads = hf.tree_from_hf(torch_grads)
    want_grads = {k: v for k, v in want_grads.items() if k != "visual"}
    errs = jax.tree_util.tree_map(_rel, grads, want_grads)
    worst = max(jax.tree_util.tree_leaves(errs))
    assert worst < 1e-5, errs

    # one AdamW step (global-norm clipping active, weight decay on) from the same gradients
    optim = OptimSection(lr=1e-3, weight_decay=0.1, clip=0.5, schedule="constant")
    tx, _ = make_optimizer(optim, total_steps=10)
    updates, _ = tx.update(want_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    torch_opt = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if "visual" not in n], lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
        weight_decay=0.1)
    torch.nn.utils.clip_grad_norm_([p for n, p in model.named_parameters() if "visual" not in n], 0.5)
    torch_opt.step()
    after = {k: v for k, v in hf.tree_from_hf(ref.state_dict_numpy(model)).items() if k != "visual"}
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new, after)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-6, diff


def test_chunked_logprobs_equal_full_logits_at_a_temperature(reference):
    _, params = reference
    model = Qwen2_5_VL(CFG)
    batch = _batch(seed=1)
    hidden, _ = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
                            return_hidden=True)
    head = lambda h: model.apply({"params": params}, h, method="logits")  # noqa: E731
    full = jax.nn.log_softmax(head(hidden) / 0.7, axis=-1)
    want = np.take_along_axis(np.asarray(full), batch["targets"][..., None], -1)[..., 0]
    for chunk in (1, 4, 7, 16, 64):
        got = losses.target_logprobs_and_lse(hidden, jnp.asarray(batch["targets"]), head, temperature=0.7, chunk=chunk)[0]
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_chunked_loss_never_builds_full_vocab_logits():
    """XLA's own memory analysis of the backward: temporaries stay far below one [B, T, V] fp32 buffer,
    while the unchunked computation (chunk = T) needs at least that much."""
    b, t, d, v = 2, 512, 16, 1000
    w = jnp.ones((d, v)) * 0.01
    tokens = jnp.ones((b, t))

    def temp_bytes(chunk):
        loss = lambda h: losses.fused_cross_entropy(h, w, jnp.zeros((b, t), jnp.int32), tokens, tokens, chunk)[0]  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(jnp.ones((b, t, d))).compile().memory_analysis().temp_size_in_bytes

    full = b * t * v * 4
    assert temp_bytes(t) >= full
    assert temp_bytes(64) < full / 2  # a few chunk-sized buffers (logits, softmax, d logits), each full / 8


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_fused_cross_entropy_equals_autodiff_of_the_formula(chunk):
    """Objective, per-token values and the gradients of hidden and head weight against autodiff of
    log_softmax, with per-token weights, a z-loss term and chunks that do not divide T."""
    rng = np.random.default_rng(chunk)
    b, t, d, v = 2, 16, 8, 50
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    w_ce = jnp.asarray(rng.random((b, t)) * (rng.random((b, t)) < 0.8), jnp.float32)
    w_z = 0.3 * w_ce

    def formula(hidden, w):
        logits = hidden @ w
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
        return jnp.sum(-w_ce * logp + w_z * lse**2), (logp, lse)

    (want, (logp, lse)), want_grads = jax.value_and_grad(formula, argnums=(0, 1), has_aux=True)(hidden, w)
    fused = lambda hidden, w: losses.fused_cross_entropy(hidden, w, targets, w_ce, w_z, chunk)  # noqa: E731
    got, got_logp, got_lse = fused(hidden, w)
    got_grads = jax.grad(lambda *a: fused(*a)[0], argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_logp, logp, atol=2e-6)
    np.testing.assert_allclose(got_lse, lse, atol=2e-6)
    for g, r in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, r, atol=2e-6 * float(jnp.max(jnp.abs(r))))


def test_packed_row_loss_equals_separate_rows(reference):
    """Two sequences packed in one row (segment ids 1, 2, positions restart) give the same loss sum."""
    _, params = reference
    loss_fn = sft.make_loss_fn(CFG, chunk=8)
    rng = np.random.RandomState(3)
    a, c = rng.randint(2, 60, size=10), rng.randint(2, 60, size=7)
    ma, mc = (rng.rand(9) < 0.8).astype(np.float32), (rng.rand(6) < 0.8).astype(np.float32)

    def row(ids, mask, n=16, seg=1):
        out = {"input_ids": np.zeros(n, np.int32), "targets": np.zeros(n, np.int32), "loss_mask": np.zeros(n, np.float32),
               "segment_ids": np.zeros(n, np.int32), "positions": np.zeros(n, np.int32)}
        k = len(ids) - 1
        out["input_ids"][:k], out["targets"][:k], out["loss_mask"][:k] = ids[:-1], ids[1:], mask
        out["segment_ids"][:k], out["positions"][:k] = seg, np.arange(k)
        return out

    ra, rc = row(a, ma), row(c, mc)
    packed = {k: np.concatenate([ra[k][:9], rc[k][:6], np.zeros(1, ra[k].dtype)]) for k in ra}
    packed["segment_ids"][9:15] = 2
    sep = {k: np.stack([ra[k], rc[k]]) for k in ra}
    one = lambda bt: float(loss_fn(params, {k: jnp.asarray(v) for k, v in bt.items()}, 1.0)[1][0])  # noqa: E731
    assert abs(one({k: v[None] for k, v in packed.items()}) - one(sep)) < 1e-4


def test_step_decay_schedule_is_the_papers():
    sched = make_schedule(OptimSection(lr=1e-5, schedule="step_decay", decay_per_epoch=0.8), 30, epoch_steps=10)
    assert [float(sched(s)) for s in (0, 9, 10, 25)] == pytest.approx([1e-5, 1e-5, 8e-6, 6.4e-6], rel=1e-6)
    warm = make_schedule(OptimSection(lr=1e-4, schedule="cosine", warmup_steps=4), 20)
    assert float(warm(0)) == 0.0 and float(warm(4)) == pytest.approx(1e-4) and float(warm(20)) == pytest.approx(0.0, abs=1e-12)


def test_frozen_vision_tower_gets_no_optimizer_state_and_no_update():
    import flax.linen as nn

    from xr_jax.models.presets import preset
    from xr_jax.models.qwen2_5_vl import init_params

    params = nn.unbox(init_params(preset("tiny-vl"), jax.random.PRNGKey(0)))
    tx, _ = make_optimizer(OptimSection(lr=1e-2), 10, frozen=("visual",))
    opt = tx.init(params)
    n_text = sum(x.size for k, v in params.items() if k != "visual" for x in jax.tree_util.tree_leaves(v))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(opt) if x.ndim > 0)
    assert n_state == 2 * n_text  # AdamW mu and nu for the text params only
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates["visual"]))
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(updates["model"]))
