"""Depth-aware RL across alphas and seeds, against the baselines, on fresh problems with intervals (issue 25).

    python run.py                                   # the demo: outputs/demo/{sft,grpo/model,gate/model}
    python run.py bench "benchmarks=[depth_rl]"     # 4 alphas x 3 seeds of configs/depth_rl_lm_tiny.yaml, then eval

Runs (each resumable: a run whose folder holds results.json is not trained again):
- depth-aware RL of the LM and gate from the demo's SFT model (`grpo_config`), for every alpha and seed;
Evaluated on the same problems, greedy tokens, DAPO's `Answer:` scorer:
- `test_rows` fresh problems of the RL task and `val_rows` more for picking q, drawn with their own seeds, with
  every prompt that SFT, RL or gate tuning trained on (`trained_rows`) left out, and none in both sets;
- each depth-RL model: Q-exit over `q_grid` (the deployed readout; q picked on the validation problems for the
  `max_accuracy_drop` budget against the model's own static T) and the sampled policy it was trained with;
- baselines: the demo's RL model (adaptive depth in RL, no exit action) with its Stage-I gate over `q_grid`, static
  depths 1..T, and Stage II on it (the demo's gate output) over `q_grid`; the same RL stage at `rl_seeds`.
Every point carries 95% percentile-bootstrap intervals of accuracy and average loops (problems resampled).
Outputs under `output_dir`: depth_rl.json (every point), depth_rl.md (the table), depth_rl.png (the frontier).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs import UserError, load_config
from configs.inputs import model_folder
from gate_tuning.data import Example, encode_row
from gate_tuning.frontier import ExampleScores, FrontierPoint, generation_scores, pick_threshold
from gate_tuning.recipe import ModelSection, load_model
from posttrain.grpo_recipe import GRPORecipeConfig, run_grpo
from posttrain.synthetic import SyntheticTask
from rollout.engine import DepthConfig
from rollout.torch_engine import TorchEngine

logger = logging.getLogger(__name__)

RL_TASK = SyntheticTask(operators="+", modulus=10)  # the demo's RL task (cli/demo.py)


@dataclass
class DepthRLBenchConfig:
    sft_model: str = "outputs/demo/sft"  # where depth-aware RL starts (the demo's SFT model)
    rl_model: str = "outputs/demo/grpo/model"  # baseline: the demo's RL model and its Stage-I gate
    stage2_model: str = "outputs/demo/gate/model"  # baseline: Stage II on the RL model (the demo's gate stage)
    grpo_config: str = "configs/depth_rl_lm_tiny.yaml"
    # The RL baseline's other seeds (seed 0 is `rl_model`): the demo's GRPO stage (`rl_config` from `sft_model`)
    # trained again, so the baseline's own seed spread is measured too
    rl_config: str = "configs/grpo_tiny.yaml"
    rl_seeds: list[int] = field(default_factory=lambda: [1, 2])
    rl_overrides: list[str] = field(default_factory=list)  # appended to the RL baseline's runs (e.g. their steps)
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.2, 0.5])
    # the config key each alpha sets: the sequence charge (rewards.depth_penalty's alpha), or with
    # configs/depth_rl_token_tiny.yaml the per-exit charge (loop.exit_cost)
    alpha_key: str = "rewards.options.alpha"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)  # appended to every run's config
    test_rows: int = 512
    val_rows: int = 256
    test_seed: int = 1001
    val_seed: int = 1002
    # (rows, seed) of every synthetic set a stage trained on: SFT and RL (4,096 at seed 0), gate tuning (1,536 at 1)
    trained_rows: list[list[int]] = field(default_factory=lambda: [[4096, 0], [1536, 1]])
    q_grid: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    max_accuracy_drop: float = 0.01
    max_new_tokens: int = 96
    batch_size: int = 64
    output_dir: str = "runs/depth_rl"

    def __post_init__(self) -> None:
        if not self.alphas or not self.seeds:
            raise ValueError("depth_rl.alphas and depth_rl.seeds must be non-empty")
        if min(self.test_rows, self.val_rows) < 1:
            raise ValueError(f"depth_rl.test_rows and val_rows must be >= 1, got {self.test_rows}, {self.val_rows}")


# ----------------------------------------------------------------------------------------------------------
# Problems no stage trained on


def prompt_text(row: dict[str, Any]) -> str:
    return row["prompt"][-1]["content"]


def fresh_rows(task: SyntheticTask, n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """`n` distinct problems of `task` drawn with `seed` whose prompt is not in `exclude`."""
    rows, seen = [], set(exclude)
    for row in task.rows(50 * n, seed):  # the RL task has 7,290 distinct problems: 50 n draws find n fresh ones
        if (prompt := prompt_text(row)) not in seen:
            seen.add(prompt)
            rows.append(row)
            if len(rows) == n:
                return rows
    raise UserError(f"depth_rl: {len(rows)} fresh problems of the task found, {n} requested")


def problem_sets(config: DepthRLBenchConfig) -> tuple[list[dict], list[dict], int]:
    """(test rows, validation rows, number of trained prompts): disjoint from each other and from training."""
    trained = {prompt_text(r) for rows, seed in config.trained_rows for r in RL_TASK.rows(rows, seed)}
    test = fresh_rows(RL_TASK, config.test_rows, config.test_seed, trained)
    val = fresh_rows(RL_TASK, config.val_rows, config.val_seed, trained | {prompt_text(r) for r in test})
    return test, val, len(trained)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation


def train_runs(config: DepthRLBenchConfig) -> dict[str, Path]:
    """Every (alpha, seed) run's model folder; runs that finished before are reused."""
    name = config.alpha_key.rsplit(".", 1)[-1]  # alpha, or exit_cost: what the labels call the swept value
    return {f"{name}={alpha:g} seed={seed}": train(config, config.grpo_config, f"a{alpha:g}_s{seed}", seed,
                                                   [f"{config.alpha_key}={alpha}", *config.overrides])
            for alpha in config.alphas for seed in config.seeds}


