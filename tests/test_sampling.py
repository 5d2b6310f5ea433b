"""Sampler vs transformers `generate` (greedy, text/image/mixed left-padded batches), forced exit,
logprobs vs a full forward, seeding, compile counts, group sampling, and a sharded run.

Compile budget: prompts share one length bucket so most calls reuse the same programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import hf_reference as ref
from xr_jax import parallel
from xr_jax.sampling import sampler as sampling
from xr_jax.models import hf
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL, get_rope_index, init_params
from xr_jax.sampling.sampler import FINISH_NAMES, ForcedExit, Prompt, Sampler, SamplingConfig

CFG = tiny_vl_config()
N_NEW = 12  # T of the plain greedy program; forced-exit runs use max_think + 3 + max_answer = 12 too
BUCKETS = (16, 32, 64)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=N_NEW, stop_ids=(), pad_id=0, prompt_buckets=BUCKETS)
SAMPLE = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=N_NEW, stop_ids=(), pad_id=0,
                        prompt_buckets=BUCKETS)
LOGPROB_TOL = 2e-5  # fp32 cache-decode vs full forward, |Δ logprob|


@pytest.fixture(scope="module")
def hf_model():
    return ref.tiny_vl(seed=0, spiky=20.0)  # spiky LM head: no near-ties under greedy


@pytest.fixture(scope="module")
def params(hf_model):
    sd = ref.state_dict_numpy(hf_model)
    tree = {k: v for k, v in hf.tree_from_hf(sd).items() if k != "visual"}
    tree["visual"] = ref.vision_params_from_hf(sd)
    return jax.tree_util.tree_map(jnp.asarray, tree)


@pytest.fixture(scope="module")
def text_rows():
    rng = np.random.RandomState(0)
    return [rng.randint(2, 60, size=n).tolist() for n in (5, 9, 12)]


def _left_pad(rows):
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    am = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        am[i, length - len(r):] = 1
    return ids, am


def hf_generate(model, rows, n, eos=None, pixel_values=None, grid=None):
    """transformers greedy generate, explicitly without filters/penalties; new tokens [B, n] (pad 0)."""
    ids, am = _left_pad(rows)
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
              mm_token_type_ids=torch.tensor((ids == ref.IMAGE_TOKEN).astype(np.int64)))
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid))
    with torch.no_grad():
        out = model.generate(**kw, do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=eos,
                             pad_token_id=0, top_k=None, top_p=None, temperature=None, repetition_penalty=None)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n - new.shape[1])))  # generate stops early when all rows hit eos


# --------------------------------------------------------------------------------------------- greedy parity


def test_greedy_text_batch_matches_transformers_generate(hf_model, params, text_rows):
    want = hf_generate(hf_model, text_rows, N_NEW)
    out = Sampler(CFG, GREEDY).generate(params, [Prompt(r) for r in text_rows])
    np.testing.assert_array_equal(out.tokens, want)
    assert out.lengths.tolist() == [N_NEW] * 3 and out.finish_names() == ["length"] * 3

    # stop ids: two ids from the output (one early in row 1); generate pads after eos with 0 too
    stops = (int(want[1, 2]), int(want[0, 7]))
    want_eos = hf_generate(hf_model, text_rows, N_NEW, eos=list(stops))
    out = Sampler(CFG, GREEDY.__class__(**{**GREEDY.__dict__, "stop_ids": stops})).generate(
        params, [Prompt(r) for r in text_rows])
    np.testing.assert_array_equal(out.tokens, want_eos)
    for row in range(3):
        hit = [i for i, t in enumerate(want[row]) if t in stops]
        assert out.lengths[row] == (hit[0] + 1 if hit else N_NEW)
        assert out.finish_names()[row] == ("eos" if hit else "length")
    assert "eos" in out.finish_names()


def _image_batch(rng):
    """Rows: one image, text only, two images of different sizes (left-padded together)."""
    prompts, pixels, grids = [], [], []
    for g in ([(1, 4, 6)], None, [(1, 8, 8), (1, 4, 4)]):
        if g is None:
            prompts.append(Prompt(rng.randint(2, 60, size=7).tolist()))
            continue
        ids = ref.image_prompt(rng, g, [3] * (len(g) + 1))
        pv = rng.randn(sum(int(np.prod(x)) for x in g), CFG.vision.patch_dim).astype(np.float32)
        prompts.append(Prompt(ids, pv, np.array(g)))
        pixels.append(pv)
        grids += g
    return prompts, np.concatenate(pixels), np.array(grids)


def test_greedy_image_and_mixed_batch_match_transformers_generate(hf_model, params):
    rng = np.random.RandomState(1)
    prompts, pixels, grid = _image_batch(rng)
    want = hf_generate(hf_model, [p.ids for p in prompts], N_NEW, pixel_values=pixels, grid=grid)
    out = Sampler(CFG, GREEDY).generate(params, prompts)
    np.testing.assert_array_equal(out.tokens, want)


def test_rope_deltas_give_decode_positions():
    rng = np.random.RandomState(1)
    prompts, _, _ = _image_batch(rng)
    batch = sampling.prepare_prompts(prompts, CFG, GREEDY)
    _, deltas = get_rope_index([p.ids for p in prompts[:1]], np.array([(1, 4, 6)]), None, CFG)
    assert batch.next_position[0] == len(prompts[0].ids) + deltas[0] and deltas[0] < 0
    assert batch.next_position[1] == len(prompts[1].ids)  # text only: delta 0
    assert batch.positions.max(axis=(1, 2)).tolist() == (batch.next_position - 1).tolist()
    assert batch.input_ids.shape == (3, 64) and batch.pixel_values.shape[0] % 64 == 0


# --------------------------------------------------------------------------------------------- forced exit

EXIT_PIECES = {"open": b"</", "dot_open": b".</", "think": b"think", "close": b">"}


def _plain_table():
    """Bytes per id with no '<', '/' or '>' so only the pieces assigned below can form `</think>`."""
    return [b"w%d " % i for i in range(CFG.text.vocab_size)]


def _construct_boundary_cases(raw):
    """Assign exit pieces to ids of the raw greedy rows so that, for a budget k:

    row a closes `</think>` exactly at token k-1, split '.</' 'think' '>' (must NOT be forced);
    row b has '</' 'think' at k-2, k-1 and '>' at k — straddling the budget (must be forced);
    the remaining row is left alone. Returns (k, row a, row b, token_bytes, exit_ids)."""
    for k in range(3, N_NEW - 3):
        for a in range(3):
            for b in range(3):
                if a == b:
                    continue
                want = {}
                pairs = [(raw[a, k - 3], b".</"), (raw[a, k - 2], b"think"), (raw[a, k - 1], b">"),
                         (raw[b, k - 2], b"</"), (raw[b, k - 1], b"think"), (raw[b, k], b">")]
                if all(want.setdefault(int(i), p) == p for i, p in pairs):
                    table = _plain_table()
                    for i, p in want.items():
                        table[i] = p
                    exit_ids = [int(raw[b, k - 2]), int(raw[b, k - 1]), int(raw[b, k])]
                    return k, a, b, table, exit_ids
    raise AssertionError("no consistent id assignment found; change the prompts")


def _closing_index(ids, table, pattern=b"</think>"):
    text = b""
    for i, t in enumerate(ids):
        text += table[t]
        if pattern in text:
            return i
    return None


def test_forced_exit_at_budget_and_untouched_rows(hf_model, params, text_rows):
    raw = hf_generate(hf_model, text_rows, N_NEW)
    k, row_a, row_b, table, exit_ids = _construct_boundary_cases(raw)
    max_answer = N_NEW - k - len(exit_ids)
    fe = ForcedExit.build(exit_ids, table, CFG.text.vocab_size)
    scfg = SamplingConfig(temperature=0.0, max_think=k, max_answer=max_answer, stop_ids=(), pad_id=0,
                          prompt_buckets=BUCKETS)
    prompts = [Prompt(r) for r in text_rows]
    out = Sampler(CFG, scfg, forced_exit=fe).generate(params, prompts)
    plain = Sampler(CFG, GREEDY).generate(params, prompts)  # no forced exit, same total length
    np.testing.assert_array_equal(plain.tokens, raw)

    closed = [_closing_index(raw[r], table) for r in range(3)]
    assert closed[row_a] == k - 1 and closed[row_b] == k  # the constructed boundary cases
    forced_rows = [r for r in range(3) if closed[r] is None or closed[r] >= k]
    assert row_b in forced_rows and row_a not in forced_rows
    for r in range(3):
        if r not in forced_rows:  # closed by itself: byte-identical to the run without forced exit
            np.testing.assert_array_equal(out.tokens[r], plain.tokens[r])
            np.testing.assert_array_equal(out.logprobs[r], plain.logprobs[r])
            assert not out.forced[r].any() and out.finish_names()[r] == "length"
            continue
        np.testing.assert_array_equal(out.tokens[r, :k], raw[r, :k])
        assert out.tokens[r, k:k + 3].tolist() == exit_ids
        assert np.flatnonzero(out.forced[r]).tolist() == [k, k + 1, k + 2]
        assert out.lengths[r] == k + 3 + max_answer and out.finish_names()[r] == "length"

    # the continuation after the forced tokens is the model's greedy choice given them (cache was fed)
    seqs = [text_rows[r] + out.row_ids(r) for r in range(3)]
    ids, am = _left_pad(seqs)
    logits = ref.hf_logits(hf_model, ids, am)
    for r in forced_rows:
        pred = logits[r, ids.shape[1] - N_NEW - 1:-1].argmax(-1)  # prediction of each generated token
        np.testing.assert_array_equal(out.tokens[r, k + 3:], pred[k + 3:])

    # with a stop id sampled after the exit: the answer ends early, reason forced_exit
    r = forced_rows[0]
    stop = int(out.tokens[r, k + 4]) if max_answer > 1 else int(out.tokens[r, k + 3])
    stopped = Sampler(CFG, SamplingConfig(**{**scfg.__dict__, "stop_ids": (stop,)}), forced_exit=fe).generate(
        params, prompts)
    for row in range(3):
        sampled_hits = [i for i in range(N_NEW) if out.tokens[row, i] == stop and not out.forced[row, i]]
        end = sampled_hits[0] + 1 if sampled_hits else N_NEW
        assert stopped.lengths[row] == end
        np.testing.assert_array_equal(stopped.tokens[row, :end], out.tokens[row, :end])
        assert (stopped.tokens[row, end:] == 0).all()
        reason = "length" if not sampled_hits else ("forced_exit" if out.forced[row, :end].any() else "eos")
        assert stopped.finish_names()[row] == reason
    assert stopped.finish_names()[r] == "forced_exit"
    assert stopped.lengths[r] - (k + 3) <= max_answer


def test_forced_exit_needs_exit_pattern_in_exit_ids():
    with pytest.raises(ValueError, match="does not contain the exit pattern"):
        ForcedExit.build([3, 4], _plain_table(), CFG.text.vocab_size)
    with pytest.raises(ValueError, match="no ForcedExit"):
        Sampler(CFG, SamplingConfig(max_think=4, pad_id=0, stop_ids=()))


# --------------------------------------------------------------------------------------------- sampling


def _soft(params):
    """Same model with a 5x flatter LM head, so temperature sampling is not near-deterministic."""
    out = dict(params)
    out["lm_head"] = {"kernel": params["lm_head"]["kernel"] / 5.0}
    return out


def test_logprobs_equal_full_forward_and_respect_filters(params, text_rows):
    p = _soft(params)
    out = Sampler(CFG, SAMPLE).generate(p, [Prompt(r) for r in text_rows], rng=3)
    seqs = [text_rows[r] + out.row_ids(r) for r in range(3)]
    ids, am = _left_pad(seqs)
    pos = np.maximum(np.cumsum(am, axis=1) - 1, 0)  # text prompts; generated ids (even 60 = image pad) are text
    logits, _ = Qwen2_5_VL(CFG).apply({"params": p}, ids, pos, am)
    logits = np.asarray(logits, np.float64)[:, ids.shape[1] - N_NEW - 1:-1] / SAMPLE.temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    err = np.abs(out.logprobs - want).max()
    assert err < LOGPROB_TOL, err
    # every sampled token lies inside top-k and inside the top-p nucleus of its step
    order = np.argsort(-logp, axis=-1)
    rank = np.argmax(order == out.tokens[..., None], axis=-1)
    probs = np.exp(np.take_along_axis(logp, order, -1))
    mass_before = np.take_along_axis(np.cumsum(probs, -1) - probs, rank[..., None], -1)[..., 0]
    assert rank.max() < SAMPLE.top_k and mass_before.max() < SAMPLE.top_p
    assert len(set(map(tuple, out.tokens.tolist()))) == 3 and rank.max() > 0  # really sampled


def test_same_seed_same_samples_and_no_recompile(params, text_rows):
    p = _soft(params)
    sampler = Sampler(CFG, SAMPLE)
    prompts = [Prompt(r) for r in text_rows]
    first = sampler.generate(p, prompts, rng=7)
    sizes = sampling.prefill_jit._cache_size(), sampling.decode_jit._cache_size()
    again = sampler.generate(p, prompts, rng=7)
    other = Sampler(CFG, SAMPLE).generate(p, [Prompt(r[::-1]) for r in text_rows], rng=8)  # same shapes
    assert (sampling.prefill_jit._cache_size(), sampling.decode_jit._cache_size()) == sizes
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert (first.tokens != other.tokens).any()
    assert (first.tokens != sampler.generate(p, prompts, rng=8).tokens).any()


def test_group_sampling_equals_separate_calls_with_one_prefill(params, text_rows, monkeypatch):
    p, G = _soft(params), 4
    sampler = Sampler(CFG, SAMPLE)
    prompts = [Prompt(r) for r in text_rows]
    keys = jax.random.split(jax.random.key(11), len(prompts) * G)
    calls = []
    real_prefill = sampling.prefill_jit
    monkeypatch.setattr(sampling, "prefill_jit", lambda *a, **kw: calls.append(a[1].shape) or real_prefill(*a, **kw))
    group = sampler.generate(p, prompts, rng=keys, group_size=G)
    assert calls == [(3, 16)]  # one prefill of the 3 prompts, not 12
    assert group.prompt_index.tolist() == [0] * G + [1] * G + [2] * G
    for g in range(G):
        single = sampler.generate(p, prompts, rng=keys[g::G])
        np.testing.assert_array_equal(group.tokens[g::G], single.tokens)
        np.testing.assert_allclose(group.logprobs[g::G], single.logprobs, atol=1e-6)
    assert len({tuple(t) for t in group.tokens[:G].tolist()}) > 1  # the group's samples differ


def test_chunked_token_loop_equals_per_token_loop(params, text_rows):
    """The stop test every `chunk` tokens changes nothing: chunk 1 (a test per token), the default 8 (one
    chunk of 8 + a remainder of 3 for T - 1 = 11 steps) and 16 (only the remainder loop) give the same
    rows, with rows stopping at different steps."""
    p, prompts = _soft(params), [Prompt(r) for r in text_rows]
    free = Sampler(CFG, SAMPLE).generate(p, prompts, rng=5)
    stop = int(free.tokens[0, 2])  # row 0 stops at step 2 at the latest, the others later or never
    outs = [Sampler(CFG, SamplingConfig(**{**SAMPLE.__dict__, "stop_ids": (stop,), "chunk": c})).generate(
        p, prompts, rng=5) for c in (1, 8, 16)]
    assert outs[1].lengths[0] <= 3 and len(set(outs[1].lengths.tolist())) > 1
    for out in outs[::2]:
        for f in ("tokens", "logprobs", "lengths", "finish_reason"):
            np.testing.assert_array_equal(getattr(out, f), getattr(outs[1], f))


# --------------------------------------------------------------------------------------------- sharded


def test_sharded_group_greedy_on_mesh_matches_transformers(hf_model, params):
    rng = np.random.RandomState(4)
    rows = [rng.randint(2, 60, size=n).tolist() for n in (4, 10, 7, 13)]
    want = hf_generate(hf_model, rows, N_NEW)
    mesh = parallel.make_mesh((2, 2, 2))
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.PRNGKey(0)))
    sharded = jax.device_put(params, parallel.param_shardings(boxed, mesh))  # the training layout
    assert not sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.is_fully_replicated
    out = Sampler(CFG, GREEDY, mesh=mesh).generate(sharded, [Prompt(r) for r in rows], group_size=2)
    np.testing.assert_array_equal(out.tokens, np.repeat(want, 2, axis=0))


def test_decode_program_on_fsdp_mesh_gathers_no_weights_and_knows_its_trip_count(params):
    """The rollout layout: on an 8-way FSDP mesh the weights are gathered once, before decoding (replicated
    decode weights), so the compiled token loop holds no all-gather; its inner loop has a known trip count."""
    mesh = parallel.make_mesh((1, 8, 1))
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.PRNGKey(0)))
    sharded = jax.device_put(params, parallel.param_shardings(boxed, mesh))
    sampler = Sampler(CFG, GREEDY, mesh=mesh)
    batch = sampling.prepare_prompts([Prompt([3, 4, 5])] * 8, CFG, GREEDY)
    with parallel.use_mesh(mesh):
        weights = sampler.weights(sharded)
        assert all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(weights))
        # the cast into that layout is compiled once per mesh, not once per Sampler (GRPO and eval each build one)
        assert Sampler(CFG, GREEDY, mesh=mesh)._weights is sampler._weights
        cache, logits = sampling.prefill_jit(weights, *sampler._place(batch), model=CFG)
        args = (weights, cache, logits, sampler._put(batch.next_position),
                sampler._put_keys(jax.random.split(jax.random.key(0), 8)), sampler.knobs())
        hlo = sampling.decode_jit.lower(*args, program=sampler.program(1)).compile().as_text()
    assert "all-gather" not in hlo
    assert f'"known_trip_count":{{"n":"{GREEDY.chunk}"}}' in hlo


# --------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_have_clear_errors(params):
    s = Sampler(CFG, GREEDY)
    with pytest.raises(ValueError, match="prompt length 70 exceeds the largest bucket 64"):
        sampling.prepare_prompts([Prompt([2] * 70)], CFG, GREEDY)
    with pytest.raises(ValueError, match="prompt 1: Image features and image tokens do not match"):
        sampling.prepare_prompts([Prompt([2]), Prompt([ref.IMAGE_TOKEN] * 3)], CFG, GREEDY)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sampling.prepare_prompts([Prompt([])], CFG, GREEDY)
    with pytest.raises(ValueError, match="rng holds 2 keys but 3 rows"):
        s.generate(params, [Prompt([2])] * 3, rng=jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="top_p"):
        Sampler(CFG, SamplingConfig(top_p=0.0))
    assert FINISH_NAMES == ("eos", "forced_exit", "length")
    with pytest.raises(ValueError, match="chunk"):
        Sampler(CFG, SamplingConfig(chunk=0))
    # the optional bf16 copy of the weights
    half = Sampler(CFG, SamplingConfig(**{**GREEDY.__dict__, "weight_dtype": "bfloat16"})).weights(params)
    assert half["rest"]["lm_head"]["kernel"].dtype == jnp.bfloat16 and len(half["layers"]) == CFG.text.num_layers
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(half))
