"""Test doubles for the evaluation seams: a generator that replays injected responses, a minimal scorer."""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

from xr_jax.eval.generator import EvalPrompt, Generation
from xr_jax.eval.runner import Scored


class ScriptedGenerator:
    """Replays `script[prompt_id]` (a list of Generations, one per sample), or calls `respond(prompt, budget)`.
    Records every call's keyword arguments so tests can check the protocol's budgets."""

    exit_len = 3

    def __init__(self, script: Optional[dict] = None, respond: Optional[Callable] = None):
        self.script = script or {}
        self.respond = respond
        self.calls: list[dict] = []
        self.prompts: list[EvalPrompt] = []

    def generate(self, prompts: Sequence[EvalPrompt], **kw) -> list[list[Generation]]:
        self.calls.append(kw)
        self.prompts += prompts
        out = []
        for p in prompts:
            if p.id in self.script:
                gens = self.script[p.id]
            else:
                gens = [self.respond(p, kw) for _ in range(kw["num_samples"])]
            assert len(gens) == kw["num_samples"], p.id
            out.append(list(gens))
        return out


def endless_thinker(prompt: EvalPrompt, budget: dict) -> Generation:
    """A model that never closes </think> by itself: it thinks until cut (forced exit) and then answers
    within the answer allowance, or, without forced exit, runs to the cap."""
    if budget["max_think"] is None:
        n = budget["max_new_tokens"]
        return Generation("<think>" + "hmm " * (n - 1), n, "length", False)
    n = budget["max_think"] + 3 + 5
    return Generation("<think>" + "hmm " * budget["max_think"] + "</think><answer>A</answer>", n, "forced_exit", True)


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def tag_scorer(requests) -> list[Scored]:
    """The last <answer> span as the answer (and vote key); correct when it equals a gold answer."""
    out = []
    for record, response in requests:
        spans = _ANSWER.findall(response)
        answer = spans[-1].strip() if spans else None
        out.append(Scored(answer, answer or None, answer is not None and answer in record.answers))
    return out


def gen(answer: Optional[str], tokens: int = 10, finish: str = "eos", forced: bool = False) -> Generation:
    text = "<think>x</think>" + (f"<answer>{answer}</answer>" if answer is not None else " no answer")
    return Generation(text, tokens, finish, forced)
