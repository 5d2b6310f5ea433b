"""Benchmark runner and metrics: the paper's evaluation protocol (X-Reasoner §3, App. C-D).

Protocol: the paper's eval prompt templates (multiple-choice / math), greedy decoding (headline numbers)
or k samples at temperature 0.3 (avg@k, maj@k, pass@k), output capped at 4,096 tokens with forced exit
(`max_think` thinking tokens, then `</think>` is written, then up to `max_answer` tokens).

The runner talks to the model through two small seams, so that it can be tested with injected responses:
- a `Generator` turns `EvalPrompt`s (user-turn text + images) into `Generation`s (text, token count,
  finish reason, forced flag); `xr_jax.eval.generator` defines the seam and `ModelGenerator`, the real one
  (tokenizer + sampler);
- a `Scorer` turns (item, response) pairs into `Scored` (extracted answer, vote key, correct);
  `RewardScorer` uses the project's reward functions in their worker pool.

Every prediction is written to `predictions.jsonl` with what rescoring needs (gold answers, options,
kind), and all metrics are computed from those records only, so `rescore(predictions.jsonl)` reproduces
the live run's numbers exactly, and a changed scorer can be applied without regenerating.

Resuming: each batch's responses are appended to `predictions.jsonl` (flushed) as soon as they are
generated, and the generation settings go to `generation.json` beside it. A rerun into the same
`output_dir` reuses every batch whose responses are all there (keyed by benchmark, item id and sample
index; the prompt must be the same) and generates only the rest, so an interrupted evaluation loses at
most one batch. Batches keep the clean run's boundaries and seeds, so a resumed run's results equal an
uninterrupted one's. Changed generation settings are refused (`ResumeMismatch`), never mixed.

Metrics per benchmark (k samples per question; k = 1 for greedy):
- avg@k: mean correctness over all samples (accuracy when k = 1);
- maj@k: the most frequent parsed answer (vote key) is correct; ties go to the answer seen first;
  a question whose samples are all unparsable counts wrong;
- pass@k: at least one sample is correct;
- unparsable: share of samples with no extractable answer (they count as wrong and are listed apart);
- endless: share of samples that ran out of tokens (finish reason `length`), the paper's "endless
  thinking" (Table 2); forced: share of samples whose thinking was cut by forced exit;
- response length in tokens and in words (the paper reports words).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from xr_jax.data import images as images_lib
from xr_jax.errors import UserError, check_writable_dir
from xr_jax.eval import benchmarks as bm
from xr_jax.eval.generator import EvalPrompt, Generator, ModelGenerator
PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = "generation.json"


class ResumeMismatch(UserError, ValueError):
    """`eval.output_dir` holds predictions generated differently: they would mix with the new ones."""


class PredictionsError(UserError, ValueError):
    """A predictions file line that is not a prediction record (names the file and line)."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """The `eval` section of the run config.

    benchmarks: registry names (`xr_jax.eval.benchmarks.BENCHMARKS`) to run, in order.
    sources: per benchmark, where its data is and how much of it: {name: {path, split, image_root,
        limit, subsample_seed}} (all optional; `path` defaults to the benchmark's hub id).
    protocol: "greedy" (k = 1, the paper's headline numbers) or "sampling" (`num_samples` at
        `temperature`: avg@k / maj@k / pass@k, the paper's Figs. 3-4 use k = 5, T = 0.3).
    max_tokens: the cap on a response's length (the paper's 4,096). With forced exit, thinking is cut at
        `max_tokens - max_answer - len(exit tokens)` and `max_answer` tokens remain for the answer.
    forced_exit: False reproduces the "before forced exit" column of the paper's Table 2.
    batch_size: prompts per generate call (rows = batch_size * k); a multiple of the mesh's data axis.
    mc_template / math_template: prompt template names (`xr_jax.data.templates`).
    min_pixels / max_pixels: the image resolution bounds (`smart_resize`); the default is the checkpoints'
        `preprocessor_config.json` (3136 / 12845056, what vLLM uses unset; the paper does not say), the
        X-Reasoner-7B model card's example uses 262144 / 262144 (`xr_jax.data.images` documents both).
        Recorded in results.json.
    rescore: a predictions.jsonl to re-score instead of generating (no model is loaded).
    """

    benchmarks: tuple[str, ...] = ()
    sources: dict = dataclasses.field(default_factory=dict)
    output_dir: str = "eval_out"
    protocol: str = "greedy"
    num_samples: int = 5
    temperature: float = 0.3
    max_tokens: int = 4096
    max_answer: int = 256
    forced_exit: bool = True
    batch_size: int = 32
    seed: int = 0
    mc_template: str = "x_reasoner_eval_mc"
    math_template: str = "x_reasoner_eval_math"
    score_workers: int = 4
    score_timeout: float = 10.0
    rescore: Optional[str] = None
    min_pixels: int = images_lib.DEFAULT_MIN_PIXELS
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS

    @property
    def k(self) -> int:
        return 1 if self.protocol == "greedy" else self.num_samples

    def image_config(self) -> images_lib.ImageConfig:
        """The image preprocessing of this evaluation (raises ValueError on bad pixel bounds)."""
        try:
            return images_lib.ImageConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise ValueError(f"eval.min_pixels / eval.max_pixels: {e}") from None

    def validate(self) -> "EvalSection":
        if self.protocol not in ("greedy", "sampling"):
            raise ValueError(f"eval.protocol is {self.protocol!r}; expected 'greedy' or 'sampling'")
        for key in ("num_samples", "max_tokens", "max_answer", "batch_size", "score_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.protocol == "sampling" and not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0 for protocol 'sampling', got {self.temperature}")
        self.image_config()
        if self.max_answer >= self.max_tokens:
            raise ValueError(f"eval.max_answer ({self.max_answer}) must be below eval.max_tokens ({self.max_tokens})")
        if not self.benchmarks and self.rescore is None:
            raise ValueError("eval.benchmarks is empty: name at least one benchmark (or set eval.rescore)")
        for name in self.benchmarks:
            bm.get(name)
        for name in self.sources:
            bm.get(name)
            source_spec(self, name)
        return self


SOURCE_KEYS = ("path", "split", "image_root", "limit", "subsample_seed")


def source_spec(cfg: EvalSection, name: str) -> dict:
    """`eval.sources.<name>`, checked: only SOURCE_KEYS, with the right types."""
    spec = cfg.sources.get(name) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"eval.sources.{name} must be a mapping with keys from {', '.join(SOURCE_KEYS)}")
    spec = dict(spec)
    types = {"path": str, "split": str, "image_root": str, "limit": int, "subsample_seed": int}
    for key, value in spec.items():
        if key not in types:
            raise ValueError(f"unknown key eval.sources.{name}.{key}; known: {', '.join(SOURCE_KEYS)}")
        if value is not None and not isinstance(value, types[key]):
            raise ValueError(f"eval.sources.{name}.{key} should be {types[key].__name__}, got {value!r}")
    return spec


# ----------------------------------------------------------------------------- seams


@dataclasses.dataclass(frozen=True)
class Scored:
    """answer: the extracted final answer (None: unparsable). key: what maj@k votes on — the option
    letter, or the normalised answer (None: unparsable). correct: per the reward function."""

    answer: Optional[str]
    key: Optional[str]
    correct: bool


Scorer = Callable[[Sequence[tuple["Record", str]]], list[Scored]]


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of predictions.jsonl: a response and everything needed to score it again."""

    benchmark: str
    id: str
    sample: int
    kind: str
    answers: tuple[str, ...]
    choices: Optional[dict[str, str]]
    prompt: str
    response: str
    num_tokens: int
    finish_reason: str
    forced: bool
    answer: Optional[str] = None
    key: Optional[str] = None
    correct: bool = False

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["answers"] = list(self.answers)
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str, where: str = "") -> "Record":
        try:
            d = json.loads(line)
            d["answers"] = tuple(d["answers"])
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PredictionsError(f"{where}: not a prediction record ({e})") from None

    @property
    def parsed(self) -> bool:
        return self.key is not None


