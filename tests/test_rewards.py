"""Rewards on real answers (GSM8K, MATH500, GPQA-diamond rows in tests/fixtures), and the worker pool under
hostile input: hangs, crashes, exceptions, huge and deeply nested strings.

The reward functions registered below run in the pool's worker processes, which import this module to
find them (they are sent by reference).
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from xr_jax import rewards
from xr_jax.rewards import RewardPool, extract_answer, extract_choice, mc_ground_truth

FIXTURES = Path(__file__).parent / "fixtures"
TIMEOUT = 2.0  # per item, for the adversarial and hanging cases


@rewards.register("test_unruly")
def unruly_reward(response: str, ground_truth: str) -> float:
    """Hangs, crashes, raises or returns NaN on command; otherwise exact match."""
    if response == "hang":
        time.sleep(3600)
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("reward bug")
    if response == "nan":
        return float("nan")
    if response.startswith("slow"):
        time.sleep(0.5)
    if response == "alloc":
        return float(len(bytearray(16 * 2**30)))  # past the pool's memory limit: MemoryError
    return float(response == ground_truth)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2) as p:
        yield p


def gsm8k_rows():
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_test_rows.jsonl").read_text().splitlines()]
    return [(r["question"], r["answer"].split("####")[-1].strip()) for r in rows]


def math500_rows():
    rows = json.loads((FIXTURES / "math500_rows.json").read_text())
    return [(r["prompt"][0]["value"], r["final_answer"]) for r in rows]


def gpqa_rows():
    return json.loads((FIXTURES / "gpqa_diamond_rows.json").read_text())


def wrap(answer: str, style: int) -> str:
    """A model-like response carrying `answer`, in one of four formats."""
    think = "<think>Let me work through this carefully. First, 2 + 2 = 4, then 3 * 7 = 21.</think>"
    return [
        f"{think} <answer>{answer}</answer>",  # answer tags
        f"{think} <answer>The final answer is $\\boxed{{{answer}}}$.</answer>",  # both
        f"{think} So the answer is $\\boxed{{{answer}}}$.",  # boxed only
        f"{think}\n<answer> ${answer}$ </answer>",  # tags, math mode, spaces
    ][style]


# Equivalent forms of real ground truths, and near misses that must score 0.
MATH_EQUIVALENT = {
    "\\left( 3, \\frac{\\pi}{2} \\right)": ["(3,\\pi/2)", "\\left(3,\\frac{\\pi}{2}\\right)"],
    "p - q": ["-q + p"],
    "\\frac{14}{3}": ["14/3", "\\dfrac{14}{3}"],
    "\\text{Evelyn}": ["Evelyn"],
    "90^\\circ": ["90", "90^{\\circ}"],
    "3\\sqrt{13}": ["\\sqrt{117}"],
    "\\frac{3}{56}": ["3/56"],
    "6 - 5i": ["6-5i"],
    "x=5": ["5"],
    "1,-2": ["-2, 1"],
    "52_8": ["52_{8}"],
    "11\\sqrt2": ["11\\sqrt{2}"],
    "\\frac{243}{625}": ["0.3888"],
    "3, 5, 7": ["7, 5, 3"],
    "2000": ["2,000", "2000.0"],
}
MATH_WRONG = {
    "\\left( 3, \\frac{\\pi}{2} \\right)": "(3, \\pi)",
    "p - q": "q - p",
    "\\frac{14}{3}": "\\frac{3}{14}",
    "\\text{Evelyn}": "\\text{Angela}",
    "90^\\circ": "45^\\circ",
    "3\\sqrt{13}": "13\\sqrt{3}",
    "\\frac{3}{56}": "\\frac{3}{65}",
    "\\sqrt{51}": "\\sqrt{15}",
    "6 - 5i": "6 + 5i",
    "\\pi": "2\\pi",
    "6+9i": "9+6i",
    "x=5": "x=6",
    "1,-2": "1,2",
    "-2 + 7i": "2 - 7i",
    "52_8": "53_8",
    "11\\sqrt2": "2\\sqrt{11}",
    "\\frac{243}{625}": "\\frac{625}{243}",
    "3, 5, 7": "3, 5",
}


def wrong_answer(truth: str) -> str:
    if truth in MATH_WRONG:
        return MATH_WRONG[truth]
    return str(int(truth.replace(",", "")) + 1)  # every other fixture answer is an integer


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"  # the last span
    assert extract_answer("<answer>so \\boxed{1} no \\boxed{\\frac{1}{2}}</answer>") == "\\frac{1}{2}"
    assert extract_answer("<answer>\\boxed{\\{1, 2\\}}</answer>") == "\\{1, 2\\}"  # escaped braces do not nest
    assert extract_answer("<answer>\\boxed{a}</answer> later \\boxed{b}") == "a"  # the span wins
    assert extract_answer("the answer is 42") is None  # no last-number fallback
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("<answer>42") is None  # truncated
    assert extract_answer("\\boxed{5}") is None  # strict: no span, no answer
    for mode in ("strict", "lenient"):
        assert extract_answer("\\boxed{\\frac{1}{2}", mode) is None  # unbalanced
        assert extract_answer("\\boxed 5", mode) is None
    assert extract_answer("\\boxed{\\{1, 2\\}}", "lenient") == "\\{1, 2\\}"
    assert extract_answer("<answer>a</answer> later \\boxed{b}", "lenient") == "a"  # the span still wins
    with pytest.raises(ValueError, match="extraction mode"):
        extract_answer("x", "loose")


# The extraction table (issue 18): (response template, math reward, math_lenient reward). `{t}` is a real
# ground truth (GSM8K / MATH500 rows), `{w}` a wrong answer to it.
EXTRACTION_TABLE = [
    ("<think>so the answer is \\boxed{{{t}}}", 0.0, 1.0),  # unclosed thinking (truncated) with a box
    ("<think>so \\boxed{{{t}}}</think> and no answer tags", 0.0, 1.0),  # closed thinking, no span
    ("<think>so \\boxed{{{t}}}</think><answer>{t}", 0.0, 1.0),  # unclosed answer span: the box is outside it
    ("<think>a</think> <answer>{t}</answer>", 1.0, 1.0),  # answer span
    ("<think>a</think> <answer>so $\\boxed{{{t}}}$.</answer>", 1.0, 1.0),  # \\boxed inside the span
    ("<think>\\boxed{{{t}}}</think> <answer>{w}</answer>", 0.0, 0.0),  # a box outside does not count
    ("<think>\\boxed{{{w}}}</think> <answer>{t}</answer>", 1.0, 1.0),
    ("<think>a</think> <answer>{w}</answer> \\boxed{{{t}}}", 0.0, 0.0),  # the span wins over a later box
    ("<think>a</think> <answer>{t}</answer><answer>{w}</answer>", 0.0, 0.0),  # the last span counts
]


def test_extraction_table_on_real_answers(pool):
    truths = [t for _, t in gsm8k_rows()[:10] + math500_rows()[:10]]
    responses, golds, want = [], [], {"math": [], "math_lenient": []}
    for template, strict, lenient in EXTRACTION_TABLE:
        for t in truths:
            responses.append(template.format(t=t, w=wrong_answer(t)))
            golds.append(t)
            want["math"].append(strict)
            want["math_lenient"].append(lenient)
    for name, expected in want.items():
        scores, _ = pool.score_batch(name, responses, golds, timeout=10.0)
        wrong = [(r, g, s) for r, g, s, w in zip(responses, golds, scores, expected) if s != w]
        assert not wrong, f"{name}: {len(wrong)}/{len(expected)} mis-scored, e.g. {wrong[:3]}"


def test_multiple_choice_table_on_gpqa(pool):
    """RL's multiple-choice ground truth carries the option texts (`reward_ground_truth`), so the option
    text and `B No` score as in evaluation; strict extraction as for math."""
    responses, truths, want = [], [], []
    for row in gpqa_rows():
        letter, choices = row["final_answer"], row["choices"]
        other = next(c for c in "ABCD" if c != letter)
        text = choices[letter]
        gold = rewards.reward_ground_truth("multiple_choice", letter, choices)
        assert gold == mc_ground_truth(letter, choices)
        for answer, ok in [(text, 1.0), (f"{letter} {text}", 1.0), (letter, 1.0), (f"{other} {text}", 0.0),
                           (choices[other], 0.0), (f"{letter} or {other}", 0.0)]:
            responses.append(f"<think>...</think> <answer>{answer}</answer>")
            truths.append(gold)
            want.append(ok)
        responses += [f"<think>the answer is \\boxed{{{letter}}}", f"<think>...</think> <answer>{text}"]
        truths += [gold, gold]
        want += [0.0, 0.0]  # no closed span: 0, even with the right letter boxed
    scores, _ = pool.score_batch("multiple_choice", responses, truths)
    wrong = [(r, t, s) for r, t, s, w in zip(responses, truths, scores, want) if s != w]
    assert not wrong, f"{len(wrong)}/{len(want)} mis-scored, e.g. {wrong[:5]}"
    assert rewards.get("multiple_choice_lenient")("<think>so \\boxed{B}", "B") == 1.0
    assert rewards.reward_ground_truth("math", "B", {"A": "x", "B": "y"}) == "B"  # math gets the plain answer
    assert rewards.reward_ground_truth("multiple_choice", "B", None) == "B"


def test_math_on_real_answers(pool):
    rows = gsm8k_rows() + math500_rows()
    assert len(rows) == 80 and sum("," in t for _, t in gsm8k_rows()) == 10
    responses, truths, want = [], [], []
    for i, (_, truth) in enumerate(rows):
        for style in range(4):
            responses.append(wrap(truth, style))
            truths.append(truth)
            want.append(0.0 if style == 2 else 1.0)  # style 2 (a box, no tags) scores only with math_lenient
        for form in MATH_EQUIVALENT.get(truth, []):
            responses.append(wrap(form, (0, 1, 3)[i % 3]))
            truths.append(truth)
            want.append(1.0)
        responses += [
            wrap(wrong_answer(truth), i % 4),
            f"The answer is {truth}.",  # neither tags nor box
            f"<answer>{truth}</answer><answer>oops</answer>",  # the last span counts
        ]
        truths += [truth] * 3
        want += [0.0, 0.0, 0.0]
    # GSM8K-style variants: thousands separators dropped or added, dollar signs, units, decimals.
    for _, truth in gsm8k_rows():
        plain = truth.replace(",", "")
        for form in [plain, f"\\${plain}", f"{plain} dollars", f"{plain}.00", f"{int(plain):,}"]:
            responses.append(wrap(form, 0))
            truths.append(truth)
            want.append(1.0)
    scores, stats = pool.score_batch("math", responses, truths, timeout=10.0)
    wrong = [(r, t, s) for r, t, s, w in zip(responses, truths, scores, want) if s != w]
    assert not wrong, f"{len(wrong)}/{len(want)} mis-scored, e.g. {wrong[:5]}"
    assert stats.ok == stats.n == len(want)


def test_multiple_choice_on_gpqa(pool):
    responses, truths, want = [], [], []
    for row in gpqa_rows():
        letter, choices = row["final_answer"], row["choices"]
        other = next(c for c in "ABCD" if c != letter)
        with_choices = mc_ground_truth(letter, choices)
        text = choices[letter]
        for answer in [letter, f"({letter})", f"{letter}: {text}", f"{letter}. {text}", text]:
            responses.append(f"<think>...</think> <answer>{answer}</answer>")
            truths.append(with_choices)
            want.append(1.0)
        for answer in [other, f"{other}: {choices[other]}", choices[other], f"The answer is {letter}"]:
            responses.append(f"<think>...</think> <answer>{answer}</answer>")
            truths.append(with_choices)
            want.append(0.0)
        # A bare-letter ground truth: letters still count, option text cannot be resolved.
        responses += [
            f"<answer>{letter}</answer>",
            f"<answer>\\boxed{{{letter}}}</answer>",
            f"<answer>{other}</answer>",
            f"I pick {letter}",
            f"<answer>{text}</answer>",
        ]
        truths += [letter] * 5
        want += [1.0, 1.0, 0.0, 0.0, 0.0]
    scores, stats = pool.score_batch("multiple_choice", responses, truths)
    wrong = [(r, t, s) for r, t, s, w in zip(responses, truths, scores, want) if s != w]
    assert not wrong, f"{len(wrong)}/{len(want)} mis-scored, e.g. {wrong[:5]}"
    assert stats.ok == len(want)


def test_extract_choice_rules():
    choices = {"A": "d", "B": "a", "C": "b", "D": "c"}  # GPQA's first row: option texts are letters
    assert extract_choice("D", choices) == "D"
    assert extract_choice("c", choices) == "D"  # option text, not the letter c
    assert extract_choice("**B**") == "B"
    assert extract_choice("\\text{(C)}") == "C"
    assert extract_choice("b") == "B"  # no choices: a lone lowercase letter
    assert extract_choice("A cat", {"A": "dog", "B": "A cat"}) == "B"
    assert extract_choice("The answer is B") is None
    assert extract_choice("B or C") is None
    yes_no = {"A": "Yes", "B": "No"}  # the paper's template example
    assert extract_choice("B No", yes_no) == "B" and extract_choice("B: No", yes_no) == "B"
    assert extract_choice("B  no.", yes_no) == "B"  # normalised, case-insensitive
    assert extract_choice("A No", yes_no) is None and extract_choice("B No") is None  # text must be the letter's
    assert extract_choice("B or C", {"B": "x", "C": "y"}) is None


@pytest.mark.parametrize(
    "response, want",
    [
        ("<think>a</think><answer>1</answer>", 1.0),
        ("\n<think>\nlong\n</think>\n\n<answer> 1 </answer>\n", 1.0),
        ("<answer>1</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think>text<answer>1</answer>", 0.0),
        ("<answer>1</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think><think>a</think><answer>1</answer>", 0.0),
        ("<think>a</think><answer>1</answer> trailing", 0.0),
    ],
)
def test_format_reward(response, want):
    assert rewards.get("format")(response, "") == want


def test_registry():
    assert {"math", "math_lenient", "multiple_choice", "multiple_choice_lenient", "format", "test_unruly"} <= set(
        rewards.names())
    assert rewards.get("math") is rewards.math_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("math")(lambda r, g: 0.0)
    with pytest.raises(ValueError, match="letter"):
        mc_ground_truth("Z")


def test_adversarial_inputs_score_zero_within_timeout(pool, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        "9^9^9^9^9",
        "9^{9^{9^{9^9}}}",  # sympy hangs evaluating this: the worker is killed at the timeout
        "10^{10^{10}}",  # likewise
        "{" * 10**6 + "1" + "}" * 10**6,
        "\\boxed{" + "{" * 10**6 + "1" + "}" * 10**6 + "}",
        "1+" * 500_000 + "1",
        f"__import__('os').system('touch {marker}')",
        "\\frac{" * 2000 + "1" + "}{2}" * 2000,
    ]
    responses = [f"<answer>{h}</answer>" for h in hostile] + ["x" * 2**20]
    responses += ["<answer>18</answer>"] * 6  # ordinary items in the same batch still score
    truths = ["18"] * len(responses)
    start = time.monotonic()
    scores, stats = pool.score_batch("math", responses, truths, timeout=TIMEOUT)
    wall = time.monotonic() - start
    assert scores == [0.0] * (len(hostile) + 1) + [1.0] * 6
    assert max(stats.item_s) <= TIMEOUT + 1.0, stats.item_s
    assert stats.timeouts >= 2 and stats.ok + stats.errors + stats.timeouts == stats.n
    assert wall < 3 * TIMEOUT + 5
    assert not marker.exists()
    per_item = [round(s, 2) for s in stats.item_s]
    print(f"adversarial: {stats.timeouts} timeouts, per-item s {per_item}, wall {wall:.2f} s")


def test_hang_crash_and_errors_cost_only_their_item(pool):
    responses = ["a", "hang", "b", "crash", "c", "raise", "d", "nan", "alloc"] + [str(i) for i in range(40)]
    truths = ["a", "x", "b", "x", "c", "x", "d", "x", "x"] + [str(i) for i in range(40)]
    start = time.monotonic()
    scores, stats = pool.score_batch("test_unruly", responses, truths, timeout=TIMEOUT)
    wall = time.monotonic() - start
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0] + [1.0] * 40
    assert stats.status[:9] == ("ok", "timeout", "ok", "crash", "ok", "error", "ok", "error", "error")
    assert (stats.timeouts, stats.crashes, stats.errors, stats.ok) == (1, 1, 3, 44)
    assert stats.workers_replaced == 2
    assert wall < TIMEOUT + 3  # the hang cost its own timeout, not one per remaining item
    # The pool is healthy afterwards.
    assert pool.score_batch("test_unruly", ["a"], ["a"])[0] == [1.0]


def test_interrupted_batch_leaves_no_stale_answers(pool):
    class Interrupt(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupt

    pool.score_batch("test_unruly", ["a", "b"], ["a", "b"])  # workers up, so both hold an item at the alarm
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupt):
            pool.score_batch("test_unruly", [f"slow{i}" for i in range(6)], [f"slow{i}" for i in range(6)])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    scores, stats = pool.score_batch("test_unruly", ["a", "b", "c", "d"], ["a", "x", "c", "x"])
    assert scores == [1.0, 0.0, 1.0, 0.0] and stats.ok == 4


def test_workers_are_recycled():
    with RewardPool(num_workers=1, max_items_per_worker=5, max_chunk=5) as p:
        scores, stats = p.score_batch("test_unruly", [str(i) for i in range(23)], [str(i) for i in range(23)])
        assert scores == [1.0] * 23 and stats.ok == 23
        assert p.workers_started == 5  # 23 items, at most 5 per worker


def test_pool_overhead_and_bad_arguments(pool):
    n = 2000
    responses = [f"<think>t</think><answer>{i}</answer>" for i in range(n)]
    pool.score_batch("format", responses[:10], [""] * 10)
    start = time.monotonic()
    scores, _ = pool.score_batch("format", responses, [""] * n)
    per_item_ms = (time.monotonic() - start) / n * 1e3
    assert scores == [1.0] * n
    assert per_item_ms < 2.0, per_item_ms
    print(f"pool overhead: {per_item_ms:.3f} ms per item ({pool.num_workers} workers)")

    scores, stats = pool.score_batch("math", [], [])
    assert scores == [] and stats.n == 0
    with pytest.raises(ValueError, match="2 responses but 1 ground_truths"):
        pool.score_batch("math", ["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be str"):
        pool.score_batch("math", ["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="timeout"):
        pool.score_batch("math", ["a"], ["a"], timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
