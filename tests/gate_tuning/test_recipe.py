"""`run.py gate` / `run.py eval` end to end on a tiny checkpoint, the tuned folder, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs import CONFIG_DIR, ConfigError, UserError, load_config
from gate_tuning import recipe
from gate_tuning.recipe import (
    EvalRecipeConfig,
    GateRecipeConfig,
    load_train_examples,
    run_eval,
    run_gate,
    selection_note,
    tune_gate,
)
from gate_tuning.selection import Selection
from gate_tuning.stage2 import GATE_PREFIX
from looplm import LoopLMForCausalLM
from tests.helpers import make_checkpoint

SHRINK = [
    "data.train_rows=24", "data.eval_rows=6", "training.max_steps=4", "training.per_device_train_batch_size=8", "training.learning_rate=0.05",
    "training.logging_steps=2", "training.disable_tqdm=true", "eval.q_grid=[0.3, 0.8]",
    "eval.hidden_eps_grid=[0.5]", "eval.max_new_tokens=6", "eval.batch_size=4", "training.select_every=0",
    "data.val_rows=0", "stage2.target=ouro",  # gate_tiny.yaml's auto needs selection, off here for speed
]


def gate_cfg(checkpoint: Path, out: Path, *overrides: str) -> GateRecipeConfig:
    return load_config(GateRecipeConfig, CONFIG_DIR / "gate_tiny.yaml",
                       [f"model.path={checkpoint}", f"training.output_dir={out}", *SHRINK, *overrides])


def test_gate_recipe_tunes_only_the_gate_and_writes_the_frontier(checkpoint, tmp_path):
    results = run_gate(gate_cfg(checkpoint, tmp_path))
    tuned = tmp_path / "model"
    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != name.startswith(GATE_PREFIX), f"{name}: {'unchanged' if same else 'changed'}"
    config_in, config_out = (json.loads((d / "config.json").read_text()) for d in (checkpoint, tuned))
    assert config_out.pop("early_exit_threshold") == results["chosen_q"] != config_in.pop("early_exit_threshold")
    assert config_in == config_out
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tuned / name).read_bytes() == (checkpoint / name).read_bytes(), name
    rules = {p["rule"] for p in results["points"]}
    assert rules == {"static", "q_exit_stage1", "q_exit_stage2", "hidden_diff", "kv_sharing"}
    for name in ("frontier.csv", "frontier.md", "frontier.png", "results.json", "gate_config.yaml"):
        assert (tmp_path / name).is_file(), name


def test_held_out_selection_keeps_the_best_validation_snapshot(checkpoint, tmp_path):
    cfg = gate_cfg(checkpoint, tmp_path, "data.val_rows=6", "training.select_every=2")
    tokenizer = cfg.model.tokenizer()
    examples = load_train_examples(cfg.data, tokenizer)
    model = LoopLMForCausalLM.from_pretrained(str(checkpoint))
    start = {n: t.clone() for n, t in model.state_dict().items() if n.startswith(GATE_PREFIX)}
    selection = Selection(examples[-6:], tokenizer, [0.3, 0.8], batch_size=6)
    kept = tune_gate(model, examples[:-6], cfg.stage2, cfg.training, tokenizer.pad_token_id, selection)["selection"]
    areas, gaps, static = kept["areas"], kept["min_gap_to_start"], kept["min_gap_to_static"]
    assert sorted(areas) == ["ouro step 2", "ouro step 4", "start"] and kept["validation_rows"] == 6
    assert gaps["start"] == {"loss": 0.0, "exact_tf": 0.0}
    tols = kept["tolerances"]

    def above(g: dict[str, float]) -> bool:  # at or above in -loss and in exact match, within the tolerances
        return all(g[m] >= -tols[m] for m in tols)

    healthy = kept["starting_gate_at_or_above_static"]
    assert healthy == above(static["start"])
    eligible = [n for n in areas if above(static[n]) and (not healthy or above(gaps[n]))]
    assert kept["eligible"] == bool(eligible)
    if eligible:
        assert kept["kept"] in eligible
        # Ranked by the fewest loops at the budget (1 point of exact match below static T), then the areas.
        loops = kept["at_budget"]
        assert loops[kept["kept"]]["avg_loops"] == pytest.approx(min(loops[n]["avg_loops"] for n in eligible))
    else:
        assert kept["kept"] in areas
    gate_moved = any(not torch.equal(start[n], t) for n, t in model.state_dict().items() if n in start)
    assert gate_moved == (kept["kept"] != "start")
    note = selection_note(kept)
    assert "held-out selection kept" in note and "6 validation rows" in note


def test_eval_recipe_on_the_tuned_folder(checkpoint, tmp_path):
    cfg = load_config(EvalRecipeConfig, CONFIG_DIR / "eval_tiny.yaml", [
        f"model.path={checkpoint}", f"output_dir={tmp_path}", "data.eval_rows=4", "eval.q_grid=[0.5]",
        "eval.hidden_eps_grid=[0.5]", "eval.kv_modes=[last]", "eval.accuracy=false",
    ])
    results = run_eval(cfg)
    assert [(p["rule"], p["param"]) for p in results["points"]] == [
        ("static", 1), ("static", 2), ("static", 3), ("static", 4), ("q_exit", 0.5), ("hidden_diff", 0.5),
        ("kv_sharing", "last"),
    ]
    assert all(p["accuracy"] is None for p in results["points"])
    assert (tmp_path / "frontier.png").is_file()


@pytest.fixture
def no_compute(monkeypatch):
    """Loading the model is where compute starts: every bad input must fail before it."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(recipe, "load_model", refuse)