def render_prompt(item: bm.BenchmarkItem, cfg: EvalSection) -> EvalPrompt:
    """The paper's eval template for the item: multiple choice or math by the benchmark, math for
    items without options; the options block is appended unless the question already shows them."""
    from xr_jax.data.templates import get_prompt_template

    bench = bm.get(item.benchmark)
    name = cfg.mc_template if (bench.prompt == "mc" and item.choices) else cfg.math_template
    template = get_prompt_template(name)
    text = template.format(item.question, item.choices if item.show_options else None)
    return EvalPrompt(item.id, text, item.images)


# ----------------------------------------------------------------------------- generation


def generation_budget(cfg: EvalSection, exit_len: int) -> dict:
    """max_think / max_answer / max_new_tokens such that no response exceeds `cfg.max_tokens`."""
    if not cfg.forced_exit:
        return {"max_think": None, "max_answer": cfg.max_answer, "max_new_tokens": cfg.max_tokens}
    max_think = cfg.max_tokens - cfg.max_answer - exit_len
    if max_think < 1:
        raise ValueError(f"eval.max_tokens {cfg.max_tokens} leaves no thinking budget after max_answer "
                         f"{cfg.max_answer} and {exit_len} exit tokens")
    return {"max_think": max_think, "max_answer": cfg.max_answer, "max_new_tokens": cfg.max_tokens}


