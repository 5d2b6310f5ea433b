"""Typed run configuration: a tree of dataclasses, read from YAML plus `key.sub=value` overrides.

The mechanism (`from_dict`, `load`, `to_dict`) is generic over dataclasses: a new stage adds a
section class and a field on `Config` (e.g. `grpo: GRPOSection`), nothing else. Every value is
checked against its annotation when the config is built, so a typo or a wrong type fails at start
with the dotted key named, instead of hours into a run. A setting with a fixed set of values is annotated
`Literal[...]`, one whose values are registered functions `Annotated[str, registry]`: the annotation is the
one place that lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

from xr_jax.data import images as images_lib
from xr_jax.data.synthetic import SyntheticConfig
from xr_jax.eval.runner import EvalSection
from xr_jax.errors import UserError
from xr_jax.models.config import Attention, DType, Remat
from xr_jax.registry import Registry
from xr_jax.train.grpo_loss import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the typed tree; the message names the dotted key."""


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """path: a Hugging Face checkpoint dir or an xr_jax checkpoint (weights are loaded); else `preset` names a
    random-init shape (see `xr_jax.models.presets`); vocab_size overrides the preset's (to fit a tokenizer).
    tokenizer: None uses the checkpoint's own (an xr_jax checkpoint's `assets/`, a HF dir itself); else
    "qwen2.5" (built-in exact Qwen2.5), "tiny" (byte-level demo tokenizer) or a tokenizer directory; a preset
    model needs it. Exports carry the tokenizer used. The other fields are runtime choices (`ModelConfig`
    documents them)."""

    path: Optional[str] = None
    tokenizer: Optional[str] = None
    preset: str = "tiny"
    vocab_size: Optional[int] = None
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"
    attention: Attention = "auto"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """shape: sizes of the ('data', 'fsdp', 'tensor') mesh axes; one -1 fills the remaining devices."""

    shape: tuple[int, ...] = (-1, 1, 1)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """source: "random" (built-in deterministic token batches, for smoke tests and benches), "synthetic" (the
    built-in arithmetic task, `synthetic` sets it up) or a `sources` format name read from `path`. pack:
    first-fit packing of examples into rows (text only). prompt_template: how a question becomes the user turn
    (`templates.PROMPT_TEMPLATES`: the paper's "x_reasoner_train", "plain", ...). system: the system message
    (None: the chat template's default, "You are a helpful assistant."). min_pixels / max_pixels: the
    resolution bounds of image rows (`xr_jax.data.images`; default the checkpoints' preprocessor_config.json,
    3136 / 12845056; the paper's data is text only). overflow (SFT): a sample longer than `train.seq_len` is cut ("truncate", the paper's), skipped ("drop") or continued in the next row ("chunk",
    llama-recipes' concatenate-and-chunk); the counts are logged and in `<logging.dir>/data_summary.json`.
    cache_dir: where the counted first pass of `train.epochs` is cached (None: `<logging.dir>/data_cache`).
    split: a hub id's split; in a local directory, the files whose names carry it (e.g. MedQA's train.jsonl
    beside dev/test), or every file when none does."""

    source: str = "random"
    path: Optional[str] = None
    synthetic: SyntheticConfig = SyntheticConfig()
    prompt_template: str = "x_reasoner_train"
    system: Optional[str] = None
    split: str = "train"
    pack: bool = True
    overflow: Literal["truncate", "drop", "chunk"] = "truncate"
    shuffle: bool = True
    min_pixels: int = images_lib.DEFAULT_MIN_PIXELS
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS
    cache_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW. Defaults are the paper's SFT: lr 1e-5, betas (0.9, 0.999), no weight decay, lr x0.8 per epoch.

    schedule: "step_decay" (x `decay_per_epoch` each epoch), "cosine" or "linear" (to `min_lr_ratio` * lr
    at the last step), or "constant"; all after `warmup_steps` of linear warmup (or `warmup_ratio` of the
    run's steps when warmup_steps is 0: the paper's GRPO warms up over 10%). clip: global-norm
    clipping threshold (0 disables).
    """

    lr: float = 1e-5
    warmup_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["step_decay", "cosine", "linear", "constant"] = "step_decay"
    warmup_steps: int = 0
    decay_per_epoch: float = 0.8
    min_lr_ratio: float = 0.0
    clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """epochs: passes over the data (SFT rows, GRPO prompts); the steps per epoch are counted from the data
    (`xr_jax.train.epochs`) and set the LR decay points and warmup. steps_per_epoch: a fixed count instead (the
    data then repeats without end). steps: the total, overriding epochs x steps per epoch (the run stops there;
    without epochs the data repeats and the schedule has one epoch). batch_size: GLOBAL rows per step,
    split into `microbatches` inside the jitted step. seq_len: tokens per row. freeze_vision: the paper
    trains on text only; the vision tower then gets no gradient and no optimizer state. loss_chunk:
    tokens per chunk of the chunked cross-entropy. nan_patience: stop (with a checkpoint) after this many
    non-finite steps in a row. peak_flops: per-device peak FLOP/s for MFU (None: the datasheet figure of
    the device kind, `train/flops.py`; an estimate on CPU; an unknown accelerator warns and logs MFU as
    n/a). export_dir: write the final params there as an xr_jax model checkpoint (usable as
    the next stage's `model.path`, by `xr-jax sample` and by `xr-jax convert --from`)."""

    steps: Optional[int] = None
    epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    batch_size: int = 8
    microbatches: int = 1
    seq_len: int = 128
    freeze_vision: bool = True
    seed: int = 0
    z_loss: float = 0.0
    loss_chunk: int = 1024
    nan_patience: int = 5
    peak_flops: Optional[float] = None
    export_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """dir None disables checkpoints. every: steps between saves (also at the end and on SIGTERM/SIGINT).
    keep: how many recent checkpoints stay on disk. async_save: write in a background thread.
    allow_config_change: resume although these keys (or sections) differ from the checkpoint's config
    (true: any key); keys in `checkpoints.integrity.SAFE_TO_CHANGE` never need it (docs/checkpoints.md)."""

    dir: Optional[str] = None
    every: int = 100
    keep: int = 3
    async_save: bool = True
    allow_config_change: Union[bool, tuple[str, ...]] = False


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """JSONL metrics go to `dir`/metrics.jsonl always (every `every` steps); TensorBoard and W&B are
    imported only when enabled; progress: a bar with rate and ETA when stderr is a terminal; print_every:
    when stdout is not a terminal (nohup, SLURM), a line on stdout every this many steps (step, loss,
    reward, tokens/s, ETA); 0 = never."""

    dir: str = "runs/sft"
    every: int = 1
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "xr-jax"
    progress: bool = True
    print_every: int = 10


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """initialize: "auto" calls `jax.distributed.initialize()` when a cluster is detected (SLURM, TPU pod,
    or `coordinator` set), "always" calls it unconditionally, "never" runs single-process."""

    initialize: Literal["auto", "always", "never"] = "auto"
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One term of the GRPO reward: `weight` x the reward function registered as `name`."""

    name: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """Stage 2 (GRPO with verifiable rewards). `train.batch_size` is the number of PROMPTS per rollout step
    (paper: 128); each gets `group_size` samples (paper: 8). Defaults are the paper's where it gives them
    and the project's documented choices elsewhere (docs/recipe.md).

    The prompts come from `data.source` / `data.path` (e.g. "orz_math", or "synthetic").
    max_prompt_len / max_new_tokens: prompt budget (longer prompts are dropped and counted) and response
      length (paper: 4096). forced_exit: use the thinking budget `max_think` + `max_answer` in rollouts
      (paper: off in RL); mask_forced: keep forced-exit tokens out of the loss.
    rewards: the reward is the weighted sum of these registered reward functions (`RewardTerm`), e.g.
      [{name: math, weight: 1.0}, {name: format, weight: 0.1}]; the first is the task reward (logged as
      `accuracy`), and each is logged unweighted as `reward_<name>`. `math` / `multiple_choice` extract
      strictly (a closed `<answer>` span, as the X-Reasoner templates ask; no span = 0), `math_lenient` /
      `multiple_choice_lenient` also take a bare `\\boxed{}` (tagless templates); multiple-choice rows pass
      their option texts; `format` scores the `<think>…</think><answer>…</answer>` layout.
    reward_modules: modules imported at start so that the rewards they register (`@xr_jax.rewards.register`)
      can be named in `rewards`, e.g. ["my_lab.rewards"] (importable on every host).
    advantage: a registered advantage estimator (`grpo_loss.ADVANTAGES`): "grpo" ((r - mean) / (std + eps),
      unbiased std), "dr_grpo" (r - mean) or "rloo" (r minus the mean of the group's other rewards).
    clip_low / clip_high / dual_clip / loss_agg / kl_coef / kl_type / entropy_coef: `GRPOLossConfig`
      (loss_agg and kl_type name registered functions); kl_coef 0 loads no reference model at all.
    minibatches: optimizer steps per rollout batch (1 = the paper's literal reading); update_passes: passes
      over the rollout batch; microbatches: gradient accumulation inside each optimizer step.
    old_logprobs: "sampler" (pi_old = the rollout's log-probs) or "recompute" (a forward pass of the rollout
      policy before the updates, as verl does: the first minibatch's ratio is then 1 by construction, and
      sampler/trainer numeric differences do not enter the ratio). The two agree when the sampler's and the
      trainer's log-probs agree (`sampler_logp_gap`).
    gap_every: log `sampler_logp_gap` (mean |sampler - trainer log-prob| over loss tokens; with "sampler" one
      extra forward, with "recompute" free) on the first rollout step and every `gap_every` steps after; 0 = never.
    sampler_dtype: dtype of the weights the rollouts decode with, a copy made once per rollout (None: the
      model's compute dtype, e.g. bf16 weights under bf16 compute: the same samples as the params themselves).
    """

    group_size: int = 8
    temperature: float = 1.0
    max_prompt_len: int = 1024
    max_new_tokens: int = 4096
    forced_exit: bool = False
    max_think: int = 3840
    max_answer: int = 256
    mask_forced: bool = True
    rewards: tuple[RewardTerm, ...] = (RewardTerm("math"),)
    reward_modules: tuple[str, ...] = ()
    reward_timeout: float = 5.0
    reward_workers: Optional[int] = None
    advantage: Annotated[str, ADVANTAGES] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    loss_agg: Annotated[str, AGGREGATIONS] = "token-mean"
    kl_coef: float = 0.01
    kl_type: Annotated[str, KL_ESTIMATORS] = "k3"
    entropy_coef: float = 0.0
    minibatches: int = 1
    update_passes: int = 1
    microbatches: int = 1
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    gap_every: int = 10
    sampler_dtype: Optional[DType] = None

    # Keys of earlier versions: `from_dict` rejects them, naming what replaced them (one way to say it).
    REPLACED: ClassVar[dict[str, str]] = {
        "reward": "grpo.rewards: [{name: <reward>, weight: 1.0}]",
        "format_weight": "grpo.rewards: [{name: <reward>, weight: 1.0}, {name: format, weight: <format_weight>}]",
    }


@dataclasses.dataclass(frozen=True)
class Config:
    """The root of a run's configuration; stages add their own sections here."""

    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    distributed: DistributedSection = DistributedSection()
    grpo: GRPOSection = GRPOSection()
    eval: EvalSection = EvalSection()

    def validate(self, training: bool = True) -> "Config":
        """Cross-field checks that the types alone cannot express; training=False (evaluation, sampling)
        skips those only a training run needs (its length)."""
        positive = {
            "train.batch_size": self.train.batch_size, "train.microbatches": self.train.microbatches,
            "train.seq_len": self.train.seq_len, "train.loss_chunk": self.train.loss_chunk,
            "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep,
            "logging.every": self.logging.every, "train.nan_patience": self.train.nan_patience,
            "grpo.group_size": self.grpo.group_size, "grpo.max_new_tokens": self.grpo.max_new_tokens,
            "grpo.minibatches": self.grpo.minibatches, "grpo.update_passes": self.grpo.update_passes,
            "grpo.microbatches": self.grpo.microbatches, "grpo.max_prompt_len": self.grpo.max_prompt_len,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
        try:
            images_lib.ImageConfig(min_pixels=self.data.min_pixels, max_pixels=self.data.max_pixels)
        except ValueError as e:
            raise ConfigError(f"config keys 'data.min_pixels' / 'data.max_pixels': {e}") from None
        names = [term.name for term in self.grpo.rewards]
        if not names:
            raise ConfigError("config key 'grpo.rewards' is empty; list at least one reward, e.g. [{name: math}]")
        if len(set(names)) < len(names):
            raise ConfigError(f"config key 'grpo.rewards' names a reward twice: {names}")
        for i, term in enumerate(self.grpo.rewards):
            if not math.isfinite(term.weight):
                raise ConfigError(f"config key 'grpo.rewards[{i}].weight' must be a finite number, got {term.weight}")
        if self.logging.print_every < 0:
            raise ConfigError(f"config key 'logging.print_every' must be >= 0 (0 = never), got {self.logging.print_every}")
        if self.grpo.gap_every < 0:
            raise ConfigError(f"config key 'grpo.gap_every' must be >= 0 (0 = never), got {self.grpo.gap_every}")
        if self.train.batch_size % self.train.microbatches:
            raise ConfigError(
                f"train.batch_size {self.train.batch_size} is not divisible by train.microbatches "
                f"{self.train.microbatches}; choose a batch size that is a multiple of the microbatch count"
            )
        for key in ("epochs", "steps", "steps_per_epoch"):
            if getattr(self.train, key) is not None and getattr(self.train, key) < 1:
                raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(self.train, key)}")
        if training and self.train.steps is None and self.train.epochs is None:
            raise ConfigError("set train.epochs (passes over the data) or train.steps")
        return self

    @property
    def total_steps(self) -> Optional[int]:
        """`train.steps`, else epochs x steps_per_epoch; None when the steps per epoch are counted from the data."""
        if self.train.steps is not None:
            return self.train.steps
        if self.train.epochs is None or self.train.steps_per_epoch is None:
            return None
        return self.train.epochs * self.train.steps_per_epoch


# ----------------------------------------------------------------------------- mechanism


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    """Check `value` against annotation `tp` (recursing into dataclasses, Optional, tuples, lists, dicts)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}")
        return value
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _coerce(base, value, key)
        for registry in extras:
            if isinstance(registry, Registry) and value not in registry:
                raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(registry.names())} "
                                  f"(the registered {registry.kind}s)")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}' has value {value!r}; expected {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a list")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' has value {value!r}; expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(
            f"config key '{key}' has value {value!r} ({type(value).__name__}); expected {tp.__name__}")
    return value


# Keys that moved: the error names the new spelling.
RENAMED = {"data.tokenizer": "model.tokenizer"}


def from_dict(cls, data: Optional[dict], prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys, keys in `cls.REPLACED`, missing required keys and
    wrong types raise `ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    replaced = getattr(cls, "REPLACED", {})
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name in replaced:
            raise ConfigError(f"config key '{key}' was replaced; write {replaced[name]}")
        if name not in fields:
            near = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else (
                f" (known keys: {', '.join(fields)})")
            if key in RENAMED:
                hint = f" (it is now '{RENAMED[key]}')"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[name] = _coerce(hints[name], value, key)
    for f in fields.values():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix or '<root>'}' needs '{f.name}'")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (lists for tuples) — what `from_dict` reads back; saved with checkpoints."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


def apply_override(tree: dict, override: str) -> None:
    """`a.b.c=value` into a nested dict; the value is parsed as a YAML scalar/flow value ("[2,2,2]", "null")."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    import yaml  # imported here so the typed tree works where PyYAML is absent (e.g. a bare GPU image)

    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None


def load(path: Optional[str] = None, overrides: Sequence[str] = (), cls=Config, validate: bool = True):
    """YAML file (optional) + overrides -> a `cls` instance, validated unless `validate` is False (the caller
    then calls `validate(...)` itself, e.g. `Config.validate(training=False)`)."""
    tree: dict = {}
    if path is not None:
        import yaml

        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for override in overrides:
        apply_override(tree, override)
    cfg = from_dict(cls, tree)
    return cfg.validate() if validate and hasattr(cfg, "validate") else cfg
