"""The inputs a config names: a missing local model folder is one line naming the command that makes it (never a
hub request); a hub name that cannot be loaded is one line; the tiny configs start from the demo's outputs."""

from __future__ import annotations

import pytest

from cli.demo import DemoConfig
from configs import CONFIG_DIR, UserError, load_config
from configs.inputs import DEMO_OUTPUT_DIR, hub_errors, looks_like_hub_name, model_folder, model_source


@pytest.mark.parametrize(
    ("path", "hub"),
    [("ByteDance/Ouro-1.4B", True), ("gpt2", True), ("outputs/demo/sft", False), ("./model", False),
     ("/abs/model", False), ("a/b/c", False)],
)
def test_what_could_be_a_hub_name(path, hub):
    assert looks_like_hub_name(path) is hub


def test_a_local_first_folder_makes_a_one_slash_path_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_name("runs/model")
    (tmp_path / "runs").mkdir()
    assert not looks_like_hub_name("runs/model")
    with pytest.raises(UserError, match=r"model.path: runs/model: no such folder .*run.py init"):
        model_source("runs/model")


def test_a_missing_demo_output_names_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"model.path: outputs/demo/sft: no such folder .*`python run.py`"):
        model_source("outputs/demo/sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no config.json in it"):
        model_folder("empty")
    assert model_source("org/name") == "org/name"  # left to the hub, under hub_errors


def test_an_unreachable_hub_is_one_line_and_local_errors_pass_through(tmp_path):
    with pytest.raises(UserError, match=r"^model.path: 'org/name' is not a local folder, .*: We couldn't connect$"):
        with hub_errors("model.path", "org/name"):
            raise OSError("We couldn't connect\nto the hub, and more lines")
    with pytest.raises(OSError, match="disk"):
        with hub_errors("model.path", str(tmp_path)):
            raise OSError("disk")


def test_the_tiny_configs_start_from_the_demos_outputs():
    from gate_tuning.recipe import EvalRecipeConfig, GateRecipeConfig
    from posttrain.grpo_recipe import GRPORecipeConfig

    demo = DemoConfig()
    assert demo.output_dir == DEMO_OUTPUT_DIR
    starts = {
        "grpo_tiny": (GRPORecipeConfig, "sft"),  # the demo's stage 1 (training.output_dir=<demo>/sft)
        "depth_rl_tiny": (GRPORecipeConfig, "grpo/model"),
        "gate_tiny": (GateRecipeConfig, "grpo/model"),  # stage 2's final model
        "eval_tiny": (EvalRecipeConfig, "gate/model"),  # stage 3's tuned folder
    }
    for name, (cls, sub) in starts.items():
        config = load_config(cls, CONFIG_DIR / f"{name}.yaml")
        assert config.model.path == f"{demo.output_dir}/{sub}", name
