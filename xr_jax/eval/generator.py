"""The runner's generation seam (`EvalPrompt` in, `Generation`s out) and the real `Generator`: chat template
and image preprocessing, then the jitted sampler.

A prompt becomes the Qwen2.5-VL chat (default system message, then the user turn with its images first,
as in the X-Reasoner model card), `<|image_pad|>` runs expanded to each image's patch count, and token
ids. Generation runs on the mesh through `xr_jax.sampling.sampler.Sampler` with forced exit (`</think>` written
at the thinking budget); one sampler (and one compiled program per shape bucket) is kept per sampling
configuration, so a suite of benchmarks compiles once per prompt-length bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One question as the model sees it: the user-turn text (template applied) and its images."""

    id: str
    text: str
    images: tuple = ()


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled response. num_tokens counts every output token (forced ones included)."""

    text: str
    num_tokens: int
    finish_reason: str
    forced: bool


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[EvalPrompt], *, greedy: bool, temperature: float, num_samples: int,
        max_think: Optional[int], max_answer: int, max_new_tokens: int, seed: int,
    ) -> list[list[Generation]]:
        """`num_samples` generations per prompt. max_think None: no forced exit, `max_new_tokens` cap."""
        ...

    @property
    def exit_len(self) -> int:
        """Tokens written at forced exit (3 for `</think>` in Qwen2.5)."""
        ...


class ModelGenerator:
    """`Generator` over a Qwen2.5-VL model: `params` placed on `mesh` (or host arrays without one)."""

    def __init__(self, model_cfg, params, tokenizer, *, mesh=None, image_config=None, system: Optional[str] = None):
        from xr_jax.data.images import ImageConfig
        from xr_jax.sampling.sampler import ForcedExit

        self.model_cfg, self.params, self.tokenizer, self.mesh = model_cfg, params, tokenizer, mesh
        self.image_config = image_config or ImageConfig()
        self.system = system
        self.forced_exit = ForcedExit.from_tokenizer(tokenizer, model_cfg.text.vocab_size)
        self._samplers: dict[Any, Any] = {}

    @property
    def exit_len(self) -> int:
        return len(self.forced_exit.ids)

    def encode(self, prompt: EvalPrompt):
        from xr_jax.sampling.chat import encode_chat
        from xr_jax.data import templates

        messages = templates.build_messages(prompt.text, n_images=len(prompt.images), system=self.system)
        return encode_chat(self.tokenizer, messages, prompt.images, self.image_config, prompt.id)

    def _sampler(self, scfg):
        from xr_jax.sampling.sampler import Sampler

        if scfg not in self._samplers:
            forced = self.forced_exit if scfg.max_think is not None else None
            self._samplers[scfg] = Sampler(self.model_cfg, scfg, forced, mesh=self.mesh)
        return self._samplers[scfg]

    def generate(
        self, prompts: Sequence[EvalPrompt], *, greedy: bool, temperature: float, num_samples: int,
        max_think: Optional[int], max_answer: int, max_new_tokens: int, seed: int,
    ) -> list[list[Generation]]:
        from xr_jax.sampling.sampler import SamplingConfig

        special = self.tokenizer.special
        scfg = SamplingConfig(
            temperature=0.0 if greedy else temperature, max_new_tokens=max_new_tokens, max_think=max_think,
            max_answer=max_answer, stop_ids=tuple(special.stop_ids), pad_id=special.pad,
        )
        encoded = [self.encode(p) for p in prompts]
        # Rows are sharded over the mesh's batch axes: pad with copies of the last prompt, drop their outputs.
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        while len(encoded) * num_samples % shards:
            encoded.append(encoded[-1])
        out = self._sampler(scfg).generate(self.params, encoded, rng=seed, group_size=num_samples)
        names = out.finish_names()
        gens = [
            Generation(self.tokenizer.decode(out.row_ids(r), skip_special_tokens=True), int(out.lengths[r]),
                       names[r], bool(np.asarray(out.forced[r]).any()))
            for r in range(len(prompts) * num_samples)
        ]
        return [gens[p * num_samples:(p + 1) * num_samples] for p in range(len(prompts))]

    @classmethod
    def from_config(cls, config) -> "ModelGenerator":
        """The model of `config.model.path` (a HF directory or an xr_jax checkpoint) on `config.mesh`'s mesh.

        The tokenizer is `model.tokenizer`, else the checkpoint's own (its `assets/` folder for an xr_jax
        checkpoint).
        """
        from xr_jax import parallel
        from xr_jax.checkpoints import convert

        m = config.model
        if not getattr(m, "path", None):
            raise ValueError("set model.path to the checkpoint directory to evaluate")
        # the tokenizer first: a missing one fails before the weights load
        tokenizer = convert.load_tokenizer_for(m.path, getattr(m, "tokenizer", None), "model.tokenizer")
        mesh = parallel.make_mesh(tuple(config.mesh.shape))
        runtime = {k: getattr(m, k) for k in ("scan_layers", "remat", "attention") if hasattr(m, k)}
        model_cfg, params = convert.load_any(m.path, mesh, cast=getattr(m, "param_dtype", None), **runtime)
        if hasattr(m, "dtype"):
            model_cfg = model_cfg.replace(dtype=m.dtype)
        return cls(model_cfg, params, tokenizer, mesh=mesh, image_config=config.eval.image_config())
