"""Jitted sampler: left-padded prefill, KV-cache decode in chunks of `chunk` tokens, forced exit, group sampling.

Shapes are static so one compiled program serves every call with the same (batch, prompt bucket,
patch bucket, config): prompts are left-padded to a length bucket, the cache holds
`bucket + max_new - 1` slots, and every row's k-th generated token sits in column k of the output
(all rows start generating at the same step), at M-RoPE position `prompt_len + k + rope_delta`.

Decoding reads the weights as `qwen2.decode_weights` lays them out (per layer, in the sampling dtype,
made once per call; replicated over the mesh, so the token loop runs no weight collectives) and keeps
one KV buffer [B, K, S, H] per layer. The token loop is a `while_loop` over chunks of `chunk` tokens,
each a loop of known trip count: the stop test (all rows done) runs, and syncs with the host on GPU,
once per chunk.

Forced exit (X-Reasoner §2.1 / s1 budget forcing): with `max_think = k`, a row that has not produced
the exit pattern (`</think>`, matched on decoded bytes by `byte_match`) within its first k tokens
gets the exit ids written at columns k .. k+E-1 (fed through the model, marked `forced`), then up to
`max_answer` more sampled tokens. The match runs over generated tokens only (the prompt's own
`<think> </think>` instructions do not count). A row whose own `</think>` is cut by the budget (say
'</' 'think' at k-2, k-1) has not closed, so it gets the whole exit text after it, as s1's append
does. Every row's output is bounded by `k + E + max_answer`, so a row that closed `</think>` itself
samples exactly what it would without forced exit.

Typical use:

    sampler = Sampler(model_cfg, SamplingConfig(temperature=1.0, max_think=3839, max_answer=256),
                      forced_exit=ForcedExit.from_tokenizer(tokenizer, model_cfg.text.vocab_size))
    out = sampler.generate(params, [Prompt(ids), Prompt(ids2, pixel_values, grid_thw)], rng=0, group_size=8)
    out.tokens, out.logprobs, out.forced, out.lengths, out.finish_names()
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xr_jax import parallel
from xr_jax.sampling.byte_match import ByteMatcher, token_byte_table
from xr_jax.errors import UserError
from xr_jax.models.config import ModelConfig
from xr_jax.models.layers import as_dtype
from xr_jax.models.qwen2 import decode_weights, extend_layer_cache
from xr_jax.models.qwen2_5_vl import check_image_tokens, decode_step, get_rope_index, prefill

# finish reasons: EOS = stopped on a stop id; FORCED_EXIT = forced, then stopped on a stop id;
# LENGTH = ran out of tokens (forced or not: a forced row that also exhausts max_answer is LENGTH).
EOS, FORCED_EXIT, LENGTH = 0, 1, 2
FINISH_NAMES = ("eos", "forced_exit", "length")

QWEN_STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
DEFAULT_PROMPT_BUCKETS = tuple(2**i for i in range(5, 16))  # 32 .. 32768


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What to sample. Changing any field compiles a new program (they fix shapes or code paths).

    temperature: 0 = greedy (logprobs then at temperature 1); > 0 samples from softmax(logits / T).
    top_k: 0 = off. top_p: 1.0 = off. Filters shape the sampling distribution only: returned
      logprobs are always the unfiltered softmax(logits / T) — what the trainer recomputes.
    max_new_tokens: output length without forced exit (`max_think` None).
    max_think / max_answer: forced exit on; output length is max_think + len(exit ids) + max_answer.
    stop_ids: a sampled stop id ends its row (included in the output); forced tokens never stop.
    pad_id: fills the output after a row ends (and left-pads prompts).
    prompt_buckets: prompts are left-padded to the smallest bucket that fits the longest one.
    weight_dtype: dtype of the weights copy decoding reads (None: the model's compute dtype, which gives
      the same numbers as the params themselves; e.g. "bfloat16" with fp32 compute samples with
      bf16-rounded weights).
    chunk: tokens decoded between two tests of "every row done" (a loop of known trip count): the
      host syncs once per chunk on GPU; at most chunk - 1 steps are spent after the last row stops.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_think: Optional[int] = None
    max_answer: int = 256
    stop_ids: tuple[int, ...] = QWEN_STOP_IDS
    pad_id: int = 151643
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    weight_dtype: Optional[str] = None
    chunk: int = 8

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_think is not None and (self.max_think < 0 or self.max_answer < 0):
            raise ValueError(
                f"sampling.max_think ({self.max_think}) and sampling.max_answer ({self.max_answer}) must be >= 0"
            )
        if not self.prompt_buckets or sorted(self.prompt_buckets) != list(self.prompt_buckets):
            raise ValueError(f"sampling.prompt_buckets must be a non-empty increasing tuple, got {self.prompt_buckets}")
        if self.chunk < 1:
            raise ValueError(f"sampling.chunk must be >= 1, got {self.chunk}")


@dataclasses.dataclass(frozen=True)
class ForcedExit:
    """The exit ids written at the budget, and the matcher that tells a row already closed its thinking.

    `ids` are the tokenizer's ids of the forced text (default text `</think>`; a suffix such as
    `\\n\\n<answer>` may follow); `matcher` looks for `detect` (default `</think>`) in decoded bytes.
    """

    ids: tuple[int, ...]
    matcher: ByteMatcher

    @classmethod
    def build(
        cls, exit_ids: Sequence[int], token_bytes: Sequence[bytes], vocab_size: int, detect: bytes = b"</think>"
    ) -> "ForcedExit":
        ids = tuple(int(i) for i in exit_ids)
        if not ids or min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"forced-exit ids {ids} must be a non-empty list of ids below the vocabulary {vocab_size}")
        matcher = ByteMatcher.build(detect, token_bytes, vocab_size)
        if matcher.run(ids) != matcher.found:
            text = b"".join(token_bytes[i] for i in ids)
            raise ValueError(f"forced-exit ids decode to {text!r}, which does not contain the exit pattern {detect!r}")
        return cls(ids, matcher)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, text: str = "</think>") -> "ForcedExit":
        """The forced exit every caller uses: `text`'s ids written at the budget, matched over the bytes of
        every model id (`byte_match.token_byte_table`)."""
        return cls.build(tokenizer.encode(text), token_byte_table(tokenizer, vocab_size), vocab_size)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: token ids (with `<|image_pad|>` runs), and its images' patches and grids if any."""

    ids: Sequence[int]
    pixel_values: Optional[np.ndarray] = None  # [patches, patch_dim]
    grid_thw: Optional[np.ndarray] = None  # [images, 3]


