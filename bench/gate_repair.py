"""Stage II from a broken or stale gate (issue 24): does calibration repair it?

    python run.py                                          # the demo: outputs/demo/grpo/model and outputs/demo/sft
    python run.py bench "benchmarks=[gate_repair]"         # zeroed, random, exit1 and stale starts

Each start is a copy of `model` whose exit gate (`model.early_exit_gate.*`, nothing else) is replaced:
- zeroed: weight 0, bias -3 (lambda = 0.047 at every loop: every token runs all loops at q >= 0.2);
- random: weight ~ N(0, 0.3^2), bias 0 (seeded);
- exit1: weight 0, bias +6 (every token exits at loop 1 at any q < 1);
- stale: the gate of `stale_from` (the SFT model's Stage-I gate, on the RL model's LM).
The gate recipe (`gate_config` with the demo's overrides) then tunes it, and the table says, per start, the
frontier before and after against static depth, and the issue's two checks on the held-out set:
- `reach`: a tuned point at 70% of T loops or fewer within 1 point of static T's accuracy;
- `floor`: no tuned point more than 1 point below the static-depth frontier (the worst gap is shown).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cli.demo import DemoConfig
from configs import UserError, load_config
from configs.inputs import model_folder
from gate_tuning.recipe import TUNED, UNTUNED, GateRecipeConfig, run_gate
from gate_tuning.stage2 import GATE_PREFIX

STARTS = ("zeroed", "random", "exit1", "stale")
WEIGHTS = "model.safetensors"


@dataclass
class GateRepairBenchConfig:
    model: str = "outputs/demo/grpo/model"  # the LM whose gate is broken (the demo's RL model)
    stale_from: str = "outputs/demo/sft"  # the stale start's gate comes from here (the demo's SFT model)
    starts: list[str] = field(default_factory=lambda: list(STARTS))
    gate_config: str = DemoConfig.gate_config
    overrides: list[str] = field(default_factory=lambda: list(DemoConfig().gate_overrides))
    output_dir: str = "runs/gate_repair"
    seed: int = 0  # the random start's gate

    def __post_init__(self) -> None:
        unknown = sorted(set(self.starts) - set(STARTS))
        if unknown:
            raise ValueError(f"gate_repair.starts: unknown start(s) {unknown}; expected some of {list(STARTS)}")


def broken_gate(start: str, gate: dict[str, torch.Tensor], stale: Path, seed: int) -> dict[str, torch.Tensor]:
    """The gate tensors (names as in the checkpoint) of one broken start."""
    weight, bias = gate[GATE_PREFIX + "weight"], gate[GATE_PREFIX + "bias"]
    if start == "stale":
        return {name: t for name, t in load_file(str(stale / WEIGHTS)).items() if name.startswith(GATE_PREFIX)}
    if start == "random":
        generator = torch.Generator().manual_seed(seed)
        return {GATE_PREFIX + "weight": 0.3 * torch.randn(weight.shape, generator=generator).to(weight.dtype),
                GATE_PREFIX + "bias": torch.zeros_like(bias)}
    return {GATE_PREFIX + "weight": torch.zeros_like(weight),
            GATE_PREFIX + "bias": torch.full_like(bias, -3.0 if start == "zeroed" else 6.0)}


def write_start(source: Path, out: Path, start: str, stale: Path, seed: int) -> Path:
    """A copy of the checkpoint folder `source` with the gate of `start`; every other tensor as it was."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    tensors = load_file(str(source / WEIGHTS))
    gate = {name: t for name, t in tensors.items() if name.startswith(GATE_PREFIX)}
    if not gate:
        raise UserError(f"{source / WEIGHTS}: no {GATE_PREFIX}* tensors; expected a LoopLM checkpoint with an exit gate")
    tensors.update(broken_gate(start, gate, stale, seed))
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def summarize_start(start: str, results: dict[str, Any], num_loops: int) -> dict[str, Any]:
    """The issue's two checks on the held-out frontier (accuracy) of the tuned gate."""
    static_t = results["static_T"]["accuracy"]
    tuned = [p for p in results["points"] if p["rule"] == TUNED]
    before = [p for p in results["points"] if p["rule"] == UNTUNED]
    reach = [p for p in tuned if p["avg_loops"] <= 0.7 * num_loops and p["accuracy"] >= static_t - 0.01 - 1e-9]
    worst = results["tuned_vs_static"]["min_gap"] if results["tuned_vs_static"] else None
    chosen = results["chosen_point"]
    return {
        "start": start, "static_T": static_t, "kept": results["gate_selection"]["kept"],
        "start_points": [(p["param"], p["avg_loops"], p["accuracy"]) for p in before],
        "tuned_points": [(p["param"], p["avg_loops"], p["accuracy"]) for p in tuned],
        "reach": bool(reach), "reach_point": min(reach, key=lambda p: p["avg_loops"]) if reach else None,
        "worst_gap_to_static": worst, "floor": worst is not None and worst >= -0.01 - 1e-9,
        "chosen": {"q": chosen["param"], "avg_loops": chosen["avg_loops"], "accuracy": chosen["accuracy"]},
    }


def run_gate_repair_bench(config: GateRepairBenchConfig) -> dict[str, Any]:
    source = model_folder(config.model, "gate_repair.model")
    stale = model_folder(config.stale_from, "gate_repair.stale_from")
    out = Path(config.output_dir)
    rows = []
    for start in config.starts:
        folder = write_start(source, out / f"start_{start}", start, stale, config.seed)
        gate_cfg = load_config(GateRecipeConfig, config.gate_config, [
            *config.overrides, f"model.path={folder}", f"training.output_dir={out / f'gate_{start}'}",
        ])
        results = run_gate(gate_cfg)
        num_loops = int(results["static_T"]["param"])
        rows.append(summarize_start(start, results, num_loops))
        print(json.dumps(rows[-1], default=float))
    print(markdown(rows))
    return {"config": config.__dict__, "starts": rows}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| start | static T | kept snapshot | chosen q: loops, accuracy | 70%-of-T point within 1 point | "
             "worst gap to static |", "|---|---:|---|---|---|---:|"]
    for r in rows:
        c, p = r["chosen"], r["reach_point"]
        reach = f"yes: q {p['param']}, {p['avg_loops']:.2f} loops, {100 * p['accuracy']:.1f}%" if p else "no"
        worst = "n/a" if r["worst_gap_to_static"] is None else f"{100 * r['worst_gap_to_static']:+.1f} pt"
        lines.append(f"| {r['start']} | {100 * r['static_T']:.1f}% | {r['kept']} | q {c['q']}: "
                     f"{c['avg_loops']:.2f}, {100 * c['accuracy']:.1f}% | {reach} | {worst} |")
    return "\n".join(lines)


__all__ = ["GateRepairBenchConfig", "run_gate_repair_bench"]