def test_a_checkpoint_without_a_gate_is_refused(checkpoint, tmp_path, no_compute):
    folder = tmp_path / "no_gate"
    folder.mkdir()
    for item in checkpoint.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith(GATE_PREFIX)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="no exit gate"):
        run_gate(gate_cfg(folder, tmp_path / "out"))


def test_one_loop_is_refused(tmp_path, no_compute):
    folder = make_checkpoint(tmp_path / "t1", total_ut_steps=1)
    with pytest.raises(ValueError, match="total_ut_steps = 1; exit rules need T >= 2"):
        run_gate(gate_cfg(folder, tmp_path / "out"))


def test_an_empty_dataset_is_refused(checkpoint, tmp_path, no_compute):
    with pytest.raises(ValueError, match="data.train: the dataset is empty"):
        run_gate(gate_cfg(checkpoint, tmp_path, "data.train_rows=0"))
    with pytest.raises(ValueError, match="the dataset is empty"):
        run_gate(gate_cfg(checkpoint, tmp_path, "data.max_length=8"))  # every row too long


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage2.k=0", "stage2.k must be > 0"),
        ("stage2.k=-5", "stage2.k must be > 0"),
        ("eval.q_grid=[0.5, 1.5]", r"q must be in \[0, 1\], got 1.5"),
        ("eval.q_grid=[-0.1]", r"q must be in \[0, 1\], got -0.1"),
        ("select.target_avg_loops=2.5", "exactly one of max_accuracy_drop and target_avg_loops"),
        ("training.select_every=5", "needs both training.select_every > 0 and data.val_rows > 0"),
        ("data.val_rows=5", "needs both training.select_every > 0 and data.val_rows > 0"),
        ("stage2.target=auto", "stage2.target = auto needs held-out selection"),
        ("stage2.epsilon=-1", "stage2.epsilon must be >= 0"),
        ("training.select_tolerance=-0.1", "training.select_tolerance must be >= 0"),
        ("stage2.target=oracle", "stage2.target"),
    ],
)
def test_bad_settings_fail_at_load_time(checkpoint, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        gate_cfg(checkpoint, tmp_path, override)


def test_a_missing_folder_is_named(tmp_path, no_compute):
    with pytest.raises(UserError, match="model.path: .*nowhere: no such folder"):
        run_gate(gate_cfg(tmp_path / "nowhere", tmp_path / "out"))
