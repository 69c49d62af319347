"""The `run.py gate` and `run.py eval` recipes and their configs.

    python run.py gate --config configs/gate_tiny.yaml     # Stage II, frontier before and after, tuned folder
    python run.py eval --config configs/eval_tiny.yaml     # the frontier of one checkpoint

Phases of `run_gate`: check the inputs (a gate in the checkpoint, T >= 2, k > 0, every q in [0, 1], data not
empty; all before any compute) -> data -> model -> frontier with the checkpoint's gate (static, Q-exit,
hidden-state difference, K/V sharing) -> Stage II (`GateTrainer`, LM frozen) -> the tuned gate's Q-exit curve
-> pick q for the budget -> save the tuned folder (identical to the input but for `model.early_exit_gate.*`
and `early_exit_threshold`) -> frontier.csv / .md / .png and results.json beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, TrainingArguments

import looplm
from configs import UserError, save_config
from configs.inputs import model_folder
from looplm import KV_MODES, LoopLMConfig, LoopLMForCausalLM
from looplm.exit_gate import check_threshold
from looplm.tokenizer import fix_ouro_special_tokens
from posttrain.recipe_parts import ModelFolder, resolve_device
from posttrain.synthetic import SyntheticTask

from .data import Example, PadCollator, load_examples, training_features
from .frontier import (
    FrontierComparison,
    FrontierPoint,
    compare_frontiers,
    evaluate_rules,
    hidden_diff_rules,
    kv_rules,
    pick_threshold,
    q_exit_rules,
    static_gaps,
    static_rules,
    write_frontier,
)
from .selection import START, Selection, SelectSection, budget_text, select_gate
from .stage2 import (
    GATE_PREFIX,
    GateSnapshots,
    GateTrainer,
    check_stage2_args,
    freeze_lm,
    gate_state,
    load_gate_state,
    mean_final_loss,
    scaled_target_args,
    target_stats,
)

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # the tuned checkpoint, under output_dir
RESULTS_FILE = "results.json"
UNTUNED, TUNED = "q_exit_stage1", "q_exit_stage2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelSection(ModelFolder):
    """`ModelFolder`'s keys (`path`, `tokenizer_path`; `tokenizer()` loads it) and where to run."""

    path: str = ""  # a LoopLM save or an Ouro checkpoint folder (with its exit gate)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Weights are loaded in float32 and the tuned folder is saved in the checkpoint's own dtype (bf16 -> fp32 ->
    # bf16 is exact), so every LM tensor comes back bit-identical. Evaluation runs in `eval_dtype`.
    eval_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataSection:
    # "synthetic" (arithmetic traces generated with `seed`), or an SFT dataset (posttrain.data.load_rows: a local
    # .jsonl/.json/.parquet file or folder, or a hub name) with `messages` or `prompt`/`completion`.
    train: str = "synthetic"
    split: str = "train"
    # Held-out data: None holds out fresh synthetic rows (seed + 1), or the first eval_rows rows of `train`.
    eval: str | None = None
    eval_split: str = "test"
    train_rows: int = 2048
    eval_rows: int = 128
    # Rows taken off the end of the training rows for held-out gate selection (training.select_every > 0)
    val_rows: int = 0
    seed: int = 1  # synthetic: SFT used seed 0, so these problems are new ones
    task: SyntheticTask = field(default_factory=SyntheticTask)  # the synthetic problems (train: synthetic)
    max_length: int = 256


