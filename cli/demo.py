"""The one-command CPU demo (`python run.py`): SFT -> RL -> gate tuning on a tiny LoopLM, with a report.

    python run.py                      # or: python run.py demo key=value ...; fresh=true starts over

Stages (each a recipe run with its shipped config plus the overrides below; a finished stage is reused):
  1. reasoning SFT with Ouro's Stage-I objective (LM and exit gate together) on the CPU RL task: sums of digits
     mod 10, traces from a sloppy teacher that skips the final `mod` half the time (configs/sft_tiny.yaml);
  2. GRPO/DAPO through 2 Ray rollout actors at adaptive depth, every completion's exit loops replayed by the
     update, the rollout/trainer gap measured every step (configs/grpo_tiny.yaml);
  3. Stage-II gate tuning of the RL model with the LM frozen, and the depth/accuracy frontier
     (configs/gate_tiny.yaml);
then a report: accuracy after each stage, the per-step parity gap, average loops, time per stage, written under
`outputs/demo/` with the plots (the RL learning curve with its gap; the frontier).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs import CONFIG_DIR, load_config, save_config
from configs.inputs import DEMO_OUTPUT_DIR

logger = logging.getLogger(__name__)

RL_TASK = ["data.task.operators=+", "data.task.modulus=10"]


@dataclass
class DemoConfig:
    output_dir: str = DEMO_OUTPUT_DIR
    fresh: bool = False  # true: delete earlier stages' outputs and run every stage again
    sft_config: str = str(CONFIG_DIR / "sft_tiny.yaml")
    sft_overrides: list[str] = field(default_factory=lambda: [
        *RL_TASK, "data.task.skip_reduction=0.5", "objective.kind=stage1", "objective.beta=0.05",
        "training.max_steps=900", "training.save_strategy=no", "sample.num_prompts=0", "training.disable_tqdm=false",
    ])
    grpo_config: str = str(CONFIG_DIR / "grpo_tiny.yaml")
    grpo_overrides: list[str] = field(default_factory=list)
    gate_config: str = str(CONFIG_DIR / "gate_tiny.yaml")
    gate_overrides: list[str] = field(default_factory=lambda: [
        # 512 of the 1,536 training rows validate the gate snapshots: at 128 rows (one row = 0.8 points) the
        # Stage-I gate's q = 0.4 read 2.6 points below static depth; at 512 it is above, as on the test rows
        *RL_TASK, "data.train_rows=1536", "data.val_rows=512", "training.select_every=50", "data.eval_rows=128",
        "training.max_steps=100",
        "eval.q_grid=[0.2,0.4,0.6,0.8,0.9]", "eval.hidden_eps_grid=[0.05,0.2]", "eval.kv_modes=[full,last]",
        "training.disable_tqdm=true",
    ])


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from gate_tuning.recipe import GateRecipeConfig, run_gate
    from posttrain.grpo_recipe import GRPORecipeConfig, run_grpo
    from posttrain.sft_recipe import SFTRecipeConfig, run_sft

    quiet_terminal()
    out = Path(config.output_dir)
    if config.fresh and out.exists():
        shutil.rmtree(out)
    save_config(config, out / "demo_config.yaml")
    sft_dir, grpo_dir, gate_dir = out / "sft", out / "grpo", out / "gate"
    seconds: dict[str, float] = {}

    sft_cfg = load_config(SFTRecipeConfig, config.sft_config, [*config.sft_overrides, f"training.output_dir={sft_dir}"])
    sft = _stage("1/3 reasoning SFT (Stage-I objective)", sft_dir / "sft_results.json", seconds,
                 lambda: run_sft(sft_cfg))
    grpo_cfg = load_config(GRPORecipeConfig, config.grpo_config, [
        *config.grpo_overrides, f"model.path={sft_dir}", f"training.output_dir={grpo_dir}",
    ])
    grpo = _stage("2/3 GRPO through Ray rollout actors, exit replay", grpo_dir / "results.json", seconds,
                  lambda: run_grpo(grpo_cfg))
    gate_cfg = load_config(GateRecipeConfig, config.gate_config, [
        *config.gate_overrides, f"model.path={grpo_dir / 'model'}", f"training.output_dir={gate_dir}",
    ])
    gate = _stage("3/3 Stage-II gate tuning and the frontier", gate_dir / "results.json", seconds,
                  lambda: _printing_into(gate_dir / "trainer_log.txt", lambda: run_gate(gate_cfg)))

    metrics = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    report = build_report(sft, grpo, gate, metrics, seconds)
    plot_rl_curve(metrics, out / "rl_curve.png")
    (out / "demo_results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    text = render_report(report, gate_dir)
    (out / "report.md").write_text(text)
    print(text)
    return report


def quiet_terminal() -> None:
    """Progress bars for the stages' work only (none for dataset maps or weight loading), and neither per-point
    lines nor the table from the frontier (the report holds its table)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("gate_tuning.frontier").setLevel(logging.WARNING)
    # The gate recipe logs its frontier table when it ends; the demo's report prints that table once, after it.
    logging.getLogger("gate_tuning.recipe").addFilter(lambda record: not str(record.msg).startswith("frontier ("))


