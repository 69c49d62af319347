"""Reasoning SFT for LoopLMs on TRL's `SFTTrainer`: from a base LoopLM to a Thinking variant.

    python run.py sft --config configs/sft_tiny.yaml
    python run.py sft objective.kind=stage1 objective.beta=0.1 --config configs/sft_tiny.yaml

The `training:` section is TRL's own `SFTConfig` (its field names, defaults and help; checkpoints go to
`training.output_dir/checkpoint-N`, the final model to `training.output_dir`); our options sit in `model`,
`data`, `objective`, `lora` and `sample`. Data helpers live in `posttrain.data`, the sampling check in
`posttrain.evaluation`, the losses in `looplm.losses`: this file wires them to `SFTTrainer`.

Phases of `run_sft`: data (load, hold out, drop over-length rows) -> model and tokenizer (chat template that
opens `<think>`, Ouro's bos/eos fix) -> trainer (loop-aware loss, optional LoRA) -> evaluate before ->
train (resumable) -> evaluate after -> save (merged model, tokenizer, generation config, recipe config) ->
sample the saved folder through our rollout engine and count well-formed completions.

The trainer and its objectives (`objective.kind`: final, stage1, mean) are in `posttrain.sft_trainer`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig

import looplm
from configs import UserError, save_config
from configs.inputs import hub_errors, model_source
from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.tokenizer import THINK_CLOSE, THINK_OPEN, build_tokenizer, fix_ouro_special_tokens
from posttrain.callbacks import CompactProgress
from posttrain.data import SFTData, corpus_of, drop_long_rows, load_rows
from posttrain.distributed import check_launch
from posttrain.evaluation import sample_check
from posttrain.recipe_parts import (
    HeldOutData,
    LoraSection,
    ModelFolder,
    hold_out,
    lora_config,
    resume_checkpoint,
)
from posttrain.sft_trainer import LoopSFTTrainer, ObjectiveSection, unwrap_looplm
from rollout.engine import SamplingConfig

logger = logging.getLogger(__name__)

RECIPE_CONFIG_FILE = "sft_config.yaml"
RESULTS_FILE = "sft_results.json"

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelSection(ModelFolder):
    # path None builds the tiny model below, with a byte-level BPE trained on the training text.
    # Loops for training, also written to the saved config (None: the checkpoint's T; 4 for the tiny model).
    total_ut_steps: int | None = None
    # looprl: our ChatML template, which opens <think> for the assistant (looplm.tokenizer); keep: the
    # tokenizer's own.
    chat_template: Literal["looprl", "keep"] = "looprl"
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    # The tiny model (path: null): a CPU model for tests and the demo.
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    tokenizer_vocab_size: int = 384


@dataclass
class DataSection(HeldOutData):
    # train: "synthetic" (arithmetic traces generated in code), a local .jsonl/.json/.parquet file or folder, or a
    # hub dataset name; schemas (posttrain.data): `messages`, `prompt`/`completion`, ShareGPT `conversations`.
    train: str = "synthetic"
    # Rows longer than training.max_length: "drop" them before training (counted in the results), or
    # "truncate" them to their first max_length tokens (TRL's truncation).
    overlong: Literal["drop", "truncate"] = "drop"


def _cpu_sft_defaults() -> SFTConfig:
    """The `training:` section when a config gives none: TRL's defaults, but fp32 and no activation
    checkpointing off a GPU (TRL defaults both on: bf16 autocast is slow and inexact on CPU)."""
    on_gpu = torch.cuda.is_available()
    return SFTConfig(output_dir="outputs/sft", use_cpu=not on_gpu, bf16=on_gpu, activation_checkpointing=on_gpu,
                     report_to="none")


@dataclass
class SampleSection:
    """The after-training check: sample held-out prompts from the saved folder through the rollout engine."""

    num_prompts: int = 32  # 0 skips it
    max_new_tokens: int = 128
    temperature: float = 0.0  # greedy
    seed: int = 0

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)


@dataclass
class SFTRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sample: SampleSection = field(default_factory=SampleSection)
    # TRL's SFTConfig. Set by the recipe whatever the file says: assistant_only_loss / completion_only_loss
    # (from the data's schema: loss on the assistant's tokens only) and prediction_loss_only (no logits kept).
    training: SFTConfig = field(default_factory=_cpu_sft_defaults)


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer


def build_model_and_tokenizer(
    cfg: ModelSection, corpus: Sequence[str] | None = None, seed: int = 0
) -> tuple[LoopLMForCausalLM, PreTrainedTokenizerBase]:
    """Load (or build) the LoopLM and its tokenizer, with the chat template and Ouro's bos/eos fix applied."""
    if cfg.path is not None:
        model_source(cfg.path)  # a missing local folder: one line naming its command, before any work
    tokenizer = model_tokenizer(cfg, corpus)
    if cfg.path is None:
        torch.manual_seed(seed)
        model = LoopLMForCausalLM(tiny_model_config(cfg, tokenizer))
    else:
        with hub_errors("model.path", cfg.path):
            model = LoopLMForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
        if cfg.total_ut_steps is not None:
            model.config.total_ut_steps = cfg.total_ut_steps
    ensure_think_tokens(tokenizer, model)
    # The same template and special ids go into the saved folder, so SFT, rollouts and evaluation agree.
    fix_ouro_special_tokens(tokenizer, model)
    return model, tokenizer


