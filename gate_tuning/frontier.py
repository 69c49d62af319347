"""The depth-versus-accuracy frontier: every exit rule evaluated on held-out data, the threshold pick, the outputs.

Rules (each a `rollout.engine.DepthConfig`, so evaluation decodes exactly as rollouts do):
    static        every position runs n loops, n = 1..T
    q_exit_*      Q-exit with the model's gate at threshold q (prompts prefill at T loops)
    hidden_diff   exit at the first loop t >= 2 whose relative state change is below eps (no gate)
    kv_sharing    T loops with a decode-time K/V sharing mode (full, last, average, first)
Per rule: `loss`, the teacher-forced cross-entropy of the reference completions, computed the way decoding
runs (the prompt prefilled into the cache at the policy's prefill depth, then the reference completion fed
in; with the full cache in one parallel chunk, since a token's exit depends only on its own state and exited
tokens keep their "last exited" K/V; with a shared cache one token at a time, since sharing is applied per
decode step); `accuracy`, greedy generation through `rollout.TorchEngine` scored with DAPO's `Answer:` scorer
where the data has answers; `avg_loops`, the mean depth of the decoded positions that ran (generation's when it
ran, else teacher-forced); `bytes_per_token`, the K/V cache's bytes per token in the policy's dtype.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from looplm import KV_MODES, LoopKVCache, LoopLMForCausalLM
from looplm.losses import IGNORE_INDEX
from rewards.dapo import dapo_score
from rollout.engine import DepthConfig, SamplingConfig, ran_exit_steps
from rollout.torch_engine import TorchEngine, _left_pad

from .data import Example

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExitRule:
    rule: str  # the curve it belongs to
    param: float | str  # loops, q, eps or the K/V mode
    depth: DepthConfig


@dataclass
class FrontierPoint:
    rule: str
    param: float | str
    avg_loops: float
    loss: float
    accuracy: float | None  # fraction of answered examples scored correct; None without answers
    bytes_per_token: int
    avg_loops_tf: float  # the same, teacher-forced on the reference completions
    # Fraction of examples whose every reference token is the teacher-forced argmax: greedy decoding would write
    # the reference exactly. A cheap stand-in for accuracy (held-out gate selection reads it; issue 24).
    exact_tf: float = math.nan


# ----------------------------------------------------------------------------------------------------------
# Rules


def static_rules(num_loops: int) -> list[ExitRule]:
    return [ExitRule("static", n, DepthConfig(policy="fixed", num_loops=n)) for n in range(1, num_loops + 1)]


def q_exit_rules(grid: Sequence[float], name: str) -> list[ExitRule]:
    return [ExitRule(name, float(q), DepthConfig(policy="adaptive", exit_threshold=float(q))) for q in grid]


def hidden_diff_rules(grid: Sequence[float]) -> list[ExitRule]:
    return [ExitRule("hidden_diff", float(e), DepthConfig(policy="hidden_diff", hidden_eps=float(e))) for e in grid]


def kv_rules(modes: Sequence[str] = KV_MODES) -> list[ExitRule]:
    return [ExitRule("kv_sharing", m, DepthConfig(policy="fixed", kv_mode=m)) for m in modes]


# ----------------------------------------------------------------------------------------------------------
# Measurements


@torch.inference_mode()
def teacher_forced(
    model: LoopLMForCausalLM, batch: Sequence[Example], depth: DepthConfig
) -> tuple[float, int, float, int, int]:
    """-> (sum of CE, completion tokens, sum of loops, decoded positions, examples whose every reference token is
    the argmax) of the reference completions."""
    device, num_loops = model.device, depth.num_loops or model.config.total_ut_steps
    cache = LoopKVCache(model.config, mode=depth.kv_mode)
    ids, mask = _left_pad([e.prompt_ids for e in batch], device)  # (B, P)
    first = model(ids, attention_mask=mask, cache=cache, num_loops=num_loops, logits_to_keep=1)
    # Position j of the fed completion (its token j) predicts token j + 1; the last token is never fed back.
    targets = _right_pad([e.completion_ids for e in batch], IGNORE_INDEX, device)  # (B, W + 1)
    fed = targets[:, :-1].clamp(min=0)
    fed_mask = (targets[:, :-1] != IGNORE_INDEX) & (targets[:, 1:] != IGNORE_INDEX)  # (B, W)
    ce_sum = F.cross_entropy(first.logits[:, -1].float(), targets[:, 0], reduction="sum").item()
    exact = first.logits[:, -1].argmax(-1) == targets[:, 0]  # (B,)
    loops_sum, width = 0.0, fed.shape[1]
    chunk = width if depth.kv_mode == "full" else 1
    for start in range(0, width, max(chunk, 1)):
        end = min(start + chunk, width)
        out = model(
            fed[:, start:end], attention_mask=torch.cat([mask, fed_mask[:, :end].long()], dim=1),
            cache=cache, num_loops=num_loops, **depth.decode_kwargs(),
        )
        piece = targets[:, start + 1 : end + 1]
        ce_sum += F.cross_entropy(out.logits.float().transpose(1, 2), piece, reduction="sum").item()
        exact &= ((out.logits.argmax(-1) == piece) | (piece == IGNORE_INDEX)).all(dim=1)
        loops_sum += (out.exit_steps * fed_mask[:, start:end]).sum().item()
    return ce_sum, int((targets != IGNORE_INDEX).sum()), loops_sum, int(fed_mask.sum()), int(exact.sum())


def _right_pad(rows: Sequence[Sequence[int]], value: int, device) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return out


def generation_accuracy(
    engine: TorchEngine, examples: Sequence[Example], depth: DepthConfig, max_new_tokens: int
) -> tuple[float | None, float]:
    """Greedy completions of the answered examples -> (accuracy, mean loops of the decoded positions)."""
    scores = generation_scores(engine, examples, depth, max_new_tokens)
    return (None, math.nan) if scores is None else (scores.accuracy, scores.avg_loops)


@dataclass
class ExampleScores:
    """Per answered example: greedy answer correct, decoded positions that ran, and their loops (summed)."""

    correct: list[bool]
    positions: list[int]
    loops: list[int]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def avg_loops(self) -> float:  # per decoded position, as `mean_loops_per_token`
        return sum(self.loops) / max(sum(self.positions), 1)

    def intervals(self, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap intervals of accuracy and average loops, resampling examples (both statistics
        from the same resamples, so they are paired)."""
        n = len(self.correct)
        rows = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
        correct = torch.tensor(self.correct, dtype=torch.float64)[rows].mean(1)
        loops = torch.tensor(self.loops, dtype=torch.float64)[rows].sum(1)
        avg_loops = loops / torch.tensor(self.positions, dtype=torch.float64)[rows].sum(1).clamp(min=1)
        tail = (1 - level) / 2
        bounds = torch.tensor([tail, 1 - tail], dtype=torch.float64)
        return {"accuracy": tuple(correct.quantile(bounds).tolist()), "avg_loops": tuple(avg_loops.quantile(bounds).tolist())}


