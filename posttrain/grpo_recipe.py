"""RLVR for LoopLMs (GRPO, DAPO and TRL's other losses) with rollouts the update replays exactly.

    python run.py grpo --config configs/grpo_tiny.yaml
    python run.py grpo --config configs/dapo_ouro_1.4b.yaml          # GPUs, vLLM at fixed depth

The `training:` section is TRL's own `GRPOConfig` (its field names, defaults and help); our options sit in
`model`, `data`, `rollout`, `rewards`, `loop`, `dynamic_sampling` and `eval`. The trainer is
`posttrain.grpo_trainer.LoopGRPOTrainer`; this file only wires data, model, engine, rewards and outputs:

    data -> model + tokenizer -> rollout engine -> held-out accuracy before -> train (resumable) ->
    held-out accuracy after -> save (model folder in Ouro's layout, results.json, metrics.jsonl)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig

import looplm
from configs import UserError, save_config
from configs.inputs import hub_errors, model_source
from looplm import LoopLMForCausalLM
from posttrain.callbacks import CompactProgress
from posttrain.data import load_dapo_math, load_gsm8k
from posttrain.distributed import check_launch
from posttrain.evaluation import task_accuracy
from posttrain.grpo_trainer import DynamicSamplingConfig, LoopGRPOTrainer, LoopRLConfig, gathered_policy_state
from posttrain.recipe_parts import (
    HeldOutData,
    LoraSection,
    ModelFolder,
    build_engine,
    close_engine,
    hold_out,
    lora_config,
    resume_checkpoint,
)
from posttrain.synthetic import to_dataset
from rewards import get_reward_funcs
from rollout.engine import DepthConfig, RolloutEngine, SamplingConfig
from rollout.pool import PoolConfig

logger = logging.getLogger(__name__)

METRICS_FILE, RESULTS_FILE, MODEL_DIR, CONFIG_FILE = "metrics.jsonl", "results.json", "model", "grpo_config.yaml"


@dataclass
class GRPOModelSection(ModelFolder):
    path: str = "outputs/sft_tiny"  # a LoopLM folder (an SFT output) or an Ouro checkpoint folder
    gate_trainable: bool = False  # the plain RL update gives the gate no gradient; frozen it is checked to stay put
    # False: only the exit gate trains (depth-aware RL of the gate alone: needs gate_trainable and loop.exit_action)
    lm_trainable: bool = True
    # Batch-invariant kernels in the engine and the update (looplm.batch_invariant): rollout and trainer
    # log-probs agree bit for bit, in bf16 as in fp32. Slower (BENCHMARKS.md); our engines only (not vLLM).
    exact_mode: bool = False
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class GRPODataSection(HeldOutData):
    train: str | None = None  # the file, folder or hub name of formats dapo and gsm8k
    eval_rows: int = 200
    synthetic_rows: int = 4096
    # synthetic: arithmetic problems generated in code (`synthetic_*` keys, `task`: the SFT config's `data.task`);
    # dapo: a DAPO-Math-17k file, folder or hub name (de-duplicated); gsm8k: a question/answer file or folder
    # (GSM8K/MATH-style, `#### N` answers).
    format: Literal["synthetic", "dapo", "gsm8k"] = "synthetic"
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.format != "synthetic" and not self.train:
            raise ValueError(f"data.train: a file, folder or hub name is needed for format {self.format!r}")
        if self.eval_rows < 1:
            raise ValueError(f"data.eval_rows must be >= 1, got {self.eval_rows}")


@dataclass
class RolloutSection:
    # pool: Ray actors running our engine (the default); torch: our engine in-process; vllm: GPUs, fixed depth only.
    engine: Literal["pool", "torch", "vllm"] = "pool"
    depth: DepthConfig = field(default_factory=DepthConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_batch_size: int = 32  # rows decoded together (in-process engine; the pool has its own)
    compile_decode: bool = False  # in-process engine: torch.compile its fixed-depth step (the pool has its own)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the in-process engine's device (auto: cuda when present)
    seed: int = 0  # base of each step's sampling seed (a resumed run draws the same noise at the same step)
    # 0: synchronous (each step's rollouts use that step's weights). k > 0: the engine generates the next k batches
    # while the trainer updates; a batch is used at most k steps after the weights that made it, corrected by
    # importance sampling (needs loop.importance_sampling_correction; one training process; posttrain/async_rollouts.py).
    max_staleness: int = 0

    def __post_init__(self) -> None:
        self.depth.check()
        self.pool.check()
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.engine == "vllm" and self.depth.policy != "fixed":
            raise ValueError(
                "rollout.engine=vllm with rollout.depth.policy=adaptive: vLLM's Ouro model always runs every loop "
                "and never calls the gate; adaptive depth needs engine pool or torch"
            )
        if self.depth.kv_mode != "full":
            raise ValueError(
                f"rollout.depth.kv_mode={self.depth.kv_mode!r}: only the full cache is replayed by the update "
                "(shared K/V modes are for evaluation)"
            )


@dataclass
class RewardsSection:
    names: list[str] = field(default_factory=lambda: ["dapo_reward"])  # rewards.REWARD_FUNCS; weights: training.reward_weights
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {max_completion_len: 128, soft_punish_cache: 32}


@dataclass
class EvalSection:
    num_prompts: int = 200  # held-out prompts scored before and after training; 0 skips
    sampled_n: int = 4  # completions per prompt at the training temperature (beside one greedy)
    seed: int = 1234


def _cpu_grpo_defaults() -> GRPOConfig:
    return GRPOConfig(output_dir="outputs/grpo", use_cpu=not torch.cuda.is_available(), bf16=False, report_to="none")


@dataclass
class GRPORecipeConfig:
    model: GRPOModelSection = field(default_factory=GRPOModelSection)
    data: GRPODataSection = field(default_factory=GRPODataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    rewards: RewardsSection = field(default_factory=RewardsSection)
    loop: LoopRLConfig = field(default_factory=LoopRLConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    training: GRPOConfig = field(default_factory=_cpu_grpo_defaults)

    def __post_init__(self) -> None:
        self._check_depth_action()
        if self.model.exact_mode and self.rollout.engine == "vllm":
            raise ValueError("model.exact_mode needs our engine (rollout.engine=pool or torch): vLLM's kernels differ")
        t = self.training
        truncating = {"top_p": t.top_p != 1.0, "top_k": (t.top_k or 0) > 0, "min_p": (t.min_p or 0.0) > 0.0}
        bad = [name for name, on in truncating.items() if on]
        if bad:
            raise ValueError(
                f"training.{bad[0]}: truncated sampling is not supported: TRL's update scores the temperature-only "
                "distribution, so every token sampled from a truncated one would be off-policy"
            )

    def _check_depth_action(self) -> None:
        """Depth-aware RL's combinations: what trains must get a gradient, and exits scored must be sampled."""
        if self.loop.exit_action and self.rollout.depth.policy != "sampled":
            raise ValueError(
                f"loop.exit_action needs rollout.depth.policy=sampled (exits drawn from the gate), got "
                f"{self.rollout.depth.policy!r}"
            )
        if not self.model.lm_trainable and not (self.model.gate_trainable and self.loop.exit_action):
            raise ValueError(
                "model.lm_trainable=false leaves only the gate to train: it needs model.gate_trainable=true and "
                "loop.exit_action=true (the token term gives the gate no gradient)"
            )
        if self.loop.exit_credit == "token" and "depth_penalty" in self.rewards.names:
            raise ValueError(
                "loop.exit_credit=token charges each exit loop.exit_cost itself: leave depth_penalty out of "
                "rewards.names (the compute would be charged twice)"
            )


