"""Exact mode against the default kernels, side by side in one process: what bit-for-bit parity costs.

For each dtype, on the same LoopLM and prompts, interleaved over `repeats` rounds (each with its own seed):
  * rollout: our engine's completion tokens per second (wall clock and per CPU second of the process);
  * training: one forward + backward of the replay (prompt + completion, recorded exit steps, with gradients),
    seconds per completion token;
  * the rollout/training gap of each mode's records: max and mean |logp_rollout - logp_train|.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from looplm import LoopLMForCausalLM
from looplm.tiny import tiny_model
from rollout.engine import DepthConfig, RolloutRecord, SamplingConfig
from rollout.parity import check_parity
from rollout.torch_engine import TorchEngine


@dataclass
class ExactBenchConfig:
    size: str = "10m"  # a `looplm.tiny` size (10.2M parameters)
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    prompts: int = 16
    samples: int = 2  # completions per prompt: 32 rows decoded together
    prompt_min_len: int = 16
    prompt_max_len: int = 64
    max_new_tokens: int = 64
    exit_threshold: float | None = None  # None: fixed depth; a q: adaptive depth
    repeats: int = 2
    threads: int = 1
    seed: int = 0


def run_exact_bench(config: ExactBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    g = torch.Generator().manual_seed(config.seed)
    results: dict[str, Any] = {}
    for name in config.dtypes:
        model = tiny_model(config.size, seed=config.seed, gate_std=0.1).to(getattr(torch, name))
        vocab = model.config.vocab_size
        lengths = torch.randint(config.prompt_min_len, config.prompt_max_len + 1, (config.prompts,), generator=g)
        prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]
        results[name] = _compare(model, prompts, config)
    print(markdown(results, config))
    return results


def _compare(model: LoopLMForCausalLM, prompts: list[list[int]], config: ExactBenchConfig) -> dict[str, Any]:
    depth = DepthConfig() if config.exit_threshold is None else DepthConfig("adaptive", exit_threshold=config.exit_threshold)
    totals = {mode: {"tokens": 0, "wall": 0.0, "cpu": 0.0, "train": 0.0, "gaps": []} for mode in ("default", "exact")}
    engine = TorchEngine(model, max_batch_size=config.prompts * config.samples)
    for round_ in range(config.repeats + 1):  # round 0 warms up
        sampling = SamplingConfig(n=config.samples, max_new_tokens=config.max_new_tokens, ignore_eos=True, seed=round_)
        for mode in ("default", "exact"):
            model.config.exact_mode = mode == "exact"
            wall, cpu = time.perf_counter(), time.process_time()
            records = engine.generate(prompts, sampling, depth)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            train = _train_step_seconds(model, records)
            if round_:
                t = totals[mode]
                t["tokens"] += sum(len(r.completion_ids) for r in records)
                t["wall"], t["cpu"], t["train"] = t["wall"] + wall, t["cpu"] + cpu, t["train"] + train
                t["gaps"].append(check_parity(model, records, sampling).stats())
    model.config.exact_mode = False
    out = {}
    for mode, t in totals.items():
        out[mode] = {
            "rollout_tok_per_s": t["tokens"] / t["wall"],
            "rollout_tok_per_cpu_s": t["tokens"] / t["cpu"],
            "train_ms_per_token": 1e3 * t["train"] / t["tokens"],
            "max_abs_gap": max(s.max_abs_gap for s in t["gaps"]),
            "mean_abs_gap": sum(s.mean_abs_gap for s in t["gaps"]) / len(t["gaps"]),
            "tokens": t["tokens"],
        }
    return out


def _train_step_seconds(model: LoopLMForCausalLM, records: list[RolloutRecord]) -> float:
    """Forward + backward of the replay of `records` (what a policy-gradient update runs), in seconds."""
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    steps = torch.full_like(ids, records[0].num_loops)
    for i, r in enumerate(records):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c], mask[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids), 1
        steps[i, p : p + c] = torch.tensor(r.exit_steps)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.enable_grad():
        logits = model(ids, attention_mask=mask, exit_steps=steps, use_cache=False).logits
        logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None].clamp(min=0)).sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def markdown(results: dict[str, Any], config: ExactBenchConfig) -> str:
    lines = [
        "| dtype | mode | rollout tok/s | tok per CPU s | train fwd+bwd ms/token | max abs gap | mean abs gap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dtype, modes in results.items():
        for mode, r in modes.items():
            lines.append(
                f"| {dtype} | {mode} | {r['rollout_tok_per_s']:.0f} | {r['rollout_tok_per_cpu_s']:.0f} | "
                f"{r['train_ms_per_token']:.2f} | {r['max_abs_gap']:.2g} | {r['mean_abs_gap']:.2g} |"
            )
        d, e = modes["default"], modes["exact"]
        lines.append(
            f"| {dtype} | exact / default | {e['rollout_tok_per_s'] / d['rollout_tok_per_s']:.2f}x | "
            f"{e['rollout_tok_per_cpu_s'] / d['rollout_tok_per_cpu_s']:.2f}x | "
            f"{e['train_ms_per_token'] / d['train_ms_per_token']:.2f}x | | |"
        )
    rows = config.prompts * config.samples
    lines.append(f"\n{rows} rows decoded together, {config.max_new_tokens} new tokens each, {config.repeats} rounds.")
    return "\n".join(lines)


__all__ = ["ExactBenchConfig", "run_exact_bench"]