def model_tokenizer(cfg: ModelSection, corpus: Sequence[str] | None) -> PreTrainedTokenizerBase:
    """The tokenizer at `model.tokenizer_path` or `model.path`; for the tiny model, a BPE trained on `corpus`."""
    source = cfg.tokenizer_path or cfg.path
    if source is None:
        return build_tokenizer(corpus, vocab_size=cfg.tokenizer_vocab_size)
    return cfg.tokenizer(cfg.chat_template)


def tiny_model_config(cfg: ModelSection, tokenizer: PreTrainedTokenizerBase) -> LoopLMConfig:
    return LoopLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        total_ut_steps=cfg.total_ut_steps or 4,
    )


def ensure_think_tokens(tokenizer: PreTrainedTokenizerBase, model: LoopLMForCausalLM) -> None:
    """`<think>`/`</think>` as single tokens (a base checkpoint may lack them); grows the embeddings if so."""
    missing = [t for t in (THINK_OPEN, THINK_CLOSE) if t not in tokenizer.get_vocab()]
    if not missing:
        return
    tokenizer.add_tokens(missing)
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    logger.warning("added %s to the tokenizer (vocab now %d)", missing, len(tokenizer))


def set_gate_trainable(model: torch.nn.Module, objective: ObjectiveSection) -> None:
    """Freeze the exit gate unless Stage I trains it (the other objectives never give it a gradient)."""
    trainable = objective.gate_trainable and objective.kind == "stage1"
    for p in unwrap_looplm(model).model.early_exit_gate.parameters():
        p.requires_grad_(trainable)


def peft_config(cfg: LoraSection, objective: ObjectiveSection):
    if "lm_head" in cfg.target_modules:
        raise ValueError(
            "lora.target_modules: lm_head cannot take an adapter (TRL's fused head reads its weight)"
        )
    # A trainable gate under LoRA is trained in full and saved with the adapter.
    gate = ["early_exit_gate"] if objective.kind == "stage1" and objective.gate_trainable else None
    return lora_config(cfg, modules_to_save=gate)


# ----------------------------------------------------------------------------------------------------------
# Trainer


def trainer_args(cfg: SFTRecipeConfig, data: SFTData) -> SFTConfig:
    """`training` with the options the recipe decides from the data (a copy: the config is saved as given)."""
    args = copy.copy(cfg.training)
    # Loss on assistant tokens only (the template's {% generation %} span) or on the completion only.
    args.assistant_only_loss = "messages" in data.train.column_names
    args.completion_only_loss = None if args.assistant_only_loss else True
    args.prediction_loss_only = True  # evaluation logs losses and loop metrics, never logits
    return args