def generate_records(
    items: Sequence[bm.BenchmarkItem], generator: Generator, cfg: EvalSection, progress: bool = True,
    done: Optional[dict[tuple, Record]] = None, on_batch: Optional[Callable[[list[Record]], None]] = None,
) -> list[Record]:
    """Generate k responses per item in batches (unscored records). A generator that returns a response
    longer than the cap, or an unknown finish reason, is an error: the protocol's cap must hold.

    done: records of an earlier run by (benchmark, id, sample); a batch whose records are all there is
    reused, not generated. on_batch: called with each generated batch's records (to save them at once).
    """
    from xr_jax.sampling.sampler import FINISH_NAMES  # here: reading or rescoring predictions needs no JAX

    budget = generation_budget(cfg, generator.exit_len)
    prompts = [render_prompt(item, cfg) for item in items]
    records: list[Record] = []
    bar = _progress(len(items), f"generate ({items[0].benchmark})" if items else "generate", progress)
    for start in range(0, len(items), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        reused = _reusable(items[start:start + cfg.batch_size], batch, cfg.k, done or {})
        if reused is not None:
            records += reused
            bar.update(len(batch))
            continue
        outs = generator.generate(
            batch, greedy=cfg.protocol == "greedy", temperature=cfg.temperature, num_samples=cfg.k,
            seed=cfg.seed + start, **budget,
        )
        if len(outs) != len(batch) or any(len(o) != cfg.k for o in outs):
            raise RuntimeError(
                f"generator returned {[len(o) for o in outs]} samples for {len(batch)} prompts x {cfg.k}")
        new = []
        for item, prompt, gens in zip(items[start:start + cfg.batch_size], batch, outs):
            for s, g in enumerate(gens):
                if g.num_tokens > cfg.max_tokens:
                    raise RuntimeError(
                        f"{item.id}: response of {g.num_tokens} tokens exceeds eval.max_tokens {cfg.max_tokens}")
                if g.finish_reason not in FINISH_NAMES:
                    raise RuntimeError(f"{item.id}: unknown finish reason {g.finish_reason!r}")
                new.append(Record(
                    item.benchmark, item.id, s, item.kind, item.answers, item.choices, prompt.text,
                    g.text, g.num_tokens, g.finish_reason, g.forced,
                ))
        if on_batch is not None:
            on_batch(new)
        records += new
        bar.update(len(batch))
    bar.close()
    return records


def _reusable(items: Sequence[bm.BenchmarkItem], prompts: Sequence[EvalPrompt], k: int,
              done: dict[tuple, Record]) -> Optional[list[Record]]:
    """The earlier run's records of a whole batch, or None when any is missing. A record whose prompt
    differs from today's (another template or data) is refused, not mixed in."""
    out = []
    for item, prompt in zip(items, prompts):
        for s in range(k):
            r = done.get((item.benchmark, item.id, s))
            if r is None:
                return None
            if r.prompt != prompt.text:
                raise ResumeMismatch(
                    f"{item.id}: the prompt in the saved predictions differs from today's (data or template "
                    "changed); use another eval.output_dir or delete its predictions.jsonl")
            out.append(r)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled)


# ----------------------------------------------------------------------------- scoring


def score_records(records: Sequence[Record], scorer: Scorer) -> list[Record]:
    scored = scorer([(r, r.response) for r in records])
    if len(scored) != len(records):
        raise RuntimeError(f"scorer returned {len(scored)} results for {len(records)} records")
    return [dataclasses.replace(r, answer=s.answer, key=s.key, correct=bool(s.correct))
            for r, s in zip(records, scored)]


