"""Answer extraction and string normalisation: plain string work, safe and linear-time on any input.

Extraction rule (shared by rewards and evaluation), by mode:
- "strict" (the default; the X-Reasoner templates ask for `<answer> </answer>` tags):
  the last `<answer>…</answer>` span; inside it, the content of the last `\\boxed{…}` if there is one.
  No closed span gives no answer, so unfinished thinking (a truncated response, or an unclosed
  `<answer>5`) scores 0 even when it contains a `\\boxed{…}`: RL then rewards finishing the answer.
- "lenient" (for templates without tags, e.g. a `\\boxed{}` prompt such as ORZ's): as strict, then,
  without a span, the last `\\boxed{…}` of the whole response.
Otherwise there is no answer (None). There is deliberately no "last number in the text" fallback: it
invites reward hacking.
"""

from __future__ import annotations

import re

_OPEN, _CLOSE = "<answer>", "</answer>"
_BOXED = "\\boxed"
# A backslash escape (\{ \} \\ ...) or a brace: escaped braces do not count for nesting.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
EXTRACTION_MODES = ("strict", "lenient")


def extract_answer(response: str, mode: str = "strict") -> str | None:
    """The final answer of a response by `mode` (see the module doc), stripped; None if there is none."""
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"extraction mode must be one of {EXTRACTION_MODES}, got {mode!r}")
    end = response.rfind(_CLOSE)
    if end != -1:
        start = response.rfind(_OPEN, 0, end)
        if start != -1:
            span = response[start + len(_OPEN) : end]
            boxed = last_boxed(span)
            return _none_if_empty(span if boxed is None else boxed)
    if mode == "strict":
        return None
    boxed = last_boxed(response)
    return None if boxed is None else _none_if_empty(boxed)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` in `text`, braces matched (not a `[^}]+` regex); None if the
    last `\\boxed` has no balanced `{…}` (e.g. a truncated response)."""
    i = text.rfind(_BOXED)
    if i == -1:
        return None
    j = i + len(_BOXED)
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for token in _BRACE_TOKEN.finditer(text, j):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : token.start()]
    return None


def _none_if_empty(s: str) -> str | None:
    s = s.strip()
    return s or None


# --- normalisation ---------------------------------------------------------------------------------

_REMOVE = [
    re.compile(r"\\left(?![a-zA-Z])"),  # \left( -> (   but keep \leftarrow
    re.compile(r"\\right(?![a-zA-Z])"),  # \right) -> )  but keep \rightarrow
    re.compile(r"\\(?:displaystyle|quad|qquad)(?![a-zA-Z])"),
    re.compile(r"\\[!,;: ]"),  # LaTeX spacing
    re.compile(r"\^\{?\\circ\}?"),  # degrees: 90^\circ -> 90
    re.compile(r"\\?%"),  # percent sign (math-verify still sees the raw string: 15\% == 0.15)
]
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(answer: str) -> str:
    """Canonical string form of a short answer, for exact comparison.

    Removes `$`, `\\left`/`\\right`, LaTeX spacing, `\\text{…}`-style wrappers, degree and percent signs,
    and a trailing period; unifies `\\dfrac`/`\\tfrac` to `\\frac`; drops thousands separators from a plain
    number (`1,000` -> `1000`, but a list such as `1,-2` is kept). Whitespace is collapsed to one space.
    """
    s = answer.strip().replace("\\$", "").replace("$", "")
    for pattern in _REMOVE:
        s = pattern.sub("", s)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = " ".join(s.split()).rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s
