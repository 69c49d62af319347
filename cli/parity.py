"""`run.py parity`: generate, replay with the training forward, print the log-prob gap and KL overall and per
depth policy (exit status 1 above `max_gap`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cli.init import parameter_count
from cli.rollout import PromptsConfig, engine_for, folder_tokenizer, load_prompts
from configs import save_config
from configs.inputs import model_folder
from looplm import LoopLMForCausalLM
from posttrain.recipe_parts import close_engine
from rollout.engine import DepthConfig, SamplingConfig, mean_loops_per_token
from rollout.parity import TokenGaps, check_parity
from rollout.pool import PoolConfig


@dataclass
class ParityRecipeConfig:
    model: str = "runs/looplm-random-tiny"  # an existing model folder
    tokenizer: str | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(seed=0, return_distributions=True))
    policies: list[DepthConfig] = field(
        default_factory=lambda: [DepthConfig(), DepthConfig(policy="adaptive", exit_threshold=0.6)]
    )
    engine: Literal["torch", "pool"] = "pool"
    pool: PoolConfig = field(default_factory=PoolConfig)
    replay_batch_size: int = 8
    max_gap: float = 1e-5  # fail (exit 1) when a full-cache policy's max |dlogp| exceeds this
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the weights, in the engine and the training forward
    exact_mode: bool = False  # batch-invariant kernels on both sides (looplm.batch_invariant): expect a gap of 0
    grad: bool = False  # run the training forward with gradients enabled, as an update does
    output: str | None = "runs/parity.json"

    def check(self) -> None:
        if not self.policies:
            raise ValueError("policies is empty: give at least one depth policy to compare")
        if self.replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {self.replay_batch_size}")
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap}")



def run_parity(config: ParityRecipeConfig) -> dict[str, Any]:
    folder = model_folder(config.model)
    tokenizer = folder_tokenizer(folder, config.tokenizer)
    dtype = getattr(torch, config.dtype)
    trainer_model = LoopLMForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()  # the training forward
    trainer_model.config.exact_mode = config.exact_mode
    prompts = load_prompts(config.prompts, trainer_model.config.vocab_size)
    # The folder's own config says neither: the engine gets this model's (weights, dtype and switch shipped along).
    source = trainer_model if config.exact_mode or config.dtype != "float32" else folder
    engine = engine_for(config.engine, source, tokenizer, config.pool, config.policies[0])
    where = f"{config.engine}" + (f" ({config.pool.num_actors} actors)" if config.engine == "pool" else "")
    report: dict[str, Any] = {
        "model": str(folder), "parameters": parameter_count(trainer_model), "engine": where, "dtype": config.dtype,
        "exact_mode": config.exact_mode, "grad": config.grad, "policies": {},
    }
    parts: list[TokenGaps] = []
    try:
        for depth in config.policies:
            records = engine.generate(prompts, config.sampling, depth)
            with torch.set_grad_enabled(config.grad):
                gaps = check_parity(trainer_model, records, config.sampling, config.replay_batch_size)
            parts.append(gaps)
            exits = Counter(e for r in records for e in r.exit_steps)
            report["policies"][depth.label()] = {
                **gaps.stats().to_dict(),
                "exact_replay": depth.kv_mode == "full",
                "exit_steps": dict(sorted(exits.items())),
                "mean_loops_per_token": mean_loops_per_token(records),
            }
    finally:
        close_engine(engine)
    exact = [g for g, depth in zip(parts, config.policies, strict=True) if depth.kv_mode == "full"]
    if exact:  # the invariant covers the replayable (full-cache) policies only
        report["overall"] = TokenGaps.cat(exact).stats().to_dict()
    _print_parity(report)
    if config.output:
        save_config(config, Path(config.output).with_suffix(".config.yaml"))
        Path(config.output).write_text(json.dumps(report, indent=2) + "\n")
    failed = [
        name
        for name, s in report["policies"].items()
        if s["exact_replay"] and (s["max_abs_gap"] > config.max_gap or s["filtered_tokens"])
    ]
    if failed:
        raise SystemExit(f"parity FAILED: max |dlogp| above {config.max_gap:g} for {failed}")
    return report


def _print_parity(report: dict[str, Any]) -> None:
    print(f"parity: {report['parameters'] / 1e6:.2f}M-parameter LoopLM, rollouts from {report['engine']}")
    print(f"{'policy':32s} {'tokens':>7s} {'max|dlogp|':>11s} {'mean|dlogp|':>12s} {'mean KL':>11s} {'filtered':>8s} {'support':>7s}  exit steps")
    rows = list(report["policies"].items())
    if "overall" in report:
        rows.append(("overall (full-cache policies)", report["overall"]))
    for name, s in rows:
        print(
            f"{name:32s} {s['tokens']:7d} {s['max_abs_gap']:11.3e} {s['mean_abs_gap']:12.3e} {s['mean_kl']:11.3e} "
            f"{s['filtered_tokens']:8d} {s['support_changes']:7d}  {s.get('exit_steps', '')} (KL {s['kl']})"
        )



__all__ = ["ParityRecipeConfig", "run_parity"]