def generation_scores(
    engine: TorchEngine, examples: Sequence[Example], depth: DepthConfig, max_new_tokens: int
) -> ExampleScores | None:
    """Greedy completions of the answered examples, scored one by one (DAPO's `Answer:`); None without answers."""
    answered = [e for e in examples if e.answer is not None]
    if not answered:
        return None
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    records = engine.generate([e.prompt_ids for e in answered], sampling, depth)
    texts = [engine.tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in records]
    ran = [ran_exit_steps(r) for r in records]
    return ExampleScores(
        correct=[dapo_score(t, e.answer) > 0 for t, e in zip(texts, answered, strict=True)],
        positions=[len(steps) for steps in ran],
        loops=[int(sum(steps)) for steps in ran],
    )


def evaluate_rules(
    model: LoopLMForCausalLM,
    tokenizer,
    examples: Sequence[Example],
    rules: Sequence[ExitRule],
    batch_size: int = 32,
    max_new_tokens: int = 128,
    accuracy: bool = True,
) -> list[FrontierPoint]:
    """One `FrontierPoint` per rule (see the module docstring)."""
    if not examples:
        raise ValueError("no held-out examples to evaluate on")
    model.eval()
    engine = TorchEngine(model, tokenizer=tokenizer, max_batch_size=batch_size)
    measured: dict[str, tuple] = {}  # one measurement per distinct policy (static T is also the full K/V mode)
    points = []
    for rule in tqdm(rules, desc="frontier", unit="rule"):
        depth = dataclasses.replace(rule.depth, num_loops=rule.depth.num_loops or model.config.total_ut_steps)
        key = depth.label()  # names the policy completely
        if key not in measured:
            measured[key] = _measure(model, engine, examples, depth, batch_size, max_new_tokens, accuracy)
        loss, avg_loops_tf, acc, avg_loops, exact = measured[key]
        points.append(FrontierPoint(
            rule=rule.rule, param=rule.param, avg_loops=avg_loops_tf if math.isnan(avg_loops) else avg_loops,
            loss=loss, accuracy=acc, avg_loops_tf=avg_loops_tf, exact_tf=exact,
            bytes_per_token=LoopKVCache.bytes_per_token(model.config, depth.kv_mode, depth.num_loops, model.dtype),
        ))
        logger.info("%s %s: %s", rule.rule, rule.param, points[-1])
    return points