class RewardScorer:
    """Scores with the project's reward functions (`multiple_choice`, `math`) in the reward worker pool.

    Extraction (strict: the last closed `<answer>` span, then a `\\boxed{}` inside it) and option matching
    are the rewards' own, so an evaluation scores exactly what RL rewarded. Items with several accepted answers (MMMU open questions)
    are correct when any one matches.
    """

    def __init__(self, num_workers: int = 4, timeout: float = 10.0):
        from xr_jax.rewards import RewardPool

        self.timeout = timeout
        self.pool = RewardPool(num_workers)

    def close(self) -> None:
        self.pool.close()

    def __call__(self, requests: Sequence[tuple[Record, str]]) -> list[Scored]:
        from xr_jax import rewards

        jobs: dict[str, list[tuple[int, str, str]]] = {"multiple_choice": [], "math": []}
        for i, (rec, response) in enumerate(requests):
            if rec.kind == "multiple_choice":
                jobs["multiple_choice"].append((i, response, rewards.mc_ground_truth(rec.answers[0], rec.choices)))
            elif rec.kind == "math":
                jobs["math"] += [(i, response, gold) for gold in rec.answers]
            else:
                raise ValueError(f"{rec.id}: unknown question kind {rec.kind!r}")
        correct = [False] * len(requests)
        for fn, job in jobs.items():
            if job:
                index, responses, golds = zip(*job)
                scores, _ = self.pool.score_batch(fn, responses, golds, timeout=self.timeout)
                for i, s in zip(index, scores):
                    correct[i] = correct[i] or s == 1.0
        out = []
        for (rec, response), ok in zip(requests, correct):
            answer = rewards.extract_answer(response)
            if answer is None:
                key = None
            elif rec.kind == "multiple_choice":
                key = rewards.extract_choice(answer, rec.choices)
            else:
                key = rewards.normalize_answer(answer) or None
            out.append(Scored(answer, key, ok))
        return out


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class BenchmarkMetrics:
    """Percentages are in [0, 100]; counts are of questions (n) and of samples (n_samples)."""

    benchmark: str
    n: int
    k: int
    avg: float
    maj: float
    pass_: float
    unparsable: float
    n_unparsable: int
    endless: float
    forced: float
    mean_tokens: float
    median_tokens: float
    max_tokens: int
    mean_words: float

    @property
    def n_samples(self) -> int:
        return self.n * self.k


def majority_correct(samples: Sequence[Record]) -> bool:
    """maj@k: the answer key given most often wins (first seen on ties); its correctness is that of the
    first sample giving it. No parsed answer at all: wrong."""
    counts = collections.Counter(r.key for r in samples if r.key is not None)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(r for r in samples if r.key is not None and counts[r.key] == best)
    return winner.correct