@dataclasses.dataclass
class PromptBatch:
    """Host arrays of a left-padded prompt batch (shapes fixed by the buckets)."""

    input_ids: np.ndarray  # [B, L] int32
    segment_ids: np.ndarray  # [B, L] int32, 0 = padding
    positions: np.ndarray  # [B, 3, L] int32 M-RoPE positions
    next_position: np.ndarray  # [B] int32: position of generated token 0 = prompt_len + rope_delta
    prompt_lengths: np.ndarray  # [B] int32
    pixel_values: Optional[np.ndarray] = None  # [P, patch_dim] float32, padded to a patch bucket
    vision_layout: Any = None


@dataclasses.dataclass
class SampleOutput:
    """Per generated row (prompt-major: row p * G + g is sample g of prompt p), numpy.

    tokens [N, T] (pad_id after the end), logprobs [N, T] (0 after the end), forced [N, T] (exit
    tokens written by the sampler), lengths [N], finish_reason [N] (codes EOS/FORCED_EXIT/LENGTH).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    forced: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray
    group_size: int = 1

    @property
    def mask(self) -> np.ndarray:
        """[N, T] True on generated tokens (before padding)."""
        return np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]

    @property
    def prompt_index(self) -> np.ndarray:
        return np.arange(len(self.lengths)) // self.group_size

    def finish_names(self) -> list[str]:
        return [FINISH_NAMES[int(r)] for r in self.finish_reason]

    def row_ids(self, row: int) -> list[int]:
        return self.tokens[row, : self.lengths[row]].tolist()


# ----------------------------------------------------------------------------------------------- host side


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]} (buckets {tuple(buckets)})")


class PromptTooLong(UserError):
    """A prompt with more tokens than the model has positions: refused, as the model never saw such positions."""


def prepare_prompts(prompts: Sequence[Prompt], cfg: ModelConfig, scfg: SamplingConfig, min_length: int = 0) -> PromptBatch:
    """Left-pad prompts into a bucket (at least `min_length`), compute M-RoPE positions, pack and pad image patches."""
    if not prompts:
        raise ValueError("no prompts given")
    rows = [np.asarray(p.ids, np.int64).reshape(-1) for p in prompts]
    for i, (r, p) in enumerate(zip(rows, prompts)):
        if len(r) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(r) > cfg.text.max_position_embeddings:
            raise PromptTooLong(
                f"a prompt has {len(r)} tokens but the model has {cfg.text.max_position_embeddings} positions "
                "(max_position_embeddings): shorten it or use a model with more positions")
        if r.min() < 0 or r.max() >= cfg.text.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.text.vocab_size})")
        if (p.pixel_values is None) != (p.grid_thw is None):
            raise ValueError(f"prompt {i}: pixel_values and grid_thw must be given together")
        try:
            check_image_tokens(r[None], p.grid_thw, cfg)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    b = len(rows)
    length = bucket(max(max(map(len, rows)), min_length), scfg.prompt_buckets, "prompt length")
    ids = np.full((b, length), scfg.pad_id, np.int64)
    seg = np.zeros((b, length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        seg[i, length - len(r):] = 1
    grids = [np.asarray(p.grid_thw).reshape(-1, 3) for p in prompts if p.grid_thw is not None]
    grid = np.concatenate(grids) if grids else None
    positions, deltas = get_rope_index(ids, grid, seg, cfg)
    lengths = np.array([len(r) for r in rows], np.int32)
    batch = PromptBatch(
        input_ids=ids.astype(np.int32), segment_ids=seg, positions=positions.astype(np.int32),
        next_position=(lengths + deltas).astype(np.int32), prompt_lengths=lengths,
    )
    if grid is not None:
        from xr_jax.models.vision import vision_layout, window_count

        pixels = np.concatenate([np.asarray(p.pixel_values, np.float32) for p in prompts if p.pixel_values is not None])
        n_patches = max(64, 1 << int(np.ceil(np.log2(len(pixels)))))  # power-of-two buckets
        n_windows = max(1, 1 << int(np.ceil(np.log2(window_count(grid, cfg.vision)))))
        batch.pixel_values = np.zeros((n_patches, pixels.shape[1]), np.float32)
        batch.pixel_values[: len(pixels)] = pixels
        batch.vision_layout = vision_layout(grid, cfg.vision, num_patches=n_patches, num_windows=n_windows)
    return batch


def _row_keys(rng, n: int, span: Optional[tuple[int, int]] = None):
    """Per-row PRNG keys from an int seed or one key (split into one key per global row; `span` = (first row,
    global rows) picks this process's), or n keys (this process's rows' keys, used as given)."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng.astype(jnp.uint32))
    if rng.ndim == 0:
        start, total = span or (0, n)
        return jax.random.split(rng, total)[start:start + n]
    if rng.shape != (n,):
        raise ValueError(f"rng holds {rng.shape[0]} keys but {n} rows are sampled (batch x group_size)")
    return rng


# ----------------------------------------------------------------------------------------------- device side


def filter_logits(scaled, top_k: int, top_p=None):
    """Top-k then top-p (nucleus) filtering of [B, V] logits; filtered entries become -inf.

    top_k 0 and top_p None are off (static); the top_p value itself may be traced.
    """
    neg = jnp.asarray(-jnp.inf, scaled.dtype)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, neg, scaled)
    if top_p is not None:
        desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the top token is always kept
        threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        scaled = jnp.where(scaled < threshold, neg, scaled)
    return scaled




