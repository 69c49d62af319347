"""`run.py --help` and `run.py <recipe> --help` list the recipes' keys from their dataclasses; a bad recipe or key
is an error that names it and what is valid. Also: every real-scale config states the hardware it assumes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import pytest
import torch

from configs import CONFIG_DIR, UserError, describe, load_config
from run import RECIPES, config_class, config_summary, main, parse_args


@dataclasses.dataclass
class Inner:
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    steps: int = 3
    name: str | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_describe_lists_nested_keys_with_types_and_defaults():
    assert describe(Outer) == [("steps", "int", 3), ("name", "str | None", None), ("inner.mode", "{a, b}", "a")]


def test_help_lists_every_recipe_and_its_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for recipe in RECIPES:
        assert f"\n{recipe}: " in out
    assert "  objective.kind: {final, stage1, mean} = 'final'" in out  # sft, from ObjectiveSection
    assert "  training.*: every option of trl.SFTConfig" in out and "  training.*: every option of trl.GRPOConfig" in out
    assert "  rollout.depth.policy: " in out  # grpo's nested DepthConfig


def test_recipe_help_lists_its_trl_options_with_the_recipes_defaults(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sft: ") and "\ngrpo: " not in out
    assert "    training.learning_rate: float = " in out
    assert f"    training.activation_checkpointing: bool | None = {str(torch.cuda.is_available()).lower()}" in out


def test_unknown_recipe_and_key_are_named_with_the_valid_ones(capsys):
    assert main(["sfft"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'sfft' (did you mean 'sft'?)" in err and "grpo" in err
    assert main(["sft", "--config", str(CONFIG_DIR / "sft_tiny.yaml"), "training.learnig_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and "run.py sft --help" in err


def test_real_scale_configs_state_their_hardware():
    shipped = sorted(CONFIG_DIR.glob("*_ouro_1.4b*.yaml"))
    recipes = {path.read_text().split()[3] for path in shipped}  # "# python run.py <recipe> ..."
    assert recipes >= {"sft", "grpo", "gate"}
    for path in shipped:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(line.startswith("# Hardware assumed:") for line in header), path.name


def test_the_demo_prints_the_frontier_table_once_in_its_report():
    """The gate recipe logs its frontier table; in the demo the report prints it, so the log line is dropped."""
    from cli.demo import quiet_terminal

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    log, collect = logging.getLogger("gate_tuning.recipe"), Collect()
    filters, level = list(log.filters), log.level
    log.addHandler(collect)
    log.setLevel(logging.INFO)
    try:
        quiet_terminal()
        log.info("frontier (%s):\n%s", "frontier.md", "| rule | param |")
        log.info("chosen q %.3g: %.2f loops per token", 0.4, 2.29)
    finally:
        log.filters[:] = filters
        log.removeHandler(collect)
        log.setLevel(level)
    assert collect.messages == ["chosen q 0.4: 2.29 loops per token"]


@pytest.mark.parametrize(("argv", "form"), [
    (["--fresh"], "python run.py demo fresh=true"),
    (["grpo", "--model.path=x"], "python run.py grpo model.path=x"),
])
def test_an_option_that_is_a_key_points_to_the_key_value_form(capsys, argv, form):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert form in err and len(err.strip().splitlines()) == 1


def test_help_as_a_word_is_help(capsys):
    assert main(["help"]) == 0
    assert "\ngrpo: " in capsys.readouterr().out


def test_a_missing_model_folder_is_one_line_or_a_traceback_on_request(tmp_path, capsys, monkeypatch):
    argv = ["grpo", "--config", str(CONFIG_DIR / "grpo_tiny.yaml"), f"model.path={tmp_path / 'sft'}",
            f"training.output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"run.py grpo: model.path: {tmp_path / 'sft'}: no such folder" in err and "run.py init" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("run.py")]) == 1
    with pytest.raises(UserError, match="no such folder"):
        main([*argv, "--traceback"])
    monkeypatch.setenv("LOOPRL_TRACEBACK", "1")
    with pytest.raises(UserError, match="no such folder"):
        main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import cli.init

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(cli.init, "run_init", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["init"])


def test_the_terminal_gets_a_summary_of_the_config():
    args = parse_args(["grpo", "--config", "configs/grpo_tiny.yaml", "training.max_steps=3"])
    config = load_config(config_class("grpo"), args.config, args.overrides)
    text = config_summary(args, config)
    assert len(text.splitlines()) == 3
    assert "configs/grpo_tiny.yaml + 1 override(s)" in text and "training.max_steps=3" in text
    assert "model.path='outputs/demo/sft'" in text and "--print-config" in text