def _measure(model, engine, examples, depth, batch_size, max_new_tokens, accuracy) -> tuple:
    """-> (loss, teacher-forced avg loops, accuracy, decoding avg loops, teacher-forced exact match) of one policy."""
    sums = [0.0, 0, 0.0, 0, 0]
    for start in range(0, len(examples), batch_size):
        for i, value in enumerate(teacher_forced(model, examples[start : start + batch_size], depth)):
            sums[i] += value
    acc, avg_loops = generation_accuracy(engine, examples, depth, max_new_tokens) if accuracy else (None, math.nan)
    return sums[0] / max(sums[1], 1), sums[2] / max(sums[3], 1), acc, avg_loops, sums[4] / len(examples)


# ----------------------------------------------------------------------------------------------------------
# Choosing q, and comparing frontiers


def pick_threshold(
    points: Sequence[FrontierPoint],
    rule: str,
    num_loops: int,
    target_avg_loops: float | None = None,
    max_accuracy_drop: float | None = None,
) -> FrontierPoint:
    """The `rule` point (a Q-exit curve) that fits the budget; its `param` is the q to use.

    max_accuracy_drop: the fewest average loops whose accuracy is within this drop (a fraction: 0.01 = one
        point) of static T loops.
    target_avg_loops: the most accurate point (lowest loss without answers) at or below this average depth.
    Exactly one of the two. When no point fits, q = 1.0 (always T loops) for a drop, or the shallowest point
    for a depth target, with a warning.
    """
    if (target_avg_loops is None) == (max_accuracy_drop is None):
        raise ValueError("pick_threshold: give exactly one of target_avg_loops and max_accuracy_drop")
    curve = [p for p in points if p.rule == rule]
    if not curve:
        raise ValueError(f"pick_threshold: no points of rule {rule!r} (rules: {sorted({p.rule for p in points})})")
    if max_accuracy_drop is not None:
        reference = next((p for p in points if p.rule == "static" and p.param == num_loops), None)
        if reference is None or reference.accuracy is None:
            raise ValueError("pick_threshold: max_accuracy_drop needs the static T-loop point with an accuracy")
        fit = [p for p in curve if p.accuracy is not None and p.accuracy >= reference.accuracy - max_accuracy_drop]
        if not fit:
            logger.warning("no q within %.3f of static T accuracy: keeping q = 1.0", max_accuracy_drop)
            return FrontierPoint(rule, 1.0, reference.avg_loops, reference.loss, reference.accuracy,
                                 reference.bytes_per_token, reference.avg_loops_tf)
        return min(fit, key=lambda p: (p.avg_loops, -float(p.param)))
    fit = [p for p in curve if p.avg_loops <= target_avg_loops]
    if not fit:
        logger.warning("no q reaches %.2f average loops: taking the shallowest point", target_avg_loops)
        return min(curve, key=lambda p: p.avg_loops)
    return max(fit, key=lambda p: (p.accuracy if p.accuracy is not None else -p.loss, -p.loss))


@dataclass
class FrontierComparison:
    """How curve A compares with curve B over the depths both span (see `compare_frontiers`)."""

    min_gap: float  # min over the common depth range of A - B (accuracy, or -loss); nan when no overlap
    at_loops: float  # the average depth where that minimum is
    depth_range: tuple[float, float]  # the common range of average loops
    below: list[tuple[float, float]]  # depth intervals where A is below B

    @property
    def a_at_or_above_b(self) -> bool:
        return self.min_gap >= -GAP_TOL


GAP_TOL = 1e-9  # interpolation rounding: equal accuracies must not read as "below"


