"""What every recipe wires the same way, in one place, so that the recipes cannot drift apart:

- `ModelFolder`, `HeldOutData`, `LoraSection`: the keys the recipes' `model:`, `data:` and `lora:` sections share
  (each recipe's section extends them with its own keys and defaults), `lora_config`;
- `hold_out`: the held-out split of a dataset that has no separate eval set (its first rows);
- checkpoints: a completion marker written after every save (`MarkCompleteCheckpoints`), and
  `resume_checkpoint`, TRL's `resume_from_checkpoint` resolved to the newest complete one;
- `load_tokenizer`: a model folder's (or hub name's) tokenizer, always with Ouro's special-token fix;
- `build_engine`: the one rollout-engine factory (the RL recipe's, `run.py rollout`'s and `run.py parity`'s).

The recipes import these (`posttrain/*_recipe.py`, `posttrain/*_trainer.py` and `gate_tuning/stage2.py` for the
checkpoint marker, `gate_tuning/recipe.py`, `cli/rollout.py`, `cli/parity.py`); nothing here imports a recipe.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from configs import UserError
from configs.inputs import hub_errors
from looplm import LoopLMForCausalLM
from looplm.tokenizer import CHAT_TEMPLATE, fix_ouro_special_tokens
from posttrain.synthetic import SyntheticTask
from rollout.engine import DepthConfig, RolloutEngine
from rollout.pool import PoolConfig

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# The sections every recipe shares


@dataclass
class ModelFolder:
    """The `model:` keys of every recipe: where the weights and the tokenizer come from."""

    # A LoopLM save or an Ouro checkpoint (folder or hub name).
    path: str | None = None
    # None: the tokenizer in `path`.
    tokenizer_path: str | None = None

    def tokenizer(self, chat_template: Literal["keep", "looprl"] = "keep", model: Any = None) -> PreTrainedTokenizerBase:
        """`load_tokenizer` on `tokenizer_path`, else `path` (errors name the key that gave it)."""
        key = "model.tokenizer_path" if self.tokenizer_path else "model.path"
        return load_tokenizer(self.tokenizer_path or self.path, key, chat_template, model)


@dataclass
class HeldOutData:
    """The `data:` keys of the SFT and RL recipes: training rows, and held-out rows (`eval`, or the first
    `eval_rows` training rows, `hold_out`)."""

    # "synthetic" (the arithmetic task generated in code), a local file or folder, or a hub dataset name.
    train: str | None = "synthetic"
    split: str = "train"
    eval: str | None = None  # None: hold out the first `eval_rows` rows of `train`
    eval_split: str = "test"
    max_rows: int | None = None  # cap on the training rows read (before the hold-out)
    eval_rows: int = 64
    synthetic_rows: int = 1024
    synthetic_seed: int = 0  # the same seed in the SFT and RL configs: held-out rows are never trained on
    task: SyntheticTask = field(default_factory=SyntheticTask)  # the synthetic problems (train: synthetic)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSection:
    """The `lora:` keys (SFT's section, the RL recipe's `model.lora`)."""

    enabled: bool = False  # false: full fine-tuning
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Never lm_head: TRL's fused head reads `lm_head.weight` directly, so an adapter there would not train.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


def lora_config(cfg: LoraSection, modules_to_save: list[str] | None = None):
    """peft's LoraConfig for the section (`modules_to_save`: modules trained in full and saved with the adapter)."""
    from peft import LoraConfig  # peft only where LoRA is asked for

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        modules_to_save=modules_to_save, task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------------------------------------
# The held-out split


