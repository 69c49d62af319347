"""Ouro-1.4B at its real size on this CPU: 2 LoRA SFT steps and 1 LoRA GRPO step, time and peak memory.

The model is built with random weights from Ouro-1.4B's config (24 layers, hidden 2048, FFN 5632, 16 heads,
vocab 49,152, T = 4; docs: looplm-facts.md): 1.44B parameters, 5.8 GB in fp32. Nothing is downloaded: the tokenizer is the tiny
recipes' byte-level BPE (its ids fit the 49,152-row embedding), the data the synthetic arithmetic task, so the
sequences are short. Each stage runs in its own subprocess through the recipes' own pieces
(`posttrain.sft_recipe.make_trainer`; `posttrain.grpo_recipe`'s data, engine and LoRA builders with `LoopGRPOTrainer`), with
its peak RSS (`ru_maxrss`) reported: the SFT stage holds one model; the GRPO stage holds the policy and the
rollout engine's copy (our engine, in process; the Ray pool would add one copy per actor).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from configs import CONFIG_DIR

OURO_1_4B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, total_ut_steps=4, max_position_embeddings=4096)


@dataclass
class OuroCPUBenchConfig:
    threads: int = 2
    seed: int = 0
    # LoopLMConfig fields changed from Ouro-1.4B's (e.g. {num_hidden_layers: 1} for a quick check of the script)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Weights' dtype per stage. GRPO holds the policy, the engine's copy and the merged weights synced to it
    # (three copies of 1.4B parameters): 17+ GB in fp32, more than a 24 GB machine shared with other jobs had
    # free; bf16 halves it (the LoRA adapters stay fp32).
    sft_dtype: Literal["float32", "bfloat16"] = "float32"
    grpo_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    sft_overrides: list[str] = field(default_factory=lambda: [
        "lora.enabled=true", "lora.r=8", "lora.alpha=16", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "training.max_length=64", "training.logging_steps=1",
        "training.save_strategy=no", "data.synthetic_rows=64", "data.eval_rows=8",
    ])
    grpo_overrides: list[str] = field(default_factory=lambda: [
        "rollout.engine=torch", "rollout.depth.policy=adaptive", "model.lora.enabled=true", "model.lora.r=8",
        "model.lora.alpha=16", "training.max_steps=1", "training.per_device_train_batch_size=4",
        "training.num_generations=4", "training.max_completion_length=16", "training.save_strategy=no",
        "training.report_to=none", "eval.num_prompts=0", "data.synthetic_rows=64", "data.eval_rows=8",
    ])
    stages: list[str] = field(default_factory=lambda: ["sft", "grpo"])


def run_ouro_cpu_bench(config: OuroCPUBenchConfig) -> dict[str, Any]:
    unknown = sorted(set(config.stages) - {"sft", "grpo"})
    if unknown:
        raise ValueError(f"ouro_cpu.stages: unknown {unknown}; known: ['sft', 'grpo']")
    results: dict[str, Any] = {"model": {**OURO_1_4B, **config.model_overrides}, "config": asdict(config)}
    for stage in config.stages:
        results[stage] = _subprocess(stage, config)
    print_markdown(results)
    return results


def _subprocess(stage: str, config: OuroCPUBenchConfig) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.ouro_cpu", stage, json.dumps(asdict(config))],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ouro_cpu {stage} subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _build_model(config: OuroCPUBenchConfig, dtype: str):
    """-> (the random Ouro-1.4B LoopLM in `dtype`, seconds to build it)."""
    import time

    import torch

    from looplm import LoopLMConfig, LoopLMForCausalLM

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = LoopLMForCausalLM(LoopLMConfig(**{**OURO_1_4B, **config.model_overrides})).to(getattr(torch, dtype))
    return model, time.perf_counter() - start


def _sft_stage(config: OuroCPUBenchConfig) -> dict[str, Any]:
    import time

    from configs import load_config
    from looplm.tokenizer import build_tokenizer, fix_ouro_special_tokens
    from posttrain.data import corpus_of
    from posttrain.sft_recipe import SFTRecipeConfig, load_sft_data, make_trainer

    cfg = load_config(SFTRecipeConfig, CONFIG_DIR / "sft_tiny.yaml",
                      [*config.sft_overrides, "training.output_dir=runs/bench/ouro_cpu_sft"])
    data = load_sft_data(cfg.data)
    tokenizer = build_tokenizer(corpus_of(data.train), vocab_size=cfg.model.tokenizer_vocab_size)
    model, build_s = _build_model(config, config.sft_dtype)
    fix_ouro_special_tokens(tokenizer, model)
    trainer = make_trainer(cfg, model, tokenizer, data)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = sum(len(ids) for ids in trainer.train_dataset.select(range(cfg.training.per_device_train_batch_size))["input_ids"])
    return {"parameters": sum(p.numel() for p in model.parameters()), "build_s": build_s,
            "steps": trainer.state.global_step, "train_s": train_s, "s_per_step": train_s / trainer.state.global_step,
            "tokens_first_batch": tokens, "losses": losses, "peak_rss_gb": _peak_gb()}


def _grpo_stage(config: OuroCPUBenchConfig) -> dict[str, Any]:
    import time

    from configs import load_config
    from looplm.tokenizer import CHAT_TEMPLATE, build_tokenizer, fix_ouro_special_tokens
    from posttrain.data import load_rows
    from posttrain.grpo_recipe import GRPORecipeConfig, load_grpo_data, rollout_engine
    from posttrain.grpo_trainer import LoopGRPOTrainer
    from posttrain.recipe_parts import lora_config
    from rewards import get_reward_funcs

    cfg = load_config(GRPORecipeConfig, CONFIG_DIR / "grpo_tiny.yaml",
                      [*config.grpo_overrides, "training.output_dir=runs/bench/ouro_cpu_grpo"])
    train, _ = load_grpo_data(cfg.data)
    corpus = [m["content"] for row in load_rows("synthetic", synthetic_rows=256, task=cfg.data.task)["messages"]
              for m in row]
    tokenizer = build_tokenizer(corpus)
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
    model, build_s = _build_model(config, config.grpo_dtype)
    fix_ouro_special_tokens(tokenizer, model)
    model.model.early_exit_gate.requires_grad_(False)
    engine = rollout_engine(cfg.rollout, model, "", tokenizer)
    trainer = LoopGRPOTrainer(
        model=model, reward_funcs=get_reward_funcs(cfg.rewards.names, **cfg.rewards.options), args=cfg.training,
        train_dataset=train, processing_class=tokenizer, peft_config=lora_config(cfg.model.lora),
        engine=engine, depth=cfg.rollout.depth, loop=cfg.loop, dynamic_sampling=cfg.dynamic_sampling,
        rollout_seed=cfg.rollout.seed,
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logged = next(e for e in trainer.state.log_history if "reward" in e)
    keys = ("parity/max_abs", "loops/mean_exit_loop", "completions/mean_length")
    return {"build_s": build_s, "steps": trainer.state.global_step, "train_s": train_s,
            "completions": cfg.training.per_device_train_batch_size, **{k: logged.get(k) for k in keys},
            "peak_rss_gb": _peak_gb()}


def print_markdown(results: dict[str, Any]) -> None:
    c = results["config"]
    print("\n| stage | weights | steps | seconds (training) | seconds per step | peak RSS (GB) |\n"
          "|---|---|---:|---:|---:|---:|")
    for stage in ("sft", "grpo"):
        r = results.get(stage)
        if r:
            print(f"| {stage} (LoRA) | {c[stage + '_dtype']} | {r['steps']} | {r['train_s']:.0f} | "
                  f"{r['train_s'] / r['steps']:.0f} | {r['peak_rss_gb']:.1f} |")


if __name__ == "__main__":
    import logging

    import torch

    logging.disable(logging.WARNING)  # the table is the output; TRL's and transformers' notices are not
    bench = OuroCPUBenchConfig(**json.loads(sys.argv[2]))
    torch.set_num_threads(bench.threads)
    print(json.dumps(_sft_stage(bench) if sys.argv[1] == "sft" else _grpo_stage(bench), default=float))


__all__ = ["OURO_1_4B", "OuroCPUBenchConfig", "run_ouro_cpu_bench"]