def train(config: DepthRLBenchConfig, recipe: str, name: str, seed: int, overrides: list[str]) -> Path:
    """One GRPO run from the SFT model (skipped when its results.json exists) -> its model folder."""
    out = Path(config.output_dir) / name
    if not (out / "results.json").exists():
        logger.info("%s, seed %d -> %s", recipe, seed, out)
        run_grpo(load_config(GRPORecipeConfig, recipe, [
            f"model.path={model_folder(config.sft_model, 'depth_rl.sft_model')}", f"training.seed={seed}",
            f"rollout.seed={seed}", f"training.output_dir={out}", *overrides,
        ]))
    return out / "model"


@dataclass
class Evaluator:
    """Scores model folders on fixed test and validation problems."""

    test: list[dict]
    val: list[dict]
    config: DepthRLBenchConfig

    def points(self, name: str, folder: Path, static: bool = False, sampled: bool = False) -> list[dict[str, Any]]:
        """The folder's Q-exit curve (q picked on validation), and static depths / the sampled policy if asked."""
        section = ModelSection(path=str(folder), device="cpu")
        tokenizer = section.tokenizer()
        model = load_model(section, tokenizer)
        engine = TorchEngine(model, tokenizer=tokenizer, max_batch_size=self.config.batch_size)
        test, val = self.encode(self.test, tokenizer), self.encode(self.val, tokenizer)
        num_loops = model.config.total_ut_steps
        picked = self.pick_q(engine, val, num_loops)
        out = []
        for q in sorted({*self.config.q_grid, picked}):  # no q within the budget: pick_threshold's q = 1.0
            out.append(self.point(name, "q_exit", q, engine, test, DepthConfig(policy="adaptive", exit_threshold=q),
                                  picked=q == picked))
        if sampled:
            out.append(self.point(name, "sampled", 1.0, engine, test, DepthConfig(policy="sampled")))
        if static:
            out += [self.point(name, "static", t, engine, test, DepthConfig(policy="fixed", num_loops=t))
                    for t in range(1, num_loops + 1)]
        return out

    def pick_q(self, engine: TorchEngine, val: list[Example], num_loops: int) -> float:
        """`pick_threshold`'s q for the `max_accuracy_drop` budget, on the validation problems."""
        measured = [("static", num_loops, DepthConfig(policy="fixed", num_loops=num_loops))]
        measured += [("q_exit", q, DepthConfig(policy="adaptive", exit_threshold=q)) for q in self.config.q_grid]
        points = []
        for rule, param, depth in measured:
            s = self.scores(engine, val, depth)
            points.append(FrontierPoint(rule, param, s.avg_loops, math.nan, s.accuracy, 0, s.avg_loops))
        return float(pick_threshold(points, "q_exit", num_loops, max_accuracy_drop=self.config.max_accuracy_drop).param)

    def point(self, name: str, rule: str, param: float, engine, examples, depth, picked: bool = False) -> dict:
        s = self.scores(engine, examples, depth)
        ci = s.intervals()
        return {"method": name, "rule": rule, "param": param, "picked": picked, "accuracy": s.accuracy,
                "accuracy_ci": ci["accuracy"], "avg_loops": s.avg_loops, "avg_loops_ci": ci["avg_loops"]}

    def scores(self, engine: TorchEngine, examples: list[Example], depth: DepthConfig) -> ExampleScores:
        return generation_scores(engine, examples, depth, self.config.max_new_tokens)

    @staticmethod
    def encode(rows: list[dict], tokenizer) -> list[Example]:
        return [encode_row(r, tokenizer, f"problem {i}") for i, r in enumerate(rows)]