def frontier_curve(points: Sequence[FrontierPoint], metric: str = "accuracy") -> list[tuple[float, float]]:
    """(avg loops, value) sorted by depth, value = accuracy, exact_tf or -loss (higher is better); one value per
    depth (the best, where two thresholds land on the same depth)."""
    best: dict[float, float] = {}
    for p in points:
        value = -p.loss if metric == "loss" else getattr(p, metric)
        if value is None or not math.isfinite(value):
            continue
        best[p.avg_loops] = max(value, best.get(p.avg_loops, -math.inf))
    return sorted(best.items())


def interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve at x (x within its depth range)."""
    xs = [c[0] for c in curve]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1) if len(xs) > 1 else 0
    (x0, y0), (x1, y1) = curve[max(i - 1, 0)], curve[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def compare_frontiers(
    a: Sequence[FrontierPoint], b: Sequence[FrontierPoint], metric: str = "accuracy"
) -> FrontierComparison:
    """Is frontier A at or above frontier B at every average depth, and where is it below?

    Each curve is its points joined by straight lines (sorted by average loops); they are compared over the
    depth range both span. A - B is then piecewise linear with corners at the two curves' depths only, so its
    minimum over the range is the minimum over those depths, and the intervals where it is negative follow
    from its zero crossings between them.
    """
    ca, cb = frontier_curve(a, metric), frontier_curve(b, metric)
    if not ca or not cb:
        return FrontierComparison(math.nan, math.nan, (math.nan, math.nan), [])
    lo, hi = max(ca[0][0], cb[0][0]), min(ca[-1][0], cb[-1][0])
    if lo > hi:
        return FrontierComparison(math.nan, math.nan, (lo, hi), [])
    xs = sorted({lo, hi, *(x for x, _ in [*ca, *cb] if lo <= x <= hi)})
    gaps = [interpolate(ca, x) - interpolate(cb, x) for x in xs]
    i = min(range(len(xs)), key=lambda j: (gaps[j], xs[j]))
    return FrontierComparison(gaps[i], xs[i], (lo, hi), _negative_intervals(xs, gaps))


def static_gaps(curve: Sequence[FrontierPoint], static: Sequence[FrontierPoint]) -> dict | None:
    """Each point of a Q-exit `curve` against the static-depth frontier at its own average depth (the static
    points joined by straight lines; accuracy where both have it, else -loss): how many points lie above and below
    it and the largest gap each way with its depth. None without points."""
    metric = "accuracy" if all(p.accuracy is not None for p in [*curve, *static]) else "loss"
    line = frontier_curve(static, metric)
    inside = [p for p in curve if line and line[0][0] <= p.avg_loops <= line[-1][0]]
    if not inside:
        return None
    gaps = [((p.accuracy if metric == "accuracy" else -p.loss) - interpolate(line, p.avg_loops), p) for p in inside]
    (low, low_p), (high, high_p) = min(gaps, key=lambda g: g[0]), max(gaps, key=lambda g: g[0])
    return {
        "metric": metric, "points": len(gaps),
        "above": sum(g > GAP_TOL for g, _ in gaps), "below": sum(g < -GAP_TOL for g, _ in gaps),
        "max_gap": high, "max_at": high_p.avg_loops, "min_gap": low, "min_at": low_p.avg_loops,
        "gaps": [{"param": p.param, "avg_loops": p.avg_loops, "gap": g} for g, p in gaps],
    }


def frontier_area(points: Sequence[FrontierPoint], num_loops: int, metric: str = "accuracy") -> float:
    """The curve's mean value over average loops 1..T: its straight-line interpolation integrated over [1, T]
    (held flat beyond its first and last points) and divided by T - 1. Higher is better; nan when empty."""
    curve = frontier_curve(points, metric)
    if not curve:
        return math.nan
    if num_loops < 2:
        raise ValueError(f"frontier_area: needs T >= 2 loops, got {num_loops}")
    xs = sorted({1.0, float(num_loops), *(x for x, _ in curve if 1.0 <= x <= num_loops)})

    def at(x: float) -> float:
        return interpolate(curve, min(max(x, curve[0][0]), curve[-1][0]))

    area = sum((x1 - x0) * (at(x0) + at(x1)) / 2 for x0, x1 in itertools.pairwise(xs))
    return area / (num_loops - 1)


def _negative_intervals(xs: Sequence[float], gaps: Sequence[float]) -> list[tuple[float, float]]:
    """Where the piecewise-linear function through (xs, gaps) is below -GAP_TOL, as merged intervals."""
    spans: list[tuple[float, float]] = []
    below = [g < -GAP_TOL for g in gaps]
    for j, x in enumerate(xs):
        if below[j] and (j == 0 or not below[j - 1]):  # entering: from the zero crossing before x
            start = x if j == 0 else _crossing(xs[j - 1], gaps[j - 1], x, gaps[j])
        if below[j] and (j == len(xs) - 1 or not below[j + 1]):  # leaving: at the zero crossing after x
            end = x if j == len(xs) - 1 else _crossing(x, gaps[j], xs[j + 1], gaps[j + 1])
            spans.append((start, end))
    return spans


def _crossing(x0: float, g0: float, x1: float, g1: float) -> float:
    return x0 if g1 == g0 else x0 + (x1 - x0) * (0.0 - g0) / (g1 - g0)


# ----------------------------------------------------------------------------------------------------------
# Outputs


def write_frontier(
    points: Sequence[FrontierPoint], out_dir: str | Path, title: str = "", note: str = ""
) -> dict[str, Path]:
    """frontier.csv, frontier.md (the table, then `note`) and frontier.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "frontier.csv", "md": out / "frontier.md", "png": out / "frontier.png"}
    names = [f.name for f in fields(FrontierPoint)]
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    paths["md"].write_text(markdown_table(points) + (f"\n{note}\n" if note else ""))
    plot_frontier(points, paths["png"], title)
    return paths


