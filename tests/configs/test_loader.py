"""The YAML/override loader: defaults from dataclasses, unknown keys and wrong types named at load time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from configs import CONFIG_DIR, ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Recipe:
    steps: int = 10
    name: str = "x"
    objective: Literal["final", "stage1", "mean"] = "final"
    max_rows: int | None = None
    use_lora: bool = False
    optim: Optim = field(default_factory=Optim)


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3\n")
    config = load_config(Recipe, path, ["optim.betas=[0.8, 0.9]", "name=run1", "max_rows=5", "use_lora=true"])
    assert config == Recipe(steps=20, name="run1", max_rows=5, use_lora=True, optim=Optim(lr=3.0, betas=(0.8, 0.9)))
    assert isinstance(config.optim.lr, float)
    assert load_config(Recipe) == Recipe()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 3\n", [], r"r\.yaml: unknown key\(s\) \['stepz'\] for Recipe"),
        ("optim:\n  momentum: 1\n", [], r"unknown key\(s\) \['momentum'\] for Optim"),
        ("steps: many\n", [], r"key 'steps': expected int, got 'many'"),
        ("", ["objective=ppo"], r"key 'objective': expected one of \['final', 'stage1', 'mean'\]"),
        ("", ["use_lora=1"], r"key 'use_lora': expected true/false"),
        ("", ["steps"], r"override 'steps': expected key=value"),
        ("- 1\n- 2\n", [], r"expected a mapping of keys at the top level"),
    ],
)
def test_bad_input_names_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Recipe, path, overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_every_config_in_the_repo_loads():
    """torchtune's rule: every YAML shipped is loaded by a test, into the recipe it names on its first line."""
    import importlib
    import re

    from run import RECIPES

    shipped = sorted(CONFIG_DIR.glob("*.yaml"))
    for path in shipped:
        first = path.read_text().splitlines()[0]
        match = re.search(r"python run\.py (\w+)", first)
        assert match, f"{path.name}: first line must give the command that runs it, got {first!r}"
        module, config_class, _ = RECIPES[match.group(1)]
        load_config(getattr(importlib.import_module(module), config_class), path)


def test_exponent_floats_and_overrides_after_the_config_flag(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert load_config(Recipe, path, ["steps=3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="key 'lr': expected float, got 'fast'"):
        load_config(Recipe, None, ["optim.lr=fast"])
    from run import parse_args

    args = parse_args(["sft", "--config", "x.yaml", "a=1", "b.c=2"])
    assert (args.recipe, args.config, args.overrides) == ("sft", "x.yaml", ["a=1", "b.c=2"])
    assert parse_args([]).recipe == "demo"
    with pytest.raises(SystemExit):  # argparse: unknown recipe
        parse_args(["nope"])