def _printing_into(path: Path, run):
    """Run with stdout going to `path`: the gate recipe's trainer prints transformers' log dicts there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as sink, contextlib.redirect_stdout(sink):
        return run()


def _stage(title: str, results_file: Path, seconds: dict[str, float], run) -> dict[str, Any]:
    """Run a stage unless its results file says it finished before (then read them back)."""
    name = title.split(" ", 1)[1]
    if results_file.exists():
        logger.info("%s: reusing %s (fresh=true reruns it)", name, results_file.parent)
        seconds[name] = float("nan")
        return json.loads(results_file.read_text())
    print(f"== {title}", flush=True)
    start = time.perf_counter()
    results = run()
    seconds[name] = time.perf_counter() - start
    return results


def build_report(sft, grpo, gate, metrics: list[dict], seconds: dict[str, float]) -> dict[str, Any]:
    before, after = grpo.get("before", {}), grpo.get("after", {})
    chosen = gate.get("chosen_point", {})
    return {
        "accuracy": {
            "after SFT": _acc(before),
            "after RL": _acc(after),
            "after gate tuning": {"greedy": chosen.get("accuracy"), "avg_loops": chosen.get("avg_loops"),
                                  "q": chosen.get("param")},
            "static 4 loops (gate's held-out set)": {"greedy": gate.get("static_T", {}).get("accuracy"),
                                                     "avg_loops": gate.get("static_T", {}).get("avg_loops")},
        },
        "parity": {
            "max_abs (max over steps)": max(m["parity_max_abs"] for m in metrics),
            "mean_abs (max over steps)": max(m["parity_mean_abs"] for m in metrics),
            "steps": len(metrics),
        },
        "mean_exit_loop_during_rl": sum(m["mean_exit_loop"] for m in metrics) / len(metrics),
        "seconds": seconds,
        "sft_eval_ce": {k: v for k, v in (sft.get("eval_after") or {}).items() if k.startswith("eval_ce_loop")},
    }


def _acc(block: dict) -> dict[str, Any]:
    greedy, sampled = block.get("greedy", {}), block.get("sampled", {})
    return {"greedy": greedy.get("accuracy"), "sampled": sampled.get("accuracy"),
            "avg_loops": greedy.get("mean_loops_per_token")}


def render_report(report: dict[str, Any], gate_dir: Path) -> str:
    rows = ["| stage | greedy accuracy | sampled accuracy | avg loops per token |", "|---|---:|---:|---:|"]
    for stage, acc in report["accuracy"].items():
        rows.append(f"| {stage} | {_fmt(acc.get('greedy'))} | {_fmt(acc.get('sampled'))} | {_fmt(acc.get('avg_loops'))} |")
    p = report["parity"]
    lines = [
        "# LoopRL demo report", "",
        "Held-out accuracy on 200 problems (adaptive depth, Q-exit q = 0.6, for SFT and RL; the gate row is the "
        "Stage-II gate at the q it picked, on its own held-out set):", "", *rows, "",
        f"Rollout/trainer gap over {p['steps']} RL steps (fp32): max |dlogp| {p['max_abs (max over steps)']:.2e}, "
        f"mean {p['mean_abs (max over steps)']:.2e}; mean exit loop during RL "
        f"{report['mean_exit_loop_during_rl']:.2f} of 4.", "",
        "Time per stage (s): " + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in report["seconds"].items()), "",
        "Plots: rl_curve.png (reward and parity gap per step), gate/frontier.png (accuracy and loss vs loops).", "",
    ]
    frontier = gate_dir / "frontier.md"
    if frontier.exists():
        lines += ["## Depth/accuracy frontier", "", frontier.read_text()]
    return "\n".join(lines)


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def plot_rl_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [m["reward_mean"] for m in metrics], marker=".")
    top.set_ylabel("reward (DAPO, +1/-1)")
    top.set_title("GRPO on the CPU task: reward and rollout/trainer gap per step")
    top.grid(alpha=0.3)
    bottom.semilogy(steps, [m["parity_max_abs"] for m in metrics], marker=".", label="max |dlogp|")
    bottom.semilogy(steps, [max(m["parity_mean_abs"], 1e-12) for m in metrics], marker=".", label="mean |dlogp|")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("rollout vs update log-prob gap")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DemoConfig", "run_demo"]