def compute_metrics(records: Iterable[Record]) -> dict[str, BenchmarkMetrics]:
    """Per-benchmark metrics from scored records (live or read back from predictions.jsonl)."""
    by_bench: dict[str, dict[str, list[Record]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        by_bench[r.benchmark][r.id].append(r)
    out = {}
    for name, questions in by_bench.items():
        ks = {len(v) for v in questions.values()}
        if len(ks) != 1:
            raise ValueError(f"{name}: questions have different sample counts {sorted(ks)}")
        (k,) = ks
        flat = [r for v in questions.values() for r in v]
        tokens = [r.num_tokens for r in flat]
        n, m = len(questions), len(flat)
        pct = lambda count, total: 100.0 * count / total  # noqa: E731
        out[name] = BenchmarkMetrics(
            benchmark=name, n=n, k=k,
            avg=pct(sum(r.correct for r in flat), m),
            maj=pct(sum(majority_correct(v) for v in questions.values()), n),
            pass_=pct(sum(any(r.correct for r in v) for v in questions.values()), n),
            unparsable=pct(sum(not r.parsed for r in flat), m),
            n_unparsable=sum(not r.parsed for r in flat),
            endless=pct(sum(r.finish_reason == "length" for r in flat), m),
            forced=pct(sum(r.forced for r in flat), m),
            mean_tokens=statistics.fmean(tokens), median_tokens=float(statistics.median(tokens)),
            max_tokens=max(tokens), mean_words=statistics.fmean(len(r.response.split()) for r in flat),
        )
    return out


def format_table(metrics: dict[str, BenchmarkMetrics], markdown: bool = True) -> str:
    """The accuracy table (and length / endless statistics as in the paper's forced-exit table)."""
    ks = {m.k for m in metrics.values()}
    k = ks.pop() if len(ks) == 1 else None
    if k == 1:
        acc_cols = ["acc"]
    else:
        tag = f"@{k}" if k else "@k"
        acc_cols = [f"avg{tag}", f"maj{tag}", f"pass{tag}"]
    header = ["benchmark", "n", *acc_cols, "unparsable %", "endless %", "forced %", "mean tokens",
              "max tokens", "mean words"]
    rows = []
    for m in metrics.values():
        accs = [m.avg] if k == 1 else [m.avg, m.maj, m.pass_]
        rows.append([m.benchmark, str(m.n), *(f"{a:.1f}" for a in accs), f"{m.unparsable:.1f}",
                     f"{m.endless:.1f}", f"{m.forced:.1f}", f"{m.mean_tokens:.0f}", str(m.max_tokens),
                     f"{m.mean_words:.0f}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


# ----------------------------------------------------------------------------- outputs


def write_predictions(path: str, records: Sequence[Record]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    os.replace(tmp, path)


def read_predictions(path: str, torn_tail_ok: bool = False) -> list[Record]:
    """The records of a predictions file. torn_tail_ok: drop an unreadable last line (a run killed while
    appending it) instead of failing."""
    with open(path, encoding="utf-8") as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    if torn_tail_ok and lines:
        try:
            Record.from_json(lines[-1][1])
        except PredictionsError:
            lines.pop()
    return [Record.from_json(line, f"{path}:{n}") for n, line in lines]


def generation_settings(cfg: EvalSection, model: Optional[str]) -> dict:
    """What decides the responses: a rerun resumes a predictions file only when these are unchanged (the
    seed and batch size only matter when sampling)."""
    settings = {"model": model, "protocol": cfg.protocol, "k": cfg.k,
                "temperature": cfg.temperature if cfg.k > 1 else 0.0, "max_tokens": cfg.max_tokens,
                "max_answer": cfg.max_answer, "forced_exit": cfg.forced_exit, "mc_template": cfg.mc_template,
                "math_template": cfg.math_template, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}
    if cfg.k > 1:
        settings.update(seed=cfg.seed, batch_size=cfg.batch_size)
    return settings


def check_resumable(out_dir: str, settings: dict) -> bool:
    """Whether `out_dir` holds predictions to resume (False: none); raises `ResumeMismatch` when they were
    generated with other settings. Called at start, before the model is loaded."""
    predictions = os.path.join(out_dir, PREDICTIONS_FILE)
    if not os.path.exists(predictions) or os.path.getsize(predictions) == 0:  # empty: a run that failed at start
        return False
    path = os.path.join(out_dir, SETTINGS_FILE)
    saved = None
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    if saved != settings:
        changed = ("no " + SETTINGS_FILE if saved is None else ", ".join(
            f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(saved) | set(settings))
            if saved.get(k) != settings.get(k)))
        raise ResumeMismatch(f"eval.output_dir {out_dir!r} holds predictions generated with other settings "
                             f"({changed}); use another eval.output_dir or delete its {PREDICTIONS_FILE}")
    return True


class PredictionsLog:
    """predictions.jsonl while generating: each batch's records appended and flushed; on a rerun with the
    same settings, `done` holds the records already there (by benchmark, id, sample)."""

    def __init__(self, out_dir: str, settings: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, PREDICTIONS_FILE)
        self.done: dict[tuple, Record] = {}
        if check_resumable(out_dir, settings):
            kept = read_predictions(self.path, torn_tail_ok=True)
            self.done = {(r.benchmark, r.id, r.sample): r for r in kept}
            write_predictions(self.path, kept)  # without a torn last line, so appends start on a new line
            print(f"eval: resuming from {len(self.done)} predictions in {self.path}", file=sys.stderr)
        with open(os.path.join(out_dir, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=2)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, records: Sequence[Record]) -> None:
        self._file.write("".join(r.to_json() + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_results(out_dir: str, records: Sequence[Record], metrics: dict[str, BenchmarkMetrics],
                  info: Optional[dict] = None, predictions_name: str = PREDICTIONS_FILE) -> None:
    """predictions.jsonl, results.json (metrics + run info) and results.md (the table) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    write_predictions(os.path.join(out_dir, predictions_name), records)
    payload = {"info": info or {}, "metrics": {
        name: {**dataclasses.asdict(m), "pass": m.pass_} for name, m in metrics.items()}}
    for m in payload["metrics"].values():
        m.pop("pass_")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_table(metrics, markdown=True) + "\n")


# ----------------------------------------------------------------------------- entry points


def evaluate(
    cfg: EvalSection, generator: Generator, scorer: Scorer, *,
    items_by_benchmark: Optional[dict[str, list[bm.BenchmarkItem]]] = None, progress: bool = True,
    info: Optional[dict] = None,
) -> dict[str, BenchmarkMetrics]:
    """Run the suite: read each benchmark, generate, score, write outputs; returns the metrics.

    items_by_benchmark: pre-read items (tests); by default each benchmark is read per `cfg.sources`.
    Responses already in `cfg.output_dir`/predictions.jsonl from an interrupted run with the same
    settings are reused (see the module docstring).
    """
    cfg.validate()
    used = getattr(generator, "image_config", None)
    if used is not None and used != cfg.image_config():
        raise ValueError(f"the generator preprocesses images with min/max pixels {used.min_pixels}/{used.max_pixels} "
                         f"but eval.min_pixels/max_pixels are {cfg.min_pixels}/{cfg.max_pixels}: results.json would "
                         "record the wrong resolution")
    settings = generation_settings(cfg, (info or {}).get("model"))
    log = PredictionsLog(cfg.output_dir, settings) if _is_main_process() else None
    records: list[Record] = []
    started = time.time()
    try:
        for name in cfg.benchmarks:
            if items_by_benchmark is not None and name in items_by_benchmark:
                items = items_by_benchmark[name]
            else:
                items = bm.load_benchmark(name, **source_spec(cfg, name))
            records += score_records(generate_records(
                items, generator, cfg, progress, done=log.done if log else None,
                on_batch=log.append if log else None), scorer)
    finally:
        if log is not None:
            log.close()
    metrics = compute_metrics(records)
    info = {**(info or {}), **{k: v for k, v in settings.items() if k != "model"},
            "seconds": round(time.time() - started, 1)}
    if _is_main_process():
        write_results(cfg.output_dir, records, metrics, info)
    return metrics


def rescore(path: str, scorer: Optional[Scorer] = None, out_dir: Optional[str] = None) -> dict[str, BenchmarkMetrics]:
    """Metrics of a saved predictions.jsonl; with a scorer, the responses are scored again first (e.g.
    after a change to answer extraction) and, with out_dir, the re-scored outputs are written there."""
    records = read_predictions(path)
    if not records:
        raise ValueError(f"{path}: no predictions")
    if scorer is not None:
        records = score_records(records, scorer)
    metrics = compute_metrics(records)
    if out_dir is not None:
        write_results(out_dir, records, metrics, {"rescored_from": os.path.abspath(path)})
    return metrics


def main(config: Any) -> dict[str, BenchmarkMetrics]:
    """`xr-jax eval`: `config.eval` (an EvalSection) plus `config.model` / `config.mesh` for the model.

    With `eval.rescore` set, only re-scores that predictions file (no model is loaded).
    """
    cfg: EvalSection = config.eval
    cfg.validate()
    check_writable_dir(cfg.output_dir, "eval.output_dir")  # at start, not after hours of generation
    if cfg.rescore is None:
        model = config.model.path
        check_resumable(cfg.output_dir, generation_settings(cfg, model))
    scorer = RewardScorer(cfg.score_workers, cfg.score_timeout)
    try:
        if cfg.rescore is not None:
            metrics = rescore(cfg.rescore, scorer, cfg.output_dir)
        else:
            print(f"loading {model}", file=sys.stderr)
            generator = ModelGenerator.from_config(config)
            metrics = evaluate(cfg, generator, scorer, info={"model": model})
    finally:
        scorer.close()
    if _is_main_process():
        print(format_table(metrics, markdown=False))
        print(f"\nwrote {os.path.join(cfg.output_dir, 'results.md')} and {PREDICTIONS_FILE}")
    return metrics


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