def markdown_table(points: Sequence[FrontierPoint]) -> str:
    lines = [
        "| rule | param | avg loops | loss | accuracy | K/V bytes per token | avg loops (teacher-forced) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        acc = "n/a" if p.accuracy is None else f"{100 * p.accuracy:.1f}%"
        lines.append(
            f"| {p.rule} | {p.param} | {p.avg_loops:.3f} | {p.loss:.4f} | {acc} | {p.bytes_per_token:,} "
            f"| {p.avg_loops_tf:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_frontier(points: Sequence[FrontierPoint], path: Path, title: str = "") -> None:
    """Accuracy (left, where measured) and loss (right) against average loops; one curve per rule.

    The y-range follows the depth curves; a K/V sharing point far outside it is drawn at the edge with its value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["accuracy", "loss"] if any(p.accuracy is not None for p in points) else ["loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        value = partial(_plotted, metric=metric)
        curves = [p for p in points if p.rule != "kv_sharing"]
        for rule in dict.fromkeys(p.rule for p in curves):
            curve = sorted((p for p in curves if p.rule == rule), key=lambda p: p.avg_loops)
            ax.plot([p.avg_loops for p in curve], [value(p) for p in curve], marker="o", markersize=4, label=rule)
        low, high = _padded_range([value(p) for p in curves])
        kv = [p for p in points if p.rule == "kv_sharing"]
        for i, p in enumerate(kv):
            y = min(max(value(p), low), high)
            label = f"{p.param}" if y == value(p) else f"{p.param} ({value(p):.3g}, off scale)"
            ax.scatter([p.avg_loops], [y], marker="x", color="black", zorder=3,
                       label="K/V sharing (T loops)" if i == 0 else None)
            offset = -12 - 9 * i if y == high else 6 + 9 * i  # labels of points clipped at the top go below
            ax.annotate(label, (p.avg_loops, y), textcoords="offset points", xytext=(-6, offset), fontsize=7,
                        ha="right")
        if math.isfinite(low):
            ax.set_ylim(low, high)
        ax.set_xlabel("average loops per decoded token")
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "teacher-forced loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plotted(p: FrontierPoint, metric: str) -> float:
    if metric == "loss":
        return p.loss
    return 100 * p.accuracy if p.accuracy is not None else math.nan


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return -math.inf, math.inf
    low, high = min(finite), max(finite)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
    return low - pad, high + pad


__all__ = [
    "GAP_TOL",
    "ExampleScores",
    "ExitRule",
    "FrontierComparison",
    "FrontierPoint",
    "compare_frontiers",
    "evaluate_rules",
    "frontier_area",
    "frontier_curve",
    "generation_accuracy",
    "generation_scores",
    "hidden_diff_rules",
    "kv_rules",
    "markdown_table",
    "pick_threshold",
    "plot_frontier",
    "q_exit_rules",
    "static_gaps",
    "static_rules",
    "teacher_forced",
    "write_frontier",
]