def make_trainer(
    cfg: SFTRecipeConfig,
    model: LoopLMForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data: SFTData,
    callbacks: list[TrainerCallback] | None = None,
) -> LoopSFTTrainer:
    set_gate_trainable(model, cfg.objective)
    trainer = LoopSFTTrainer(
        model=model,
        args=trainer_args(cfg, data),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora, cfg.objective) if cfg.lora.enabled else None,
        callbacks=callbacks,
        objective=cfg.objective,
    )
    # Readable lines under the progress bar (or nothing) instead of transformers' printed dicts of strings.
    trainer.remove_callback(PrinterCallback)
    if not cfg.training.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(CompactProgress(PROGRESS_KEYS))
    return trainer


PROGRESS_KEYS = {"loss": "loss", "ce_loop1": "CE loop 1", "ce_loop4": "CE loop 4", "exit_entropy": "exit entropy",
                 "eval_loss": "eval loss"}


# ----------------------------------------------------------------------------------------------------------
# Output folder


def final_model(trainer: LoopSFTTrainer) -> LoopLMForCausalLM:
    """The trained LoopLM, LoRA merged into the base weights."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def save_output(
    model: LoopLMForCausalLM, tokenizer: PreTrainedTokenizerBase, cfg: SFTRecipeConfig, out_dir: str | Path
) -> Path:
    """A folder that our rollout engine, `AutoModelForCausalLM` (after `import looplm`) and vLLM load."""
    out = Path(out_dir)
    fix_ouro_special_tokens(tokenizer, model)  # generation_config.json gets bos/eos/pad from here
    model.config.use_cache = True
    dtype = torch.bfloat16 if cfg.model.save_dtype == "bfloat16" else torch.float32
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)  # with the chat template
    save_config(cfg, out / RECIPE_CONFIG_FILE)
    return out


# ----------------------------------------------------------------------------------------------------------
# The recipe


def run_sft(config: SFTRecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train, save a loadable folder, check it; -> results (also written to <output_dir>/sft_results.json)."""
    check_launch(config.training.world_size, config.training.use_cpu)
    seed_everything(config.training.seed)
    if config.training.disable_tqdm:
        quiet_progress_bars()
    data, model, tokenizer = setup(config)
    trainer = make_trainer(config, model, tokenizer, data, callbacks)
    if trainer.is_fsdp_enabled:
        raise UserError(
            "SFT under FSDP: the final save and checks run on the main process's (sharded) model, which is not "
            "supported yet; launch with DDP (configs/accelerate/multi_cpu.yaml's launcher on GPUs) or on one GPU"
        )
    results: dict[str, Any] = {
        "train_rows": len(data.train),
        "eval_rows": len(data.eval or []),
        "dropped_overlong": data.dropped,
    }
    checkpoint = resume_checkpoint(config.training)
    if data.eval is not None and checkpoint is None:
        results["eval_before"] = trainer.evaluate()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    results |= {"global_step": trainer.state.global_step, "train_loss": train_output.training_loss}
    if data.eval is not None:
        results["eval_after"] = trainer.evaluate()
    results["exit_history"] = exit_history(trainer.state.log_history)
    if not trainer.is_world_process_zero():  # under torchrun / accelerate launch the main process saves and checks
        return results
    probe = probe_batch(trainer) if config.lora.enabled else None
    adapter_logits = lora_effect(trainer, probe, results) if probe is not None else None
    out = save_output(final_model(trainer), tokenizer, config, config.training.output_dir)
    if adapter_logits is not None:  # merged, saved and reloaded as users will (bf16 saves add rounding)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        merged_logits = logits_of(reloaded.to(adapter_logits.device), probe)
        results["lora_merge_max_abs_diff"] = (merged_logits - adapter_logits).abs().max().item()
    prompts, answers = data.eval_prompts(config.sample.num_prompts)
    if prompts:
        results["sample"] = sample_check(
            out, prompts, answers, config.sample.sampling(), thinking=data.replies_think()
        )
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print_summary(results)
    return results