@dataclasses.dataclass(frozen=True)
class DecodeProgram:
    """The static part of a decode — what fixes shapes or code paths (one compile per value).

    Temperature, top-p value, thinking budget, stop ids and the exit tables are runtime arrays, so
    e.g. two budgets with the same total length share one program.
    """

    model: ModelConfig
    max_new: int  # T
    greedy: bool
    top_k: int
    top_p: bool  # nucleus filtering on
    n_exit: int  # forced-exit ids E; 0 = forced exit off
    pad_id: int
    group_size: int
    chunk: int  # tokens per stop test


class DecodeKnobs(NamedTuple):
    """The runtime part of a decode: arrays, so that changing them reuses the compiled program."""

    temperature: jax.Array  # f32 scalar (floored at 1e-6)
    top_p: jax.Array  # f32 scalar
    max_think: jax.Array  # i32 scalar: the thinking budget k (0 without forced exit)
    stop_ids: jax.Array  # [S] i32, -1 = unused slot
    exit_ids: Optional[jax.Array] = None  # [E] i32, forced exit only
    transitions: Optional[jax.Array] = None  # [V, states] `ByteMatcher` table, forced exit only


class DecodeState(NamedTuple):
    """What the decode loop carries per row, besides the KV cache."""

    tokens: jax.Array  # [n, T] chosen tokens (pad after a row is done)
    logprobs: jax.Array  # [n, T] their log-probs at the sampling temperature (0 after done)
    forced: jax.Array  # [n, T] written by the exit budget, not sampled
    lengths: jax.Array  # [n] tokens produced
    done: jax.Array  # [n] stopped on a stop id (no more tokens)
    stopped: jax.Array  # [n] the same, kept for the finish reason
    last: jax.Array  # [n] the token fed at the next step
    match: jax.Array  # [n] `ByteMatcher` state over generated bytes (forced exit only; else stays 0)
    forcing: jax.Array  # [n] the budget ran out before `</think>`: the exit ids are being written

    @classmethod
    def empty(cls, n: int, length: int, pad_id: int) -> "DecodeState":
        zeros = lambda shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(tokens=jnp.full((n, length), pad_id, jnp.int32), logprobs=zeros((n, length), jnp.float32),
                   forced=zeros((n, length), bool), lengths=zeros((n,), jnp.int32), done=zeros((n,), bool),
                   stopped=zeros((n,), bool), last=zeros((n,), jnp.int32), match=zeros((n,), jnp.int32),
                   forcing=zeros((n,), bool))


