"""The YAML/override loader: defaults from dataclasses; unknown keys, wrong types and out-of-range values named
at load time; TRL's TrainingArguments classes as `training:` sections; saved configs load back unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from configs import CONFIG_DIR, ConfigError, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Stage:
    name: str = "a"
    q: float = 1.0

    def check(self) -> None:
        if not 0.0 <= self.q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {self.q}")


@dataclass
class Recipe:
    steps: int = 10
    name: str = "x"
    objective: Literal["final", "stage1", "mean"] = "final"
    max_rows: int | None = None
    use_lora: bool = False
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=lambda: [Stage()])
    batch: int = 8
    groups: int = 4

    def check(self) -> None:
        if self.batch % self.groups:
            raise ValueError(f"batch ({self.batch}) must be divisible by groups ({self.groups})")


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "steps: 20\noptim:\n  lr: 3\n")
    config = load_config(Recipe, path, ["optim.betas=[0.8, 0.9]", "name=run1", "max_rows=5", "use_lora=true"])
    assert config == Recipe(steps=20, name="run1", max_rows=5, use_lora=True, optim=Optim(lr=3.0, betas=(0.8, 0.9)))
    assert isinstance(config.optim.lr, float)
    assert load_config(Recipe) == Recipe()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 3\n", [], r"r\.yaml: unknown key\(s\) \['stepz'\] for Recipe \('stepz': did you mean 'steps'\?\)"),
        ("optim:\n  momentum: 1\n", [], r"r\.yaml: unknown key\(s\) \['optim\.momentum'\] for Optim"),
        ("steps: many\n", [], r"r\.yaml: key 'steps': expected int, got 'many'"),
        ("", ["objective=ppo"], r"override 'objective=ppo': key 'objective': expected one of \['final', 'stage1', 'mean'\]"),
        ("", ["use_lora=1"], r"key 'use_lora': expected true/false"),
        ("", ["steps"], r"override 'steps': expected key=value"),
        ("- 1\n- 2\n", [], r"expected a mapping of keys at the top level"),
        ("stages:\n  - {q: 0.5}\n  - {q: 1.5}\n", [], r"r\.yaml: key 'stages\[1\]': q must be in \[0, 1\], got 1\.5"),
        ("batch: 6\n", [], r"r\.yaml: batch \(6\) must be divisible by groups \(4\)"),
        ("optim: 3\n", [], r"key 'optim': expected a mapping for Optim, got 3"),
        ("steps: [1\n", [], r"r\.yaml: not valid YAML"),
    ],
)
def test_bad_input_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recipe, write(tmp_path, text), overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_every_config_in_the_repo_loads():
    """torchtune's rule: every YAML shipped is loaded by a test, into the recipe it names on its first line,
    and its saved form loads back to the same config."""
    import importlib
    import re
    import tempfile
    import typing
    from pathlib import Path

    import torch
    from transformers import TrainingArguments

    from run import RECIPES

    shipped = sorted(CONFIG_DIR.glob("*.yaml"))
    assert shipped
    for path in shipped:
        text = path.read_text()
        first = text.splitlines()[0]
        match = re.search(r"python run\.py (\w+)", first)
        assert match, f"{path.name}: first line must give the command that runs it, got {first!r}"
        module, config_class, _ = RECIPES[match.group(1)]
        cls = getattr(importlib.import_module(module), config_class)
        # A GPU recipe's TRL section refuses bf16 on a machine without one: load it as it would run on CPU.
        on_cpu = ["training.bf16=false", "training.use_cpu=true"]
        training = typing.get_type_hints(cls).get("training")
        trl_section = isinstance(training, type) and issubclass(training, TrainingArguments)
        gpu_only = trl_section and "  bf16: true" in text and not torch.cuda.is_available()
        config = load_config(cls, path, on_cpu if gpu_only else None)
        with tempfile.TemporaryDirectory() as tmp:
            save_config(config, Path(tmp) / "saved.yaml")
            assert load_config(cls, Path(tmp) / "saved.yaml") == config, path.name


def test_exponent_floats_and_overrides_after_the_config_flag(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string; OmegaConf as a float
    assert load_config(Recipe, path, ["steps=3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="override 'optim.lr=fast': key 'optim.lr': expected float, got 'fast'"):
        load_config(Recipe, None, ["optim.lr=fast"])
    from run import parse_args

    args = parse_args(["sft", "--config", "x.yaml", "a=1", "b.c=2"])
    assert (args.recipe, args.config, args.overrides) == ("sft", "x.yaml", ["a=1", "b.c=2"])
    assert parse_args([]).recipe == "demo"
    assert parse_args(["fresh=true"]).recipe == "demo"  # a key=value first: the demo's override
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        parse_args(["nope"])


def test_saved_config_loads_back_unchanged(tmp_path):
    config = load_config(Recipe, None, ["optim.betas=[0.5, 0.6]", "stages=[{name: b, q: 0.25}]", "max_rows=3"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(Recipe, tmp_path / "saved.yaml") == config
    assert to_dict(config)["optim"]["betas"] == [0.5, 0.6]


def test_interpolation_between_keys(tmp_path):
    config = load_config(Recipe, write(tmp_path, "name: run-${steps}\n"), ["steps=7"])
    assert config.name == "run-7"