@dataclass
class Stage2Section:
    k: float = 50.0  # sharpness of the continue target w = sigmoid(k (I - gamma))
    gamma: float = 0.005  # the loss improvement (nats) at which w = 1/2
    alignment: Literal["same_loop", "next_loop"] = "same_loop"  # see gate_tuning.stage2
    # nats: k per nat and gamma in nats, as Ouro (for real checkpoints); mean_loss: I and gamma in units of the
    # model's mean per-token loss at loop T, for models whose losses are far from Ouro's ~1 nat (gate_tuning.stage2)
    units: Literal["nats", "mean_loss"] = "nats"
    # none: every label token alike (Ouro); loss_change: each token's BCE weighted by |L_{t-1} - L_t| (stage2.py)
    weighting: Literal["none", "loss_change"] = "none"
    # ouro: Ouro's continue targets (k, gamma, alignment, weighting above); fitted: each token's first loop within
    # epsilon of its last loop's loss (always next_loop, unweighted; gate_tuning.stage2); auto: both from the same
    # starting gate, and held-out selection keeps the best snapshot of either (needs selection)
    target: Literal["ouro", "fitted", "auto"] = "ouro"
    epsilon: float = 0.02  # fitted: the loss above loop T's that still counts as done, in `units`

    def __post_init__(self) -> None:
        if not self.k > 0:
            raise ValueError(f"stage2.k must be > 0, got {self.k}")
        if not self.epsilon >= 0:
            raise ValueError(f"stage2.epsilon must be >= 0 (a loss margin, in stage2.units), got {self.epsilon}")


@dataclass
class GateTrainingConfig(TrainingArguments):
    """Stage II's `training:` section: transformers' TrainingArguments (its names, defaults and checks), with
    defaults for training a 65-parameter gate (a high constant learning rate, no checkpoints, seed 0) and one
    option of ours, held-out selection. The recipe sets use_cpu from the model's device (bf16 only on a GPU) and
    keeps every batch column (its collator builds them). output_dir holds the frontier, results.json and the
    tuned folder `model/`; checkpoints, when saved, go to output_dir/checkpoint-N."""

    output_dir: str | None = "outputs/gate"
    max_steps: int = 200
    learning_rate: float = 1e-2
    lr_scheduler_type: str = "constant"
    per_device_train_batch_size: int = 32
    logging_steps: float = 20
    save_strategy: str = "no"
    seed: int = 0
    # Held-out selection: > 0 snapshots the gate every select_every steps; on the data.val_rows validation rows
    # (teacher-forced, eval.q_grid plus q = 0 and 1) the snapshot with the fewest loops at the `select:` budget is
    # kept among those at or above static depth (`select_gate`). The starting (Stage-I) gate is a candidate: Stage
    # II can then end where it began. 0: keep the last step's gate.
    select_every: int = 0
    # How far below the static-depth frontier (or a healthy starting gate) a snapshot may dip on the validation rows
    # and still count as "at or above" it: a fraction of static 1 loop's loss minus static T's. Validation rows
    # are few; a strict 0 turned down snapshots far better on average for a dip of 2e-4 of the loss (issue 24).
    select_tolerance: float = 0.01
    # The same for the teacher-forced exact match (the fraction of validation rows whose reference is every token's
    # argmax, a stand-in for accuracy): 0.01 = one point.
    select_exact_tolerance: float = 0.01


@dataclass
class EvalSection:
    q_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    # Relative change ||h_t - h_{t-1}|| / ||h_{t-1}|| below which a token exits (loops 2..T).
    hidden_eps_grid: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    kv_modes: list[str] = field(default_factory=lambda: list(KV_MODES))
    accuracy: bool = True  # greedy generation scored with DAPO's `Answer:` (where the data has answers)
    max_new_tokens: int = 128
    batch_size: int = 32

    def __post_init__(self) -> None:
        for q in self.q_grid:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"eval.q_grid: exit threshold q must be in [0, 1], got {q}")
        for eps in self.hidden_eps_grid:
            if not eps >= 0.0:
                raise ValueError(f"eval.hidden_eps_grid: eps must be >= 0, got {eps}")
        unknown = sorted(set(self.kv_modes) - set(KV_MODES))
        if unknown:
            raise ValueError(f"eval.kv_modes: unknown mode(s) {unknown}; expected some of {list(KV_MODES)}")


