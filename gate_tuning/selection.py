"""Held-out gate selection: which Stage-II snapshot (or the starting gate) the gate recipe keeps, and the budget
it is judged at.

Every snapshot's teacher-forced Q-exit curve is measured on validation rows taken off the training rows; a q is
offered only where its point is at or above static depth; the eligible snapshots are ranked by what
`pick_threshold` gives the user at their `select:` budget (issue 24).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from looplm import LoopLMForCausalLM

from .data import Example
from .frontier import (
    GAP_TOL,
    FrontierPoint,
    compare_frontiers,
    evaluate_rules,
    frontier_area,
    frontier_curve,
    interpolate,
    pick_threshold,
    q_exit_rules,
    static_rules,
)
from .stage2 import load_gate_state

logger = logging.getLogger(__name__)

START = "start"  # the starting gate's snapshot name


@dataclass
class SelectSection:
    """How q is chosen from the tuned gate's curve: exactly one of the two."""

    max_accuracy_drop: float | None = 0.01  # fraction: 0.01 = one point below static T loops
    target_avg_loops: float | None = None

    def __post_init__(self) -> None:
        if (self.max_accuracy_drop is None) == (self.target_avg_loops is None):
            raise ValueError("select: set exactly one of max_accuracy_drop and target_avg_loops")


@dataclass
class Selection:
    """What held-out gate selection evaluates on: validation rows (never the test rows) and the q grid."""

    examples: list[Example]
    tokenizer: PreTrainedTokenizerBase
    q_grid: list[float]
    batch_size: int = 32
    tolerance: float = 0.01  # training.select_tolerance
    exact_tolerance: float = 0.01  # training.select_exact_tolerance
    budget: SelectSection = field(default_factory=SelectSection)  # the user's budget: snapshots are ranked at it


def select_gate(
    model: LoopLMForCausalLM, snapshots: dict[str, dict[str, torch.Tensor]], sel: Selection,
    cache: dict[str, list[FrontierPoint]] | None = None,
) -> dict[str, Any]:
    """Load into `model` the snapshot kept by held-out selection on the validation rows, and say which.

    Each snapshot's teacher-forced Q-exit frontier (-loss against average loops) is measured on the validation
    rows (`cache` keeps those already measured), and so is the static-depth frontier. Eligible: the snapshots at or
    above the static-depth frontier at every average depth (`compare_frontiers`) and, when the starting gate is
    itself at or above it (a healthy gate), at or above the starting gate too, both within `sel.tolerance` of static
    1 loop's loss minus static T's (validation rows are few). Kept: the eligible one that gives the user the most at
    `sel.budget` (`point_at_budget`, `budget_rank`), the areas under its curves breaking ties; with none eligible,
    the one least below the static frontier (a warning says so). So a healthy Stage-I gate is kept unless a snapshot
    beats it at the budget, and a broken one is replaced.
    """
    cache = {} if cache is None else cache
    grid = sorted({0.0, 1.0, *sel.q_grid})  # q = 0 is static 1 loop, q = 1 static T: every curve spans 1..T
    num_loops = model.config.total_ut_steps
    if "static" not in cache:
        cache["static"] = evaluate_rules(model, sel.tokenizer, sel.examples, static_rules(num_loops), sel.batch_size,
                                         accuracy=False)
    for name, state in snapshots.items():
        if name not in cache:
            load_gate_state(model, state)
            cache[name] = evaluate_rules(model, sel.tokenizer, sel.examples, q_exit_rules(grid, name),
                                         sel.batch_size, accuracy=False)
    static_loss = [p.loss for p in cache["static"]]
    tols = {"loss": GAP_TOL + sel.tolerance * abs(static_loss[0] - static_loss[-1]),  # in nats
            "exact_tf": GAP_TOL + sel.exact_tolerance}
    # Loss alone hides the few tokens an answer hangs on (issue 24: a gate on the static loss frontier was 11 points
    # below it in accuracy at 1.4 loops), so the teacher-forced exact match must hold up too; and a q whose point is
    # below static depth on the validation rows is not offered: a user runs static depth there instead, so each
    # snapshot's curve is its offered points with the static depths (an area above static's is what it adds).
    offered = {n: validated_points(cache[n], cache["static"], tols) for n in snapshots}
    curves = {n: [*offered[n], *cache["static"]] for n in snapshots}
    areas = {name: frontier_area(curves[name], num_loops, metric="loss") for name in snapshots}
    exact_areas = {name: frontier_area(curves[name], num_loops, metric="exact_tf") for name in snapshots}
    at_budget = {n: point_at_budget(offered[n], cache["static"], sel.budget, num_loops) for n in snapshots}
    to_static = {n: {m: compare_frontiers(curves[n], cache["static"], m).min_gap for m in tols} for n in snapshots}
    to_start = {n: {m: compare_frontiers(curves[n], curves[START], m).min_gap for m in tols} for n in snapshots}

    def above(gaps: dict[str, float]) -> bool:
        return all(gaps[m] >= -tols[m] for m in tols)

    healthy = above(to_static[START])
    eligible = [n for n in snapshots if above(to_static[n]) and (not healthy or above(to_start[n]))]
    # Ranked by what the user gets at their budget (`select`): fewest loops within the accuracy drop, or the best
    # exact match within the loops. An area ranks the whole curve and let a snapshot equal to static depth beat a
    # gate that saves 45% of the loops for a 0.05-point dip (issue 24); the areas only break ties.
    best = (max(eligible, key=lambda n: (budget_rank(at_budget[n], sel.budget), round(exact_areas[n], 9), areas[n]))
            if eligible else max(snapshots, key=lambda n: min(to_static[n][m] / tols[m] for m in tols)))
    for name in snapshots:
        logger.info("gate selection: %s, at the budget q %g: %.2f loops, exact match %.4f; validation area %.5f "
                    "(exact match %.4f), min gap to static %.5f nats / %+.1f points of exact match, to the starting "
                    "gate %.5f / %+.1f%s", name, float(at_budget[name].param), at_budget[name].avg_loops,
                    at_budget[name].exact_tf, areas[name], exact_areas[name], to_static[name]["loss"],
                    100 * to_static[name]["exact_tf"], to_start[name]["loss"], 100 * to_start[name]["exact_tf"],
                    " (kept)" if name == best else "")
    load_gate_state(model, snapshots[best])
    if not eligible:
        logger.warning("gate selection: no snapshot is at or above the static-depth frontier on the validation "
                       "rows; kept %s, the least below it", best)
    elif best == START:
        logger.warning("gate selection kept the starting gate: no Stage-II snapshot at or above it and the static "
                       "frontier at every depth did better at the budget (%s) on the validation rows",
                       budget_text(sel.budget))
    qs = sorted(float(p.param) for p in offered[best] if float(p.param) in set(sel.q_grid))
    return {"kept": best, "kept_starting_gate": best == START, "eligible": bool(eligible), "tolerances": tols,
            "validated_q": qs or [1.0],
            "starting_gate_at_or_above_static": healthy, "validation_rows": len(sel.examples), "areas": areas,
            "exact_match_areas": exact_areas, "min_gap_to_static": to_static, "min_gap_to_start": to_start,
            "at_budget": {n: {"q": float(p.param), "avg_loops": p.avg_loops, "exact_tf": p.exact_tf, "loss": p.loss}
                          for n, p in at_budget.items()},
            "criterion": f"ranked at the budget ({budget_text(sel.budget)}; teacher-forced exact match as "
                         "accuracy) by the fewest average loops (for a loops budget: the highest exact match), then by "
                         "the areas under the exact-match and -loss frontiers, among snapshots at or above the "
                         "static-depth frontier (and, when the starting gate is, at or above it) at every depth, in "
                         "-loss and in teacher-forced exact match, within tolerances; a snapshot offers only its q's "
                         "whose points are at or above static depth"}


