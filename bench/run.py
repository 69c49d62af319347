"""`python run.py bench [benchmarks=[rollout,loss_memory,...]] [<name>.key=value ...]`: run benchmarks by name.

Each benchmark compares against its baseline inside the same run and returns its results, which are saved
as JSON under `output_dir` (one file per benchmark) and printed as the Markdown tables of BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.depth_rl import DepthRLBenchConfig
from bench.exact_bench import ExactBenchConfig
from bench.gate_repair import GateRepairBenchConfig
from bench.loss_memory import LossMemoryBenchConfig
from bench.ouro_cpu import OuroCPUBenchConfig
from bench.rollout_bench import RolloutBenchConfig
from bench.weight_sync import WeightSyncBenchConfig
from configs import save_config

# name -> (module, function taking this benchmark's section of BenchConfig)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "rollout": ("bench.rollout_bench", "run_rollout_bench"),
    "loss_memory": ("bench.loss_memory", "run_loss_memory_bench"),
    "ouro_cpu": ("bench.ouro_cpu", "run_ouro_cpu_bench"),
    "exact": ("bench.exact_bench", "run_exact_bench"),
    "weight_sync": ("bench.weight_sync", "run_weight_sync_bench"),
    "gate_repair": ("bench.gate_repair", "run_gate_repair_bench"),
    "depth_rl": ("bench.depth_rl", "run_depth_rl_bench"),
}


@dataclass
class BenchConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["rollout"])
    rollout: RolloutBenchConfig = field(default_factory=RolloutBenchConfig)
    loss_memory: LossMemoryBenchConfig = field(default_factory=LossMemoryBenchConfig)
    ouro_cpu: OuroCPUBenchConfig = field(default_factory=OuroCPUBenchConfig)
    exact: ExactBenchConfig = field(default_factory=ExactBenchConfig)
    weight_sync: WeightSyncBenchConfig = field(default_factory=WeightSyncBenchConfig)
    gate_repair: GateRepairBenchConfig = field(default_factory=GateRepairBenchConfig)
    depth_rl: DepthRLBenchConfig = field(default_factory=DepthRLBenchConfig)
    output_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.benchmarks) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")


def run_bench(config: BenchConfig) -> dict[str, Any]:
    results = {}
    save_config(config, Path(config.output_dir) / "bench_config.yaml")  # the resolved config beside the results
    for name in config.benchmarks:
        module, function = BENCHMARKS[name]
        results[name] = getattr(importlib.import_module(module), function)(getattr(config, name))
        out = Path(config.output_dir) / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results[name], indent=2) + "\n")
        print(f"{name}: results saved to {out}")
    return results


__all__ = ["BENCHMARKS", "BenchConfig", "run_bench"]