def choose(t, logits, state: DecodeState, knobs: DecodeKnobs, row_keys, program: DecodeProgram) -> DecodeState:
    """Token t of every row from its logits [n, V]: sampled (or argmax), or written by the exit budget."""
    scaled = logits.astype(jnp.float32)
    if program.greedy:
        token = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
    else:
        scaled = scaled / knobs.temperature
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
        filtered = filter_logits(scaled, program.top_k, knobs.top_p if program.top_p else None)
        token = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    forced, match, forcing = jnp.zeros_like(state.done), state.match, state.forcing
    if program.n_exit:
        k_think = knobs.max_think
        closed = match == knobs.transitions.shape[1] - 1
        forcing = jnp.where(t == k_think, ~closed & ~state.done, forcing)
        forced = forcing & (t >= k_think) & (t < k_think + program.n_exit)
        token = jnp.where(forced, knobs.exit_ids[jnp.clip(t - k_think, 0, program.n_exit - 1)], token)
        match = knobs.transitions[token, match]
    logprob = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
    live = ~state.done
    stopped = live & ~forced & jnp.any(token[:, None] == knobs.stop_ids[None], axis=-1)
    put = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, t))  # noqa: E731
    return DecodeState(
        tokens=put(state.tokens, jnp.where(live, token, program.pad_id)),
        logprobs=put(state.logprobs, jnp.where(live, logprob, 0.0)),
        forced=put(state.forced, forced & live),
        lengths=state.lengths + live,
        done=state.done | stopped,
        stopped=state.stopped | stopped,
        last=token,
        match=match,
        forcing=forcing,
    )


def model_step(weights, kv, last, t, next_position, start, prompt_len: int, *, model: ModelConfig):
    """Feed token t - 1 of every row (`last`, written at slot prompt_len + t - 1 of the per-layer buffers `kv`):
    (logits [n, V] for token t, the new buffers). One token of the decode loop, less the choice."""
    index = prompt_len + t - 1
    bounds = (start, jnp.full_like(start, index + 1))  # live slots: after the padding, up to this token
    return decode_step(weights, last, next_position + t - 1, bounds, kv, index, model=model)