# ----------------------------------------------------------------------------------------------------------
# Data


def load_grpo_data(cfg: GRPODataSection) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets with `prompt` (chat messages) and `ground_truth` columns."""
    if cfg.format == "synthetic":
        data = to_dataset(cfg.task.rows(cfg.synthetic_rows, cfg.synthetic_seed), columns=["prompt", "ground_truth"])
    elif cfg.format == "dapo":
        data = load_dapo_math(cfg.train, split=cfg.split, dedupe=cfg.dedupe, max_rows=cfg.max_rows)
    else:
        data = load_gsm8k(cfg.train, split=cfg.split, form="grpo", max_rows=cfg.max_rows)
    if cfg.eval is not None:
        loader = load_dapo_math if cfg.format == "dapo" else load_gsm8k
        kwargs = {"dedupe": cfg.dedupe} if cfg.format == "dapo" else {"form": "grpo"}
        held = loader(cfg.eval, split=cfg.eval_split, max_rows=cfg.eval_rows, **kwargs)
        train = data
    else:
        held, train = hold_out(data, cfg.eval_rows)
    if len(train) == 0:
        raise UserError(f"data: no training rows left from {cfg.train or 'synthetic'} after holding out {len(held)}")
    return train, held


# ----------------------------------------------------------------------------------------------------------
# Model, tokenizer, engine


def load_policy(cfg: GRPOModelSection) -> tuple[LoopLMForCausalLM, PreTrainedTokenizerBase]:
    with hub_errors("model.path", model_source(cfg.path)):  # a missing folder: one line naming its command
        model = LoopLMForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
    tokenizer = cfg.tokenizer(model=model)
    model.config.exact_mode = cfg.exact_mode  # shipped with the config to the engine's copy
    for p in model.parameters():
        p.requires_grad_(cfg.lm_trainable)
    for p in model.model.early_exit_gate.parameters():
        p.requires_grad_(cfg.gate_trainable)
    return model, tokenizer


def rollout_engine(cfg: RolloutSection, model: LoopLMForCausalLM, model_path: str, tokenizer) -> RolloutEngine:
    """The `rollout:` section's engine; it holds its own copy of the weights, which the trainer syncs every
    optimizer step (vLLM loads `model_path`)."""
    return build_engine(
        cfg.engine, model, tokenizer, cfg.depth, cfg.pool, max_batch_size=cfg.max_batch_size,
        compile_decode=cfg.compile_decode, folder=model_path, device=cfg.device,
    )


# ----------------------------------------------------------------------------------------------------------
# Outputs


class MetricsFile(TrainerCallback):
    """`metrics.jsonl`: one JSON object per logged training step (logging_steps=1: every optimizer step)."""

    ALIASES = {
        "reward": "reward_mean", "reward_std": "reward_std", "parity/max_abs": "parity_max_abs",
        "parity/mean_abs": "parity_mean_abs", "parity/kl": "parity_kl", "loops/mean_exit_loop": "mean_exit_loop",
        "frac_reward_zero_std": "zero_std_frac", "completions/truncated_frac": "truncated_frac",
    }

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, drop the rows a killed run wrote after its last checkpoint: no step is logged twice."""
        if state.is_world_process_zero and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] <= state.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only the main process writes (the logged metrics already cover every process's part of the batch).
        if not state.is_world_process_zero or not logs or "reward" not in logs:  # eval/summary logs have no reward
            return
        row = {"step": state.global_step} | {self.ALIASES.get(k, k): v for k, v in logs.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate(engine: RolloutEngine, tokenizer, held: Dataset, cfg: GRPORecipeConfig) -> dict[str, Any]:
    """Held-out accuracy: greedy, and `eval.sampled_n` samples per prompt at the training temperature."""
    rows = held.select(range(min(cfg.eval.num_prompts, len(held))))
    prompts, truths = list(rows["prompt"]), list(rows["ground_truth"])
    common = dict(max_new_tokens=cfg.training.max_completion_length, stop_token_ids=[tokenizer.eos_token_id])
    greedy = SamplingConfig(temperature=0.0, seed=cfg.eval.seed, **common)
    sampled = SamplingConfig(n=cfg.eval.sampled_n, temperature=cfg.training.temperature, seed=cfg.eval.seed, **common)
    return {
        "prompts": len(prompts),
        "greedy": task_accuracy(engine, tokenizer, prompts, truths, greedy, cfg.rollout.depth).to_dict(),
        "sampled": task_accuracy(engine, tokenizer, prompts, truths, sampled, cfg.rollout.depth).to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------
# The recipe


def run_grpo(config: GRPORecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train with GRPO/DAPO; -> results (also `<output_dir>/results.json`).

    Under `torchrun` / `accelerate launch` every process runs this; the main process alone owns the rollout
    engine (one Ray pool for the job), evaluates, and writes the config, metrics, results and model."""
    args = config.training
    if args.ddp_find_unused_parameters is None:  # under DDP: only a gate trained without the exit action gets no grad
        args.ddp_find_unused_parameters = config.model.gate_trainable and not config.loop.exit_action
    check_launch(args.world_size, args.use_cpu)
    main = args.process_index == 0
    out = Path(args.output_dir)
    train, held = load_grpo_data(config.data)
    model, tokenizer = load_policy(config.model)  # a missing model fails here, before anything is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / CONFIG_FILE)
    reward_funcs = get_reward_funcs(config.rewards.names, **config.rewards.options)
    engine = rollout_engine(config.rollout, model, config.model.path, tokenizer) if main else None
    try:
        results: dict[str, Any] = {"train_rows": len(train), "eval_rows": len(held), "seed": args.seed,
                                   "processes": args.world_size}
        resume = resume_checkpoint(args)
        if main and config.eval.num_prompts and not resume:
            results["before"] = evaluate(engine, tokenizer, held, config)
        trainer = LoopGRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train, processing_class=tokenizer,
            peft_config=lora_config(config.model.lora) if config.model.lora.enabled else None,
            callbacks=[MetricsFile(out / METRICS_FILE), *(callbacks or [])],
            engine=engine, depth=config.rollout.depth, loop=config.loop,
            dynamic_sampling=config.dynamic_sampling, rollout_seed=config.rollout.seed,
            max_staleness=config.rollout.max_staleness,
        )
        compact_progress(trainer)
        train_output = trainer.train(resume_from_checkpoint=resume)
        results |= {"global_step": trainer.state.global_step, "train_loss": train_output.training_loss,
                    "completions_generated": trainer.completions_generated}
        state = gathered_policy_state(trainer.accelerator, trainer.model)  # every process: FSDP gathers shards
        if main:
            engine.load_weights(state, version=trainer.state.global_step)
            if config.eval.num_prompts:
                results["after"] = evaluate(engine, tokenizer, held, config)
            # Under FSDP the main process's modules hold shards: the gathered weights are what it saves.
            save_model(final_policy(trainer), tokenizer, out / MODEL_DIR, state if trainer.is_fsdp_enabled else None)
    finally:
        close_engine(engine)
    if main:
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
        log_summary(results)
    return results


PROGRESS_KEYS = {
    "reward": "reward", "parity/max_abs": "max|dlogp|", "loops/mean_exit_loop": "exit loop",
    "frac_reward_zero_std": "zero-std groups", "completions/mean_length": "length", "step_time": "s/step",
}


def compact_progress(trainer: LoopGRPOTrainer) -> None:
    """One readable line per step under the progress bar, instead of TRL's printed dicts."""
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress(PROGRESS_KEYS))


def final_policy(trainer: LoopGRPOTrainer) -> LoopLMForCausalLM:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model(
    model: LoopLMForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """A folder our engines, `AutoModelForCausalLM` (after `import looplm`) and vLLM load (`state_dict`: the
    weights to write instead of the model's own, e.g. gathered from FSDP shards)."""
    model.config.use_cache = True
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def log_summary(results: dict[str, Any]) -> None:
    for mode in ("greedy", "sampled"):
        before = results.get("before", {}).get(mode, {}).get("accuracy")
        after = results.get("after", {}).get(mode, {}).get("accuracy")
        if before is not None and after is not None:
            logger.info("held-out %s accuracy: %.3f -> %.3f", mode, before, after)


__all__ = [
    "EvalSection",
    "GRPODataSection",
    "GRPOModelSection",
    "GRPORecipeConfig",
    "RewardsSection",
    "RolloutSection",
    "load_grpo_data",
    "rollout_engine",
    "run_grpo",
]

_ = looplm  # `import looplm` registers the Auto classes the saved folder is loaded through