@dataclass
class GateRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    stage2: Stage2Section = field(default_factory=Stage2Section)
    training: GateTrainingConfig = field(default_factory=GateTrainingConfig)  # transformers' TrainingArguments
    eval: EvalSection = field(default_factory=EvalSection)
    select: SelectSection = field(default_factory=SelectSection)

    def __post_init__(self) -> None:
        if self.training.select_every < 0:
            raise ValueError(f"training.select_every must be >= 0, got {self.training.select_every}")
        for key in ("select_tolerance", "select_exact_tolerance"):
            if not getattr(self.training, key) >= 0:
                raise ValueError(f"training.{key} must be >= 0, got {getattr(self.training, key)}")
        if (self.training.select_every > 0) != (self.data.val_rows > 0):
            raise ValueError("held-out gate selection needs both training.select_every > 0 and data.val_rows > 0 "
                             f"(got {self.training.select_every} and {self.data.val_rows})")
        if self.stage2.target == "auto" and self.training.select_every == 0:
            raise ValueError("stage2.target = auto needs held-out selection (training.select_every > 0 and "
                             "data.val_rows > 0): it is what decides whether Ouro's targets worked")


@dataclass
class EvalRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str = "outputs/eval"
    gate_label: str = "q_exit"  # the Q-exit curve's name in the outputs


# ----------------------------------------------------------------------------------------------------------
# Checks before any compute


def check_checkpoint(path: str | Path) -> LoopLMConfig:
    """The folder's config has T >= 2 and its weights hold the exit gate; read from disk, nothing computed."""
    folder = model_folder(str(path), "model.path")  # a missing one: one line naming the command that makes it
    config = LoopLMConfig.from_pretrained(str(folder))
    if config.total_ut_steps < 2:
        raise UserError(f"{folder}: total_ut_steps = {config.total_ut_steps}; exit rules need T >= 2 loops")
    names = checkpoint_tensor_names(folder)
    if not any(n.startswith(GATE_PREFIX) for n in names):
        raise UserError(f"{folder}: the checkpoint has no exit gate ({GATE_PREFIX}weight/bias): nothing to tune")
    return config


