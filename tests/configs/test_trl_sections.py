"""A field typed as a transformers.TrainingArguments subclass (TRL's GRPOConfig, SFTConfig) is a recipe's
`training:` section: built from exactly the keys given, TRL's defaults and validation for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from trl import GRPOConfig, SFTConfig

from configs import ConfigError, load_config, save_config, to_dict

CPU = dict(use_cpu=True, bf16=False, report_to="none")


@dataclass
class GRPORecipe:
    steps: int = 3
    training: GRPOConfig = field(default_factory=lambda: GRPOConfig(output_dir="out/default", **CPU))


@dataclass
class SFTRecipe:
    training: SFTConfig = field(default_factory=lambda: SFTConfig(output_dir="out/sft", **CPU))


GRPO_YAML = """\
training:
  output_dir: out/grpo
  use_cpu: true
  bf16: false
  report_to: none
  learning_rate: 1.0e-6
  num_generations: 4
  per_device_train_batch_size: 8
  epsilon_high: 0.28
  lr_scheduler_type: constant_with_warmup
"""


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_section_is_built_from_the_keys_given(tmp_path):
    config = load_config(GRPORecipe, write(tmp_path, GRPO_YAML), ["training.max_steps=5"])
    args = config.training
    assert isinstance(args, GRPOConfig)
    assert (args.learning_rate, args.num_generations, args.epsilon_high, args.max_steps) == (1e-6, 4, 0.28, 5)
    assert args.lr_scheduler_type.value == "constant_with_warmup"
    assert args.loss_type == GRPOConfig(**CPU).loss_type  # a key not given keeps TRL's default
    assert args.output_dir == "out/grpo"


def test_missing_section_uses_the_default_factory(tmp_path):
    config = load_config(GRPORecipe, write(tmp_path, "steps: 4\n"))
    assert config.training.output_dir == "out/default" and config.training.use_cpu


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.learnig_rate=1e-3"], r"override 'training\.learnig_rate=1e-3': unknown key\(s\) "
         r"\['training\.learnig_rate'\] for GRPOConfig \('learnig_rate': did you mean 'learning_rate'"),
        (["training.num_generations=3"], r"section 'training' \(GRPOConfig\): .*divisible"),
        (["training.lr_scheduler_type=wiggly"], r"section 'training' \(GRPOConfig\): .*wiggly"),
        (["training=3"], r"key 'training': expected a mapping of GRPOConfig options"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_file(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPORecipe, write(tmp_path, GRPO_YAML), overrides)


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key\(s\) \['training\.num_generation'\].*'num_generations'"):
        load_config(GRPORecipe, write(tmp_path, GRPO_YAML + "  num_generation: 4\n"))


@pytest.mark.parametrize(
    ("recipe", "text"),
    [
        (GRPORecipe, GRPO_YAML),
        (SFTRecipe, "training:\n  output_dir: o\n  use_cpu: true\n  bf16: false\n  report_to: none\n"
                    "  max_length: 128\n  packing: true\n  completion_only_loss: false\n  eos_token: <|im_end|>\n"),
    ],
)
def test_saved_section_holds_only_the_changes_and_loads_back(tmp_path, recipe, text):
    config = load_config(recipe, write(tmp_path, text))
    saved = to_dict(config)["training"]
    given = {line.split(":")[0].strip() for line in text.splitlines()[1:]}
    # only keys the file gave, and each of them that differs from TRL's default (GRPOConfig's learning_rate
    # 1e-6 and batch 8 are its defaults; report_to "none" is too)
    assert set(saved) <= given, saved
    assert {"output_dir", "use_cpu", "bf16"} <= set(saved)
    assert {"num_generations", "epsilon_high", "lr_scheduler_type"} <= set(saved) or recipe is SFTRecipe
    assert {"max_length", "packing", "completion_only_loss", "eos_token"} <= set(saved) or recipe is GRPORecipe
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(recipe, tmp_path / "saved.yaml") == config
    assert to_dict(load_config(recipe))["training"]["output_dir"] == recipe().training.output_dir