def _decode(weights, prompt_cache, logits, next_position, row_keys, knobs: DecodeKnobs, *, program: DecodeProgram):
    """Broadcast the prompt cache to the group once, then choose T tokens per row: a `while_loop` over chunks
    of `program.chunk` tokens (each a loop of known trip count) that stops once every row is done."""
    T = program.max_new
    rep = lambda x, axis: jnp.repeat(x, program.group_size, axis=axis) if program.group_size > 1 else x  # noqa: E731
    logits, next_position, start = rep(logits, 0), rep(next_position, 0), rep(prompt_cache["start"], 0)
    n = logits.shape[0]
    prompt_len = prompt_cache["kv"][0][0].shape[2]
    # slots for fed-back tokens: T - 1 (the last token is never fed)
    kv = extend_layer_cache(prompt_cache["kv"], T - 1, program.group_size)
    state = choose(0, logits, DecodeState.empty(n, T, program.pad_id), knobs, row_keys, program)

    def step(t, kv, state):
        step_logits, kv = model_step(weights, kv, state.last, t, next_position, start, prompt_len, model=program.model)
        return kv, choose(t, step_logits, state, knobs, row_keys, program)

    def steps(carry, count: int):
        """`count` (static) steps from carry's t: a loop XLA knows the trip count of."""
        t, kv, state = carry
        kv, state = jax.lax.fori_loop(0, count, lambda i, c: step(t + i, *c), (kv, state))
        return t + count, kv, state

    # steps 1 .. T-1: whole chunks while any row is live, then the remainder (a no-op for rows already done)
    full, remainder = divmod(T - 1, program.chunk)
    carry = jax.lax.while_loop(
        lambda c: (c[0] < 1 + full * program.chunk) & ~jnp.all(c[2].done),
        lambda c: steps(c, program.chunk), (jnp.asarray(1, jnp.int32), kv, state),
    )
    _, _, state = steps(carry, remainder) if remainder else carry
    any_forced = jnp.any(state.forced, axis=-1)
    reason = jnp.where(state.stopped, jnp.where(any_forced, FORCED_EXIT, EOS), LENGTH).astype(jnp.int32)
    return {
        "tokens": state.tokens, "logprobs": state.logprobs, "forced": state.forced,
        "lengths": state.lengths, "finish_reason": reason,
    }


# Module-level so every Sampler with the same static structure shares the compiled programs.
prefill_jit = jax.jit(prefill, static_argnames=("model", "all_logits"))
decode_jit = jax.jit(_decode, static_argnames=("program",))
@functools.lru_cache(maxsize=None)
def weights_jit(mesh: Optional[jax.sharding.Mesh] = None):
    """`decode_weights` jitted once per mesh (every Sampler on it shares the compiled cast); on a mesh, into
    the rollout layout: weights replicated, rows data-parallel."""
    layout = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
    return jax.jit(decode_weights, static_argnames=("dtype",), **layout)


