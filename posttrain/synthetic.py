"""Synthetic reasoning tasks generated in code: seeded, deterministic, tiny vocabulary.

A ~1-10M-parameter model learns them on two CPU cores in minutes, so recipes can be smoke-tested end to
end without downloads. The text uses only digits, the letters a-h, `+ - * ( ) = : .`, spaces, newlines, the
think tags and the words `Compute`, `mod`, `Start`, `apply`, `Answer`, so a tiny tokenizer covers it.

Rows are dicts with `messages` (user + assistant, for SFT), `prompt` (the user message, for GRPO) and
`ground_truth` (str); the assistant turn ends with `Answer: N`, the format `rewards.dapo` parses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from datasets import Dataset

from rewards.answer_format import format_trace

MODULUS = 23
OPERATORS = "+-*"
FUNCTION_NAMES = "abcdefgh"  # the functions of `compositions`
FUNCTIONS_SEED = 0  # their tables: fixed, the same for every row and every seed


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _row(question: str, answer: int, reply: str) -> dict[str, Any]:
    user = {"role": "user", "content": question}
    return {
        "messages": [user, {"role": "assistant", "content": reply}],
        "prompt": [user],
        "ground_truth": str(answer),
    }


def _arithmetic_problem(
    rng: random.Random, num_ops: int, max_operand: int, modulus: int | None, operators: str = OPERATORS,
    skip_reduction: float = 0.0,
) -> dict[str, Any]:
    """Left-to-right chain `((a op b) op c) ...`, parenthesised only where precedence needs it.

    skip_reduction: probability that the trace (a sloppy teacher's) leaves out the final `mod` line and answers
    the unreduced value; `ground_truth` stays the correct answer.
    """
    value = rng.randint(1, max_operand)
    expression, is_sum, steps = str(value), False, []
    for _ in range(num_ops):
        op = rng.choice(operators)
        low, high = (min(1, value), min(max_operand, value)) if op == "-" else (1, max_operand)  # stays >= 0
        operand = rng.randint(low, high)
        if op == "*" and is_sum:
            expression = f"({expression})"
        expression, is_sum = f"{expression}{op}{operand}", op != "*"
        result = _apply(op, value, operand)
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    stated = value  # the answer the trace states
    if modulus is not None:
        skip = skip_reduction > 0 and rng.random() < skip_reduction
        if not skip:
            steps.append(f"{value} mod {modulus}={value % modulus}")
        expression = f"({expression})" if is_sum else expression  # mod applies to the whole expression
        expression, value = f"{expression} mod {modulus}", value % modulus
        stated = stated if skip else value
    return _row(f"Compute {expression}.", value, format_trace("\n".join(steps), str(stated)))


def arithmetic_traces(
    n: int, seed: int = 0, num_ops: tuple[int, int] = (2, 3), max_operand: int = 9, modulus: int | None = MODULUS,
    operators: str = OPERATORS, skip_reduction: float = 0.0,
) -> list[dict[str, Any]]:
    """`n` problems like `Compute (7+5)*3 mod 23.` with traces `<think>\\n7+5=12\\n12*3=36\\n36 mod 23=13\\n</think>\\nAnswer: 13`.

    Each problem has between `num_ops[0]` and `num_ops[1]` operations (drawn from `operators`) on operands in
    0..max_operand; `modulus=None` leaves out the final reduction. With `skip_reduction` > 0 that fraction of
    traces skips the reduction and states a wrong answer (see `SyntheticTask`).
    """
    rng = random.Random(seed)
    return [
        _arithmetic_problem(rng, rng.randint(*num_ops), max_operand, modulus, operators, skip_reduction)
        for _ in range(n)
    ]


@dataclass
class SyntheticTask:
    """The synthetic problems, shared by the SFT, RL and gate recipes (`data.task`) so all see the same ones.

    kind arithmetic: `arithmetic_traces` (worked steps, then `Answer: N`). The RL task (`configs/grpo_tiny.yaml`):
    additions and subtractions of digits, reduced mod 10, where the SFT traces come from a sloppy teacher that
    skips the final reduction in `skip_reduction` of them (answering the unreduced sum, wrong whenever it is >= 10).
    SFT imitates the teacher, so the model often stops before reducing; the verifier rewards the reduced answer,
    which is the headroom RL has over imitating imperfect traces. The defaults are the original task (+ - *, mod 23,
    faithful traces).
    kind compose: `compositions` (`compose_steps` fixed functions of `functions` applied to a digit, answered
    directly): the task where accuracy rises at every loop.
    """

    kind: Literal["arithmetic", "compose"] = "arithmetic"
    num_ops: tuple[int, int] = (2, 3)
    max_operand: int = 9
    operators: str = OPERATORS
    modulus: int | None = MODULUS
    skip_reduction: float = 0.0
    compose_steps: tuple[int, int] = (1, 6)
    functions: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("arithmetic", "compose"):
            raise ValueError(f"task.kind must be arithmetic or compose, got {self.kind!r}")
        if not self.operators or set(self.operators) - set(OPERATORS):
            raise ValueError(f"task.operators must be a non-empty subset of {OPERATORS!r}, got {self.operators!r}")
        if not 0.0 <= self.skip_reduction <= 1.0:
            raise ValueError(f"task.skip_reduction must be in [0, 1], got {self.skip_reduction}")
        if not 1 <= self.num_ops[0] <= self.num_ops[1]:
            raise ValueError(f"task.num_ops must be (low, high) with 1 <= low <= high, got {self.num_ops}")
        if not 1 <= self.compose_steps[0] <= self.compose_steps[1]:
            raise ValueError(f"task.compose_steps must be (low, high) with 1 <= low <= high, got {self.compose_steps}")
        if not 1 <= self.functions <= len(FUNCTION_NAMES):
            raise ValueError(f"task.functions must be in 1..{len(FUNCTION_NAMES)}, got {self.functions}")

    def rows(self, n: int, seed: int) -> list[dict[str, Any]]:
        if self.kind == "compose":
            return compositions(n, seed=seed, steps=tuple(self.compose_steps), functions=self.functions)
        return arithmetic_traces(
            n, seed=seed, num_ops=tuple(self.num_ops), max_operand=self.max_operand, modulus=self.modulus,
            operators=self.operators, skip_reduction=self.skip_reduction,
        )


def _prefix_tree(rng: random.Random, ops: int, modulus: int) -> tuple[list[str], int]:
    """A random prefix expression with `ops` operators over 0..modulus-1 and its value mod `modulus`."""
    if ops == 0:
        leaf = rng.randrange(modulus)
        return [str(leaf)], leaf
    left_ops = rng.randint(0, ops - 1)
    op = rng.choice(OPERATORS)
    left, a = _prefix_tree(rng, left_ops, modulus)
    right, b = _prefix_tree(rng, ops - 1 - left_ops, modulus)
    return [op, *left, *right], _apply(op, a, b) % modulus


def modular_expressions(n: int, length: int = 8, seed: int = 0, modulus: int = MODULUS) -> list[dict[str, Any]]:
    """The Ouro paper's "Mano" task: prefix expressions with `length` operators over + - * mod `modulus`.

    The answer comes directly (`Answer: N`, no steps), so every bit of the computation happens inside the
    model: more loops measurably help, which makes it the task for gate tuning and depth demos. Rows also
    carry `length`.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, value = _prefix_tree(rng, length, modulus)
        row = _row(f"Compute {' '.join(tokens)} mod {modulus}.", value, f"Answer: {value}")
        rows.append({**row, "length": length})
    return rows


def function_tables(count: int, seed: int) -> dict[str, list[int]]:
    """`count` fixed random permutations of the digits without fixed points, named a, b, c, ...: the functions of
    `compositions` (a shared fixed point would answer every composition started there)."""
    rng, tables = random.Random(seed), {}
    for name in FUNCTION_NAMES[:count]:
        table = rng.sample(range(10), 10)
        while any(table[x] == x for x in range(10)):
            table = rng.sample(range(10), 10)
        tables[name] = table
    return tables


def compositions(n: int, seed: int = 0, steps: tuple[int, int] = (1, 6), functions: int = 4) -> list[dict[str, Any]]:
    """Function composition answered directly: a digit and a list of functions to apply to it in turn, drawn from
    `functions` fixed permutations of the digits (the same in every row: the model learns their tables), e.g.
    `Start 7 apply c a d b .` -> `Answer: 4` (b(d(a(c(7))))).

    Each function needs the value the previous ones left, so the `k` applications (uniform in `steps`) happen one
    after another inside the model, a bounded number per loop (the tiny model of configs/sft_compose_tiny.yaml:
    about one and a half): accuracy rises at every loop, and the answer needs depth in proportion to `k` while
    the other tokens need none, the task where per-token depth pays (issue 24). Rows also carry `depth` (k).
    """
    SyntheticTask(kind="compose", compose_steps=steps, functions=functions)  # checks the arguments
    tables = function_tables(functions, FUNCTIONS_SEED)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        value, names = rng.randrange(10), rng.choices(list(tables), k=rng.randint(*steps))
        question = f"Start {value} apply {' '.join(names)} ."
        for name in names:
            value = tables[name][value]
        rows.append({**_row(question, value, f"Answer: {value}"), "depth": len(names)})
    return rows


def to_dataset(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Dataset:
    """A `datasets.Dataset` of the rows, optionally keeping only `columns` (e.g. ["messages"] for SFT,
    ["prompt", "ground_truth"] for GRPO)."""
    keep = list(columns) if columns is not None else list(rows[0]) if rows else []
    return Dataset.from_dict({column: [row[column] for row in rows] for column in keep})


__all__ = ["SyntheticTask", "arithmetic_traces", "compositions", "function_tables", "modular_expressions", "to_dataset"]