def probe_batch(trainer: LoopSFTTrainer) -> dict[str, torch.Tensor]:
    """A held-out (else training) batch to compare the adapter model with its merged save."""
    has_eval = trainer.eval_dataset is not None
    loader = trainer.get_eval_dataloader() if has_eval else trainer.get_train_dataloader()
    batch = trainer._prepare_inputs(next(iter(loader)))  # moved to the model's device
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch, use_cache=False).logits.float()


def lora_effect(
    trainer: LoopSFTTrainer, probe: dict[str, torch.Tensor], results: dict[str, Any]
) -> torch.Tensor:
    """The adapter model's logits on `probe`; records how far the adapter moved them from the base model."""
    model = trainer.model
    adapter_logits = logits_of(model, probe)
    with model.disable_adapter():
        results["lora_adapter_max_abs_effect"] = (logits_of(model, probe) - adapter_logits).abs().max().item()
    return adapter_logits


def load_sft_data(cfg: DataSection) -> SFTData:
    """Train and eval rows of the `data:` section; without `data.eval` the first `eval_rows` training rows are
    held out."""
    train = load_rows(cfg.train, cfg.split, cfg.max_rows, cfg.synthetic_rows, cfg.synthetic_seed, cfg.task)
    if cfg.eval is not None:
        evals = load_rows(cfg.eval, cfg.eval_split, cfg.eval_rows, cfg.eval_rows, cfg.synthetic_seed + 1, cfg.task)
        return SFTData(train, evals)
    held, rest = hold_out(train, cfg.eval_rows)
    return SFTData(rest, held if len(held) else None)


def setup(config: SFTRecipeConfig) -> tuple[SFTData, LoopLMForCausalLM, PreTrainedTokenizerBase]:
    """Data first (the tiny model's tokenizer is trained on it), then the over-length filter (needs it)."""
    t = config.training
    data = load_sft_data(config.data)
    own_tokenizer = config.model.path is None and config.model.tokenizer_path is None
    model, tokenizer = build_model_and_tokenizer(
        config.model, corpus_of(data.train) if own_tokenizer else None, t.seed
    )
    if config.data.overlong == "drop":
        data = drop_long_rows(data, tokenizer, t.max_length)
    return data, model, tokenizer


def exit_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Training-log entries with exit statistics (Stage I): step, exit entropy, p(last loop)."""
    rows = []
    for entry in log_history:
        if "exit_entropy" in entry:
            last = max(int(k[len("exit_p") :]) for k in entry if k.startswith("exit_p"))
            entropy, p_last = entry["exit_entropy"], entry[f"exit_p{last}"]
            rows.append({"step": entry["step"], "exit_entropy": entropy, "p_last": p_last})
    return rows


def print_summary(results: dict[str, Any]) -> None:
    before, after = results.get("eval_before", {}), results.get("eval_after", {})
    loops = sorted((k for k in after if k.startswith("eval_ce_loop")), key=lambda k: int(k[12:]))
    if loops:
        last = loops[-1]
        ce_before, ce_after = before.get(last, math.nan), after[last]
        logger.info("held-out CE at the last loop: before %.4f, after %.4f", ce_before, ce_after)
    if "sample" in results:
        s = results["sample"]
        logger.info("well-formed completions: %.3f; answer accuracy: %s", s["well_formed"], s["answer_accuracy"])
    for row in results["exit_history"][-1:]:  # the whole history is in the results file
        step, entropy, p_last = row["step"], row["exit_entropy"], row["p_last"]
        logger.info("step %5d: exit entropy %.4f, p(last loop) %.4f", step, entropy, p_last)


def quiet_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "DataSection",
    "ModelSection",
    "SFTRecipeConfig",
    "SampleSection",
    "build_model_and_tokenizer",
    "load_sft_data",
    "make_trainer",
    "run_sft",
    "save_output",
    "setup",
]

_ = looplm  # `import looplm` registers the Auto classes the saved folder is loaded through