class Sampler:
    """Sampling for one model config, sampling config and forced-exit setting.

    `mesh`: run sharded (batch over data/fsdp, heads over tensor) with params already placed on it (e.g. the
    training params in their FSDP layout): each call gathers them once into the replicated decode weights.
    """

    def __init__(
        self, cfg: ModelConfig, scfg: SamplingConfig, forced_exit: Optional[ForcedExit] = None,
        mesh: Optional[jax.sharding.Mesh] = None,
    ):
        cfg.validate()
        scfg.validate()
        if scfg.max_think is not None and forced_exit is None:
            raise ValueError("sampling.max_think is set but no ForcedExit (exit ids + token bytes) was given")
        for name, ids in (("stop_ids", scfg.stop_ids), ("pad_id", (scfg.pad_id,))):
            if any(not 0 <= i < cfg.text.vocab_size for i in ids):
                raise ValueError(f"sampling.{name} {ids} outside the vocabulary [0, {cfg.text.vocab_size})")
        if forced_exit is not None and forced_exit.matcher.transitions.shape[0] != cfg.text.vocab_size:
            raise ValueError("the ForcedExit was built for a different vocabulary size than the model's")
        self.cfg, self.scfg, self.mesh = cfg, scfg, mesh
        self.forced_exit = forced_exit if scfg.max_think is not None else None
        self._weights = weights_jit(mesh)

    def weights(self, params):
        """The weights decoding reads (`qwen2.decode_weights` in `weight_dtype`), made once per `generate`."""
        return self._weights(params, dtype=as_dtype(self.scfg.weight_dtype or self.cfg.dtype))

    @property
    def max_new(self) -> int:
        """Static output length T (max_think + E + max_answer with forced exit)."""
        if self.forced_exit is None:
            return self.scfg.max_new_tokens
        return self.scfg.max_think + len(self.forced_exit.ids) + self.scfg.max_answer

    def program(self, group_size: int) -> DecodeProgram:
        s = self.scfg
        return DecodeProgram(
            model=self.cfg, max_new=self.max_new, greedy=s.greedy, top_k=s.top_k, top_p=s.top_p < 1.0,
            n_exit=len(self.forced_exit.ids) if self.forced_exit else 0, pad_id=s.pad_id, group_size=group_size,
            chunk=s.chunk,
        )

    def knobs(self) -> DecodeKnobs:
        s, fe = self.scfg, self.forced_exit
        n_stop = max(4, -(-len(s.stop_ids) // 4) * 4)  # padded to a multiple of 4: one program for any few stops
        return DecodeKnobs(
            temperature=jnp.float32(max(s.temperature, 1e-6)),
            top_p=jnp.float32(s.top_p),
            max_think=jnp.int32(s.max_think if fe else 0),
            stop_ids=jnp.asarray(list(s.stop_ids) + [-1] * (n_stop - len(s.stop_ids)), jnp.int32),
            exit_ids=None if fe is None else jnp.asarray(fe.ids, jnp.int32),
            transitions=None if fe is None else jnp.asarray(fe.matcher.transitions),
        )

    def generate(self, params, prompts: Sequence[Prompt], rng=0, group_size: int = 1) -> SampleOutput:
        """Sample `group_size` continuations of each prompt (prefilled once; the group shares its cache).

        rng: int seed, one key, or `len(prompts) * group_size` keys (row p*G+g uses key p*G+g, so a
        group call equals G single calls given the matching keys).
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        batch = prepare_prompts(prompts, self.cfg, self.scfg, self._global_max_length(prompts))
        keys = self._keys(rng, len(prompts) * group_size)
        with self._context():
            weights = self.weights(params)
            cache, logits = prefill_jit(weights, *self._place(batch), model=self.cfg)
            out = decode_jit(
                weights, cache, logits, self._put(batch.next_position), self._put_keys(keys), self.knobs(),
                program=self.program(group_size),
            )
        return SampleOutput(**{k: parallel.local_rows(v) for k, v in out.items()}, group_size=group_size)

    # Multi-process: each process passes its own prompts (its block of the global batch, as `global_batch`
    # lays rows out) and gets its own rows back; row keys follow the global row index, so the samples do not
    # depend on the number of processes.

    def _multi_process(self) -> bool:
        return self.mesh is not None and jax.process_count() > 1

    def _global_max_length(self, prompts: Sequence[Prompt]) -> int:
        if not self._multi_process():
            return 0
        from jax.experimental import multihost_utils

        local = max(np.asarray(p.ids).size for p in prompts) if prompts else 0
        return int(np.max(multihost_utils.process_allgather(np.int32(local))))

    def _keys(self, rng, n_local: int):
        if not self._multi_process():
            return _row_keys(rng, n_local)
        if isinstance(rng, jax.Array) and not rng.is_fully_addressable:  # e.g. the replicated training rng
            typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
            rng = np.asarray(jax.random.key_data(rng) if typed else rng)
        return _row_keys(rng, n_local, parallel.process_rows(self.mesh, n_local))

    def _context(self):
        return parallel.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_process_local_data(parallel.batch_sharding(self.mesh, np.ndim(x)), x)

    def _put_keys(self, keys):
        if self.mesh is None:
            return keys
        return jax.random.wrap_key_data(self._put(np.asarray(jax.random.key_data(keys))))

    def _place(self, batch: PromptBatch):
        if batch.pixel_values is not None and self._multi_process():
            raise ValueError("image prompts are not supported in multi-process sampling yet (patches are not "
                             "batch-sharded); sample them on one process")
        pixels = None if batch.pixel_values is None else jnp.asarray(batch.pixel_values)
        return (
            self._put(batch.input_ids), self._put(batch.positions), self._put(batch.segment_ids),
            pixels, batch.vision_layout,
        )