def hold_out(data: Dataset, rows: int) -> tuple[Dataset, Dataset]:
    """(held-out, train): the first `rows` rows held out, never more than half, so some are left to train on."""
    n = min(rows, len(data) // 2)
    return data.select(range(n)), data.select(range(n, len(data)))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


COMPLETE_MARKER = "checkpoint_complete"


def mark_complete(folder: Path) -> None:
    """Written last, and synced, so its presence means every file of the checkpoint is on disk."""
    marker = folder / COMPLETE_MARKER
    with marker.open("w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


class MarkCompleteCheckpoints(TrainerCallback):
    """After each checkpoint save (the Trainer calls `on_save` once `checkpoint-N` is written), its marker:
    a save cut short by a crash is never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            mark_complete(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` with its completion marker; incomplete ones (a crash mid-save) are renamed
    `checkpoint-N.incomplete` so that neither this nor transformers' checkpoint rotation picks them up."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for folder in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if not folder.is_dir() or not step.isdigit():
            continue
        if (folder / COMPLETE_MARKER).exists():
            found.append((int(step), folder))
        else:
            logger.warning("%s was not completely written (crash during save?): set aside", folder)
            with contextlib.suppress(FileNotFoundError):  # every training process looks; one of them moves it
                folder.rename(folder.with_name(folder.name + ".incomplete"))
    return str(max(found)[1]) if found else None


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """TRL's `resume_from_checkpoint`: a folder, or "latest" for the newest complete one under output_dir
    (None when there is none yet: a fresh start, so the same command starts and resumes a run)."""
    value = args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("latest", "true"):
        found = latest_complete_checkpoint(args.output_dir)
        if found is None:
            logger.info("no complete checkpoint in %s: fresh start", args.output_dir)
        return found
    if value is not None and not Path(value).is_dir():
        raise UserError(f"training.resume_from_checkpoint: no checkpoint folder {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# The tokenizer of a model folder


def load_tokenizer(
    source: str | Path, where: str = "model.path", chat_template: Literal["keep", "looprl"] = "keep", model: Any = None
) -> PreTrainedTokenizerBase:
    """The tokenizer at `source` (a folder or hub name; `where`: the config key that named it, for errors).

    Ouro's released folders say bos = eos = pad = 0: `fix_ouro_special_tokens` always sets the chat ids (on
    `model`'s configs too, when given), so that generation stops at `<|im_end|>` in every recipe. It installs
    our chat template where the folder has none; `chat_template="looprl"` installs it in any case.
    """
    with hub_errors(where, str(source)):
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    if chat_template == "looprl":
        tokenizer.chat_template = CHAT_TEMPLATE
    fix_ouro_special_tokens(tokenizer, model)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# The rollout engine


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA when present, else the CPU."""
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def build_engine(
    kind: Literal["pool", "torch", "vllm"],
    model: LoopLMForCausalLM | str | Path,
    tokenizer: Any,
    depth: DepthConfig,
    pool: PoolConfig,
    *,
    max_batch_size: int,
    compile_decode: bool,
    folder: str | Path | None = None,
    device: str | None = None,
) -> RolloutEngine:
    """An engine over an in-memory model or a model folder; it holds its own copy of the weights.

    pool: Ray actors (an in-memory model is shipped to them); torch: in-process (a copy of an in-memory model,
    moved to `device` when given); vllm: loads `folder` (default `model`), since vLLM reads weights from disk.
    """
    in_memory = isinstance(model, LoopLMForCausalLM)
    if kind == "pool":
        from rollout.pool import RolloutPool

        return RolloutPool(model if in_memory else str(model), pool, tokenizer=tokenizer, depth=depth)
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(folder if folder is not None else model, tokenizer=tokenizer, depth=depth)
    from rollout.torch_engine import TorchEngine

    options = dict(tokenizer=tokenizer, depth=depth, max_batch_size=max_batch_size, compile_decode=compile_decode)
    if not in_memory:
        return TorchEngine.from_pretrained(model, **options)
    local = copy.deepcopy(model)
    return TorchEngine(local if device is None else local.to(resolve_device(device)), **options)


def close_engine(engine: RolloutEngine | None) -> None:
    """Stop an engine that owns workers (the Ray pool); the in-process ones have nothing to close."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


__all__ = [
    "COMPLETE_MARKER", "HeldOutData", "LoraSection", "MarkCompleteCheckpoints", "ModelFolder", "build_engine", "close_engine", "hold_out",
    "latest_complete_checkpoint", "load_tokenizer", "lora_config", "mark_complete", "resolve_device", "resume_checkpoint",
]