def checkpoint_tensor_names(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            names |= set(fh.keys())
    return names


def require_examples(examples: list[Example], what: str) -> None:
    if not examples:
        raise UserError(f"{what}: the dataset is empty (no rows left after loading and the max_length filter)")


# ----------------------------------------------------------------------------------------------------------
# Setup


def load_model(cfg: ModelSection, tokenizer: PreTrainedTokenizerBase) -> LoopLMForCausalLM:
    model = LoopLMForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
    fix_ouro_special_tokens(tokenizer, model)  # the engine stops at config's eos (Ouro's folders say id 0)
    return model.to(resolve_device(cfg.device)).eval()


def load_eval_examples(data: DataSection, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    if data.eval is not None:
        return load_examples(data.eval, data.eval_split, data.eval_rows, data.seed, tokenizer, data.max_length)
    if data.train == "synthetic":
        return load_examples("synthetic", data.split, data.eval_rows, data.seed + 1, tokenizer, data.max_length,
                             data.task)
    return load_examples(data.train, data.split, data.eval_rows, data.seed, tokenizer, data.max_length)


def load_train_examples(data: DataSection, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    if data.train == "synthetic" or data.eval is not None:
        return load_examples(data.train, data.split, data.train_rows, data.seed, tokenizer, data.max_length,
                             data.task)
    rows = load_examples(data.train, data.split, data.eval_rows + data.train_rows, data.seed, tokenizer,
                         data.max_length)
    # The first eval_rows rows are held out (load_eval_examples), not `recipe_parts.hold_out`'s at most half: `run eval`
    # loads them alone (no training rows to keep), and both recipes must hold out the same rows, counted after
    # the max_length filter, so a short file keeps its results in both.
    return rows[data.eval_rows :]


def base_rules(num_loops: int, cfg: EvalSection, gate_label: str):
    return [
        *static_rules(num_loops),
        *q_exit_rules(cfg.q_grid, gate_label),
        *hidden_diff_rules(cfg.hidden_eps_grid),
        *kv_rules(cfg.kv_modes),
    ]


def frontier(model: LoopLMForCausalLM, tokenizer, examples: list[Example], rules, cfg: EvalSection, dtype: str):
    """Evaluate in `dtype` (a copy when it differs from float32, so the weights that get saved stay exact)."""
    target = model if dtype == "float32" else _copy_in(model, torch.bfloat16)
    return evaluate_rules(target, tokenizer, examples, rules, cfg.batch_size, cfg.max_new_tokens, cfg.accuracy)


def _copy_in(model: LoopLMForCausalLM, dtype: torch.dtype) -> LoopLMForCausalLM:
    copy = LoopLMForCausalLM(model.config).to(device=model.device, dtype=dtype)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


# ----------------------------------------------------------------------------------------------------------
# Stage II training


def trainer_args(cfg: GateTrainingConfig, use_cpu: bool) -> GateTrainingConfig:
    """`training` rebuilt with what the recipe decides: the device, bf16 only on a GPU, every batch column kept
    (our collator builds the batch), data order seeded by `seed` unless data_seed is given."""
    return replace(
        cfg, use_cpu=use_cpu, bf16=cfg.bf16 and not use_cpu, remove_unused_columns=False,
        data_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
    )


def tune_gate(
    model: LoopLMForCausalLM, examples: list[Example], stage2: Stage2Section, cfg: GateTrainingConfig, pad_id: int,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Stage II in place on `model` (only the gate changes); -> the trainer's log history per target, which
    targets were used and (with `selection` and cfg.select_every > 0) which snapshot was kept."""
    check_stage2_args(stage2.k, model.config.total_ut_steps)
    require_examples(examples, "data.train")
    if stage2.target == "auto" and (selection is None or cfg.select_every == 0):
        raise ValueError("stage2.target = auto needs held-out selection (training.select_every > 0, validation rows)")
    freeze_lm(model)
    features, collator = [training_features(e) for e in examples], PadCollator(pad_id)
    targets = target_args(model, features, collator, stage2, cfg.per_device_train_batch_size)
    start, snapshots = gate_state(model), {START: gate_state(model)}
    phases = ["ouro", "fitted"] if stage2.target == "auto" else [stage2.target]
    results: dict[str, Any] = {"targets": targets, "log_history": {}, "train_loss": {}}
    cache: dict[str, list[FrontierPoint]] = {}
    for phase in phases:
        load_gate_state(model, start)  # each target trains from the starting gate
        output, history, taken = train_gate(model, features, collator, phase, stage2, targets, cfg, selection)
        results["train_loss"][phase], results["log_history"][phase] = output, history
        snapshots |= taken
        if selection is None or cfg.select_every == 0:
            results["target_used"] = phase
            break
        # auto: both targets' snapshots compete on the validation rows, so Ouro's is kept wherever it does best
        results["selection"] = select_gate(model, snapshots, selection, cache)
        results["target_used"] = results["selection"]["kept"].split(" ")[0]
    logger.info("Stage II used the %s gate (targets tried: %s)", results["target_used"], ", ".join(results["log_history"]))
    return results


def target_args(model: LoopLMForCausalLM, features: list, collator: PadCollator, stage2: Stage2Section,
                batch_size: int) -> dict[str, Any]:
    """k, gamma and epsilon in nats (mean_loss units measured on the training rows), and the mean continue label per
    loop of each target on the first batches, logged so the output says what the targets ask of this gate."""
    batches = DataLoader(features, batch_size=batch_size, collate_fn=collator)
    scale = mean_final_loss(model.eval(), batches) if stage2.units == "mean_loss" else None
    k, gamma = scaled_target_args(stage2.k, stage2.gamma, stage2.units, scale)
    epsilon = stage2.epsilon * (scale if scale is not None else 1.0)
    first = [batch for _, batch in zip(range(STAT_BATCHES), batches, strict=False)]
    labels = target_stats(model, first, k, gamma, epsilon)
    logger.info("Stage-II targets: w = sigmoid(%.4g (I - %.4g)), fitted epsilon %.4g, in nats (units %s, mean loss at "
                "loop T %s); mean continue label for loops 2..T: ouro %s, fitted %s", k, gamma, epsilon, stage2.units,
                "not measured" if scale is None else f"{scale:.4g}", _fmt_list(labels["ouro"]),
                _fmt_list(labels["fitted"]))
    return {"units": stage2.units, "mean_final_loss": scale, "k_per_nat": k, "gamma_nats": gamma,
            "epsilon_nats": epsilon, "mean_continue_label": labels}


STAT_BATCHES = 8  # batches the target statistics are read on (one forward each; the LM is frozen)


def _fmt_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def train_gate(
    model: LoopLMForCausalLM, features: list, collator: PadCollator, target: str, stage2: Stage2Section,
    targets: dict[str, Any], cfg: GateTrainingConfig, selection: Selection | None,
) -> tuple[float, list[dict], dict[str, dict[str, torch.Tensor]]]:
    """One Stage-II run with `target` ("ouro" or "fitted"); -> (train loss, log history, snapshots by name)."""
    snapshots = GateSnapshots(model, cfg.select_every, target) if cfg.select_every > 0 and selection else None
    fitted = target == "fitted"
    trainer = GateTrainer(
        model=model,
        args=trainer_args(cfg, use_cpu=model.device.type == "cpu"),
        train_dataset=features,
        data_collator=collator,
        callbacks=[snapshots] if snapshots else None,
        k=targets["k_per_nat"],
        gamma=targets["gamma_nats"],
        alignment="next_loop" if fitted else stage2.alignment,  # a fitted label is about running loop t
        weighting="none" if fitted else stage2.weighting,  # hard labels: each token counts once
        target=target,
        epsilon=targets["epsilon_nats"],
    )
    output = trainer.train()
    model.eval()
    return output.training_loss, trainer.state.log_history, snapshots.snapshots if snapshots else {}


# ----------------------------------------------------------------------------------------------------------
# Tuned checkpoint


def save_tuned(model: LoopLMForCausalLM, source: str | Path, out_dir: str | Path, threshold: float) -> Path:
    """The input folder with the tuned gate and `early_exit_threshold`; every other file copied as it was.

    The config saved is the source's own (not the loaded model's, whose dtype and special ids loading changed)
    with the threshold set; weights are saved in the source's dtype. `model` is left in that dtype.
    """
    check_threshold(threshold)
    source, out = Path(source), Path(out_dir)
    config = LoopLMConfig.from_pretrained(str(source))
    config.early_exit_threshold = float(threshold)
    dtype = config.dtype or torch.float32
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.config = config
    model.save_pretrained(out)
    for item in source.iterdir():  # tokenizer files, generation config, recipe configs, ...
        if item.is_file() and item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, out / item.name)
    return out


# ----------------------------------------------------------------------------------------------------------
# Recipes


def run_gate(config: GateRecipeConfig) -> dict[str, Any]:
    """Stage II with frontiers before and after; -> results (also in <output_dir>/results.json)."""
    check_checkpoint(config.model.path)
    torch.manual_seed(config.training.seed)
    out = Path(config.training.output_dir)
    tokenizer = config.model.tokenizer()  # Ouro's eos = <|im_end|>: where generation stops
    train, held_out = load_train_examples(config.data, tokenizer), load_eval_examples(config.data, tokenizer)
    require_examples(train, "data.train")
    require_examples(held_out, "held-out data")
    selection = None
    if config.data.val_rows > 0:
        train, val = train[: -config.data.val_rows], train[-config.data.val_rows :]
        require_examples(train, "data.train (after taking data.val_rows off it)")
        selection = Selection(val, tokenizer, config.eval.q_grid, config.eval.batch_size,
                              config.training.select_tolerance, config.training.select_exact_tolerance,
                              config.select)
    model = load_model(config.model, tokenizer)
    num_loops = model.config.total_ut_steps
    check_stage2_args(config.stage2.k, num_loops)

    logger.info("frontier with the checkpoint's (Stage-I) gate on %d held-out examples", len(held_out))
    before = frontier(model, tokenizer, held_out, base_rules(num_loops, config.eval, UNTUNED), config.eval,
                      config.model.eval_dtype)
    logger.info("Stage II on %d examples", len(train))
    training = tune_gate(model, train, config.stage2, config.training, tokenizer.pad_token_id, selection)
    offered = (training.get("selection") or {}).get("validated_q", config.eval.q_grid)
    after = frontier(model, tokenizer, held_out, q_exit_rules(offered, TUNED), config.eval, config.model.eval_dtype)
    points = [*before, *after]
    pick = pick_threshold(points, TUNED, num_loops, config.select.target_avg_loops, config.select.max_accuracy_drop)
    model_dir = save_tuned(model, config.model.path, out / MODEL_DIR, float(pick.param))
    note = "\n\n".join(filter(None, [
        static_note(points, num_loops), target_note(training),
        selection_note(training.get("selection")), pick_note(pick, points, num_loops, config.select),
    ]))
    paths = write_frontier(points, out, title=f"{config.model.path}: Stage-I vs Stage-II gate", note=note)
    save_config(config, out / "gate_config.yaml")
    results = summarize(points, pick, num_loops) | {
        "stage2_target_used": training["target_used"], "train_loss": training["train_loss"],
        "stage2_targets": training["targets"], "gate_selection": training.get("selection"),
        "model_dir": str(model_dir), **{k: str(v) for k, v in paths.items()},
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
    logger.info("frontier (%s):\n%s", paths["md"], paths["md"].read_text())
    gap = results["tuned_vs_untuned"]
    logger.info("tuned vs untuned gate over %s average loops: min gap %.4f (%s) at %.3f loops; tuned below on %s",
                gap["depth_range"], gap["min_gap"], gap["metric"], gap["at_loops"], gap["below"] or "no interval")
    logger.info("%s", static_note(points, num_loops))
    logger.info("chosen q %.3g: %.2f loops per token (%.1f%% fewer than static T), accuracy drop %s",
                results["chosen_q"], pick.avg_loops, 100 * results["loops_saved_vs_static_T"],
                results["accuracy_drop_vs_static_T"])
    return results


def run_eval(config: EvalRecipeConfig) -> dict[str, Any]:
    """The frontier of one checkpoint with its own gate; -> results (also in <output_dir>/results.json)."""
    check_checkpoint(config.model.path)
    tokenizer = config.model.tokenizer()  # Ouro's eos = <|im_end|>: where generation stops
    held_out = load_eval_examples(config.data, tokenizer)
    require_examples(held_out, "held-out data")
    model = load_model(config.model, tokenizer)
    num_loops = model.config.total_ut_steps
    points = frontier(model, tokenizer, held_out, base_rules(num_loops, config.eval, config.gate_label),
                      config.eval, config.model.eval_dtype)
    out = Path(config.output_dir)
    paths = write_frontier(points, out, title=str(config.model.path))
    save_config(config, out / "eval_config.yaml")
    results = {"points": [asdict(p) for p in points], **{k: str(v) for k, v in paths.items()}}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
    logger.info("frontier (%s):\n%s", paths["md"], paths["md"].read_text())
    return results


def selection_note(selection: dict[str, Any] | None) -> str:
    """What frontier.md says about held-out selection, so that a reader of the table knows which gate it shows."""
    if selection is None:
        return ""
    kept = "the starting gate" if selection["kept_starting_gate"] else selection["kept"]
    return (f"{TUNED}: held-out selection kept {kept} ({selection['criterion']}) on "
            f"{selection['validation_rows']} validation rows taken off the training rows; q offered (validated): "
            f"{selection['validated_q']}; areas: "
            + ", ".join(f"{name}: {area:.5f}" for name, area in selection["areas"].items()))


def target_note(training: dict[str, Any]) -> str:
    used, tried = training["target_used"], ", ".join(training["log_history"])
    what = "none (the starting gate was kept)" if used == START else f"{used} (gate_tuning.stage2)"
    return f"{TUNED}: Stage-II targets used: {what}; targets tried: {tried}."


def static_note(points: list[FrontierPoint], num_loops: int) -> str:
    """Each Q-exit curve against the static-depth frontier, in the table's metric, for frontier.md and the log."""
    lines = []
    for rule in (UNTUNED, TUNED):
        gaps = static_gaps([p for p in points if p.rule == rule], [p for p in points if p.rule == "static"])
        if not gaps:
            continue
        unit = "points" if gaps["metric"] == "accuracy" else "nats of -loss"
        scale = 100 if gaps["metric"] == "accuracy" else 1
        lines.append(f"{rule} vs static depths 1..{num_loops} ({gaps['metric']}): {gaps['above']} of "
                     f"{gaps['points']} points above (best {scale * gaps['max_gap']:+.4g} {unit} at "
                     f"{gaps['max_at']:.2f} loops), {gaps['below']} below (worst {scale * gaps['min_gap']:+.4g} at "
                     f"{gaps['min_at']:.2f} loops)")
    return "\n".join(lines)


def pick_note(pick: FrontierPoint, points: list[FrontierPoint], num_loops: int, select: SelectSection) -> str:
    static_t = next(p for p in points if p.rule == "static" and p.param == num_loops)
    acc = "" if pick.accuracy is None else f" at {100 * pick.accuracy:.1f}%"
    ref = "" if static_t.accuracy is None else f" ({100 * static_t.accuracy:.1f}% at static {num_loops})"
    return (f"Chosen q = {pick.param} for the budget ({budget_text(select)}): {pick.avg_loops:.2f} loops per token{acc}{ref}, "
            f"{100 * (1 - pick.avg_loops / num_loops):.1f}% fewer loops than static {num_loops}.")


def summarize(points: list[FrontierPoint], pick: FrontierPoint, num_loops: int) -> dict[str, Any]:
    """The chosen q, loops saved against static T, and how the tuned curve compares with the untuned one."""
    static_t = next(p for p in points if p.rule == "static" and p.param == num_loops)
    tuned, untuned = [p for p in points if p.rule == TUNED], [p for p in points if p.rule == UNTUNED]
    static = [p for p in points if p.rule == "static"]
    metric = "accuracy" if static_t.accuracy is not None else "loss"
    return {
        "chosen_q": float(pick.param),
        "chosen_point": asdict(pick),
        "static_T": asdict(static_t),
        "loops_saved_vs_static_T": 1.0 - pick.avg_loops / num_loops,
        "accuracy_drop_vs_static_T": None if pick.accuracy is None else static_t.accuracy - pick.accuracy,
        "tuned_vs_untuned": comparison_summary(compare_frontiers(tuned, untuned, metric), metric),
        "tuned_vs_static": static_gaps(tuned, static),
        "untuned_vs_static": static_gaps(untuned, static),
        "points": [asdict(p) for p in points],
    }


def comparison_summary(comparison: FrontierComparison, metric: str) -> dict[str, Any]:
    return {"metric": metric, "tuned_at_or_above_untuned": comparison.a_at_or_above_b, **asdict(comparison)}


__all__ = [
    "DataSection",
    "EvalRecipeConfig",
    "EvalSection",
    "GateRecipeConfig",
    "GateTrainingConfig",
    "ModelSection",
    "Stage2Section",
    "check_checkpoint",
    "run_eval",
    "run_gate",
    "save_tuned",
    "selection_note",
    "static_note",
    "tune_gate",
]

_ = looplm  # `import looplm` registers the Auto classes
