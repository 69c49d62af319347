"""Hostile reward inputs for the fuzz test (issue 10): generated completions and ground truths.

Kinds: ordinary answers (right and wrong), deeply nested or unbalanced braces, towers of exponents, unicode,
control characters, malformed LaTeX, think tags in odd places, None, empty strings, message lists, a few
1 MB strings. Most cases are cheap (no answer, or decided by the string pre-check) so that thousands run in
seconds; `HANGS` are inputs on which math-verify runs for seconds to minutes, mixed in at a known rate.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import rewards

# math-verify runs for many seconds on each of these (measured: killed after 10 to 20 s, still running).
HANGS = ["10^{10^{10}}", "9^{9^{9}}", "10!!!!", "2^{2^{2^{2^{2^{2}}}}}", "\\sqrt{2}^{10^{10}}"]
MALFORMED = ["\\frac", "{", "}", "\\sqrt", "^", "_", "\\left(", "\\right", "\\begin{pmatrix}", "&", "\\\\", "$",
             "\\boxed{", "\\text{", "\\", "%", "#", "\\end{", "\\over", "!", "'", "\\infty", "=", "\\pm"]
UNICODE_RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x590, 0x6FF), (0x2200, 0x22FF), (0x300, 0x36F),
                  (0x4E00, 0x4E80), (0xFF10, 0xFF19), (0x1F600, 0x1F64F), (0x2028, 0x2029), (0xD7FF, 0xD7FF)]
CONTROL = [chr(c) for c in range(32)] + ["\x7f", "\u200b", "\ufeff", "\u202e", "\ud800"]  # a lone surrogate too


@dataclass
class Case:
    completion: Any  # a string, a message list or None
    ground_truth: Any  # a string, a number or None
    completion_ids: list[int]
    hangs: bool = False  # math-verify will be given one of HANGS (a timeout is expected)


def _unicode(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(*rng.choice(UNICODE_RANGES))) for _ in range(n))


def _answer(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return rng.choice([str(rng.randint(-50, 50)), f"\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(1, 9)}}}",
                           f"{rng.randint(0, 9)}.{rng.randint(0, 99)}", f"\\sqrt{{{rng.randint(2, 20)}}}"])
    if kind < 0.5:  # math-verify spends ~0.1 s per level of bare braces: few of these, or the run is slow
        depth = rng.choice([5, 16, 17, 50, 500, 3000])  # past rewards.answers.MAX_NESTING: no answer
        return "{" * depth + "1" + "}" * rng.choice([depth, depth - 1, 0])
    if kind < 0.6:  # towers small enough to stay fast: the slow ones are HANGS, added at a known rate
        return f"{rng.randint(2, 4)}^{{{rng.randint(2, 3)}^{{{rng.randint(1, 2)}}}}}"
    if kind < 0.72:
        return _unicode(rng, rng.randint(1, 30))
    if kind < 0.84:
        return "".join(rng.choice(CONTROL + ["1", "x"]) for _ in range(rng.randint(1, 20)))
    return "".join(rng.choice(MALFORMED) for _ in range(rng.randint(1, 15)))


def _completion(rng: random.Random, answer: str) -> Any:
    junk = _unicode(rng, rng.randint(0, 40))
    forms = [
        f"Answer: {answer}", f"so \\boxed{{{answer}}}", f"<think>{junk}</think>\nAnswer: {answer}",
        f"<think>{junk} \\boxed{{{answer}}}", f"{junk}</think>{answer}", f"Answer: {answer}\nAnswer: {junk}",
        junk, "", None, f"<think><think>{answer}</think></think>\\boxed{{{answer}}}", answer,
    ]
    completion = rng.choice(forms)
    if rng.random() < 0.1:
        return [{"role": "assistant", "content": completion}]
    return completion


def _ground_truth(rng: random.Random, answer: str) -> Any:
    kind = rng.random()
    if kind < 0.5:
        return answer  # often the right answer: exercises the pre-check and math-verify's "equal" paths
    if kind < 0.75:
        return _answer(rng)
    return rng.choice([None, "", rng.randint(-5, 5), 2.5, "   ", f"\\boxed{{{answer}}}", f"#### {answer}"])


def fuzz_cases(n: int, seed: int, hang_every: int = 500, megabyte_every: int = 2500) -> list[Case]:
    """n cases; every `hang_every`-th asks math-verify about one of HANGS, every `megabyte_every`-th is 1 MB."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        answer = _answer(rng)
        case = Case(_completion(rng, answer), _ground_truth(rng, answer), [0] * rng.choice([0, 5, 90, 100, 5000]))
        if i % hang_every == hang_every - 1:
            case = Case(f"</think>Answer: {HANGS[(i // hang_every) % len(HANGS)]}", "7", [0], hangs=True)
        elif i % megabyte_every == megabyte_every // 2:
            case.completion = rng.choice(["x", "{", "\\boxed{", "</think>", "\x00"]) * 1_000_000 + f"Answer: {answer}"
        cases.append(case)
    return cases