def point_at_budget(
    offered: list[FrontierPoint], static: list[FrontierPoint], budget: SelectSection, num_loops: int
) -> FrontierPoint:
    """The offered point `pick_threshold` would give the user at `budget`, with the teacher-forced exact match read
    as accuracy (the validation rows are scored without generation)."""
    as_accuracy = [replace(p, accuracy=p.exact_tf) for p in (*offered, *static)]
    return pick_threshold(as_accuracy, offered[0].rule, num_loops, budget.target_avg_loops, budget.max_accuracy_drop)


def budget_rank(point: FrontierPoint, budget: SelectSection) -> float:
    """Higher is better: fewer loops for an accuracy-drop budget, more exact match for a loops budget."""
    return -round(point.avg_loops, 6) if budget.max_accuracy_drop is not None else round(point.accuracy, 9)


def budget_text(budget: SelectSection) -> str:
    if budget.max_accuracy_drop is not None:
        points = 100 * budget.max_accuracy_drop
        return f"at most {points:.3g} point{'' if points == 1 else 's'} below static T loops"
    return f"at most {budget.target_avg_loops:g} average loops"


def validated_points(
    curve: list[FrontierPoint], static: list[FrontierPoint], tols: dict[str, float]
) -> list[FrontierPoint]:
    """The points of a Q-exit curve at or above the static-depth line at their own depth in every metric of `tols`
    (within it); q = 0 and q = 1 (static 1 and T loops) always stay, so the curve spans 1..T."""
    lines = {m: frontier_curve(static, m) for m in tols}

    def gap(p: FrontierPoint, m: str) -> float:
        return (-p.loss if m == "loss" else getattr(p, m)) - interpolate(lines[m], p.avg_loops)

    return [p for p in curve if float(p.param) in (0.0, 1.0) or all(gap(p, m) >= -tols[m] for m in tols)]


__all__ = [
    "START",
    "SelectSection",
    "Selection",
    "budget_rank",
    "budget_text",
    "point_at_budget",
    "select_gate",
    "validated_points",
]
