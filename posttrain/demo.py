"""The one-command CPU demo (`python run.py`): SFT a tiny LoopLM, roll it out in Ray actors, check parity.

    python run.py                      # or: python run.py demo key=value ...

Phases: (1) reasoning SFT of a tiny LoopLM on synthetic arithmetic traces with Ouro's Stage-I objective, so
the exit gate learns with the LM (`configs/sft_tiny.yaml`); (2) held-out prompts sampled through the Ray
actor pool at fixed depth and at adaptive depth (Q-exit); (3) every completion scored with DAPO's
`Answer:` reward and checked for a well-formed think block; (4) every completion replayed by the training
forward with its recorded exit steps: the rollout/training log-prob gap, per depth policy.
A few minutes on 2 cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from configs import CONFIG_DIR, load_config, save_config
from looplm import LoopLMForCausalLM
from posttrain.sft import SFTRecipeConfig, is_well_formed, run_sft
from posttrain.synthetic import arithmetic_traces
from rewards.dapo import dapo_score
from rollout.engine import mean_loops_per_token


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    sft_config: str = str(CONFIG_DIR / "sft_tiny.yaml")
    # Applied on top of sft_config: Stage I trains the gate, so adaptive depth has something to read.
    sft_overrides: list[str] = field(
        default_factory=lambda: ["objective.kind=stage1", "objective.beta=0.05", "training.max_steps=300"]
    )
    num_prompts: int = 32  # fresh problems, generated with a seed the SFT data did not use
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    exit_threshold: float = 0.6  # Q-exit threshold q for the adaptive rollouts
    num_actors: int = 2
    seed: int = 1234


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from rollout import DepthConfig, PoolConfig, RolloutPool, SamplingConfig, check_parity

    out = Path(config.output_dir)
    save_config(config, out / "demo_config.yaml")
    print("== 1. reasoning SFT (Stage-I objective: LM and exit gate together)")
    sft_overrides = [*config.sft_overrides, f"training.output_dir={out / 'sft'}"]
    sft = run_sft(load_config(SFTRecipeConfig, config.sft_config, sft_overrides))
    model_dir = out / "sft"

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    problems = arithmetic_traces(config.num_prompts, seed=config.seed)
    prompts = [row["prompt"] for row in problems]
    truths = [row["ground_truth"] for row in problems for _ in range(config.samples_per_prompt)]
    sampling = SamplingConfig(
        n=config.samples_per_prompt, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
        seed=config.seed, stop_token_ids=[tokenizer.eos_token_id],
    )
    policies = {
        "fixed (T loops)": DepthConfig(policy="fixed"),
        f"adaptive (q={config.exit_threshold})": DepthConfig(policy="adaptive", exit_threshold=config.exit_threshold),
    }
    trainer_view = LoopLMForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    print(f"\n== 2-4. rollouts in {config.num_actors} Ray actors, rewards, and parity with the training forward")
    report: dict[str, Any] = {"sft": {k: sft.get(k) for k in ("eval_before", "eval_after", "sample")}}
    with RolloutPool(model_dir, PoolConfig(num_actors=config.num_actors), tokenizer=tokenizer) as pool:
        for name, depth in policies.items():
            records = pool.generate(prompts, sampling, depth)
            texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in records]
            gaps = check_parity(trainer_view, records, sampling).stats()
            report[name] = {
                "completions": len(records),
                "reward_accuracy": sum(dapo_score(t, gt) > 0 for t, gt in zip(texts, truths, strict=True)) / len(texts),
                "well_formed": sum(is_well_formed(t, r.finish_reason) for t, r in zip(texts, records, strict=True))
                / len(texts),
                "mean_loops_per_token": mean_loops_per_token(records),
                "parity": gaps.to_dict(),
                "example": texts[0],
            }
    _print_report(report)
    (out / "demo_results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def _last_loop_ce(metrics: dict[str, float]) -> float:
    """`eval_loss` under Stage I includes -beta * H; the last loop's cross-entropy is comparable."""
    loops = [int(k.removeprefix("eval_ce_loop")) for k in metrics if k.startswith("eval_ce_loop")]
    return float(metrics[f"eval_ce_loop{max(loops)}"]) if loops else float("nan")


def _print_report(report: dict[str, Any]) -> None:
    before, after = report["sft"].get("eval_before") or {}, report["sft"].get("eval_after") or {}
    print(f"\nheld-out cross-entropy at the last loop: {_last_loop_ce(before):.3f} -> {_last_loop_ce(after):.3f}")
    print(f"{'depth policy':<22} {'reward acc':>10} {'well-formed':>11} {'loops/token':>11} {'max|dlogp|':>11} {'mean|dlogp|':>11}  tokens")
    for name, row in report.items():
        if name == "sft":
            continue
        p = row["parity"]
        print(
            f"{name:<22} {row['reward_accuracy']:>10.2f} {row['well_formed']:>11.2f} {row['mean_loops_per_token']:>11.2f}"
            f" {p['max_abs_gap']:>11.2e} {p['mean_abs_gap']:>11.2e}  {p['tokens']}"
        )
    print("(fp32: the gaps are rounding, which trained weights amplify; in fp64 the replay is exact,"
          " tests/looplm/test_model.py::test_cached_decoding_is_the_same_function_in_float64)")
    first = next(row for name, row in report.items() if name != "sft")
    print(f"\nexample completion:\n{first['example']}")