COLUMNS = ["solution", "ground_truth", "answer", "reward_model"]


@dataclass
class Report:
    """What a fuzz run saw: reward calls made, the slowest call per function, and every problem found."""

    calls: int = 0
    cases: int = 0
    hangs: int = 0
    slowest: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.calls, self.cases, self.hangs = self.calls + other.calls, self.cases + other.cases, self.hangs + other.hangs
        for name, seconds in other.slowest.items():
            self.slowest[name] = max(self.slowest.get(name, 0.0), seconds)
        self.problems += other.problems


def _missing(truth: Any) -> bool:
    return truth is None or (isinstance(truth, str) and not truth.strip())


def _allowed(name: str, value: Any, missing: bool) -> bool:
    if name == "accuracy_reward":  # None also where the ground truth does not parse
        return value is None if missing else value in (0.0, 1.0, None)
    if name == "dapo_reward":
        return value is None if missing else value in (1.0, -1.0)
    if name == "format_reward":
        return value in (0.0, 1.0)
    if name == "depth_penalty":  # fuzz rows carry no exit_steps: the charge does not apply
        return value is None
    return -1.0 <= value <= 0.0  # overlong_reward


def score(cases: list[Case], batch_size: int, **options: Any) -> Report:
    """Every case through every reward function, `batch_size` per call, the ground-truth column rotating."""
    funcs = dict(zip(rewards.REWARD_FUNCS, rewards.get_reward_funcs(list(rewards.REWARD_FUNCS), **options), strict=True))
    report = Report(cases=len(cases), hangs=sum(c.hangs for c in cases))
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        column = COLUMNS[(start // batch_size) % len(COLUMNS)]
        truths = [{"ground_truth": c.ground_truth} if column == "reward_model" else c.ground_truth for c in batch]
        prompt = "Solve." if start // batch_size % 2 else "Solve.\n<think>\n"  # some prompts open the think block
        inputs = {"prompts": [prompt] * len(batch), "completions": [c.completion for c in batch],
                  "completion_ids": [c.completion_ids for c in batch], column: truths}
        for name, func in funcs.items():
            began = time.monotonic()
            try:
                values = func(**inputs)
            except Exception as error:  # noqa: BLE001 -- the finding this test exists for
                report.problems.append(f"{name} raised {type(error).__name__}: {str(error)[:200]}")
                continue
            finally:
                report.calls += 1
                report.slowest[name] = max(report.slowest.get(name, 0.0), time.monotonic() - began)
            if len(values) != len(batch):
                report.problems.append(f"{name} returned {len(values)} values for {len(batch)} completions")
            for case, value in zip(batch, values, strict=False):
                if not _allowed(name, value, _missing(case.ground_truth)):
                    report.problems.append(f"{name} gave {value!r} for {str(case.completion)[:80]!r} / {case.ground_truth!r}")
    return report