def run_depth_rl_bench(config: DepthRLBenchConfig) -> dict[str, Any]:
    test, val, trained = problem_sets(config)
    logger.info("%d test and %d validation problems, none among the %d trained prompts", len(test), len(val), trained)
    runs = train_runs(config)
    evaluator = Evaluator(test, val, config)
    points = evaluator.points("RL model, Stage-I gate", model_folder(config.rl_model, "depth_rl.rl_model"), static=True)
    for seed in config.rl_seeds:
        folder = train(config, config.rl_config, f"rl_s{seed}", seed, ["eval.num_prompts=0", *config.rl_overrides])
        points += evaluator.points(f"RL model seed {seed}, Stage-I gate", folder, static=True)
    points += evaluator.points("Stage II on the RL model", model_folder(config.stage2_model, "depth_rl.stage2_model"))
    for name, folder in runs.items():
        points += evaluator.points(f"depth RL {name}", folder, sampled=True)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"test_rows": len(test), "val_rows": len(val), "trained_prompts": trained, "points": points,
               "curves": {name: curve(Path(folder).parent) for name, folder in runs.items()}}
    (out / "depth_rl.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "depth_rl.md").write_text(markdown(points) + "\n")
    plot(points, out / "depth_rl.png")
    print(markdown(points))
    return results


def curve(run_dir: Path) -> list[dict[str, float]]:
    """Per step: task reward, depth penalty and exit loop from the run's metrics.jsonl."""
    keep = ("step", "rewards/dapo_reward/mean", "rewards/depth_penalty/mean", "mean_exit_loop", "parity/exit_max_abs")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in keep if k in r} for r in rows]


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| method | rule | param | accuracy [95% CI] | avg loops [95% CI] |", "|---|---|---:|---|---|"]
    for p in points:
        (alo, ahi), (llo, lhi) = p["accuracy_ci"], p["avg_loops_ci"]
        mark = " (picked on validation)" if p["picked"] else ""
        lines.append(f"| {p['method']} | {p['rule']}{mark} | {p['param']:g} | {100 * p['accuracy']:.1f}% "
                     f"[{100 * alo:.1f}, {100 * ahi:.1f}] | {p['avg_loops']:.2f} [{llo:.2f}, {lhi:.2f}] |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """One panel per alpha: its seeds' Q-exit curves (lines) and sampled policies (crosses), over the baselines
    (grey: the RL models' Stage-I gate curves; black squares: static depths), 95% intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [m for m in dict.fromkeys(p["method"] for p in points) if m.startswith("depth RL")]
    alphas = list(dict.fromkeys(m.split()[2] for m in runs))
    cols = min(len(alphas), 2)
    rows = -(-len(alphas) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(alphas):]:
        ax.set_visible(False)
    for ax, alpha in zip(axes.flat, alphas, strict=False):
        for p in points:
            if p["rule"] == "static":
                draw(ax, [p], color="black", marker="s", linestyle="none", label="static depths (RL models)")
        for method in dict.fromkeys(p["method"] for p in points if not p["method"].startswith("depth RL")):
            draw(ax, select(points, method, "q_exit"), color="grey", alpha=0.6, label="baselines: Q-exit")
        for i, method in enumerate(m for m in runs if m.split()[2] == alpha):
            color = f"C{i}"
            draw(ax, select(points, method, "q_exit"), color=color, label=f"{method.split()[3]}: Q-exit")
            draw(ax, select(points, method, "sampled"), color=color, marker="x", markersize=7, linestyle="none",
                 label=f"{method.split()[3]}: sampled")
        ax.set_title(f"depth RL, {alpha}")
        ax.set_xlabel("average loops per decoded token")
        handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))  # one entry per label
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("greedy accuracy (%), 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select(points: list[dict[str, Any]], method: str, rule: str) -> list[dict[str, Any]]:
    return sorted((p for p in points if p["method"] == method and p["rule"] == rule), key=lambda p: p["avg_loops"])


def draw(ax, pts: list[dict[str, Any]], **style) -> None:
    if pts:
        yerr = [[100 * (p["accuracy"] - p["accuracy_ci"][0]) for p in pts],
                [100 * (p["accuracy_ci"][1] - p["accuracy"]) for p in pts]]
        ax.errorbar([p["avg_loops"] for p in pts], [100 * p["accuracy"] for p in pts], yerr=yerr, capsize=2,
                    **{"marker": "o", "markersize": 3, **style})


__all__ = ["DepthRLBenchConfig", "run_depth_rl_bench"]
