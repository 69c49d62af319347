"""`run.py init`: a random LoopLM of a `looplm.tiny` size, saved as a model folder.

Creating a model is this explicit command only (seeded; it refuses to overwrite a model folder unless
`overwrite=true`): `run.py rollout` and `run.py parity` take an existing folder, so a mistyped path is an
error, never a new random model.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from configs import ConfigError
from looplm import LoopLMConfig
from looplm.tiny import TINY_SIZES, tiny_model

logger = logging.getLogger(__name__)



@dataclass
class InitConfig:
    """A random LoopLM of one of `looplm.tiny.TINY_SIZES`, saved as a model folder."""

    output: str = "runs/looplm-random-tiny"
    size: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # LoopLMConfig fields, e.g. {total_ut_steps: 6}
    seed: int = 0
    gate_std: float | None = 1.0  # exit-gate weight std (None: transformers' init, every lambda near 0.5)
    overwrite: bool = False  # replace a model folder already at `output`

    def check(self) -> None:
        if self.size not in TINY_SIZES:
            raise ValueError(f"size must be one of {sorted(TINY_SIZES)}, got {self.size!r}")
        known = set(LoopLMConfig().to_dict())
        for key in self.overrides:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
                raise ValueError(f"overrides.{key} is not a LoopLMConfig field{hint}")
        if self.gate_std is not None and self.gate_std < 0:
            raise ValueError(f"gate_std must be >= 0, got {self.gate_std}")



def init_model(config: InitConfig) -> Path:
    """Save a seeded random LoopLM of `config.size` (plus overrides) in `config.output`."""
    folder = Path(config.output)
    if (folder / "config.json").exists() and not config.overwrite:
        raise ConfigError(f"output: {folder} already holds a model (config.json); set overwrite=true to replace it")
    model = tiny_model(config.size, seed=config.seed, gate_std=config.gate_std, **config.overrides)
    model.save_pretrained(folder)
    logger.info("saved a random %s LoopLM (%.2fM parameters) in %s", config.size, parameter_count(model) / 1e6, folder)
    return folder


def ensure_model(path: str, init: InitConfig) -> Path:
    """The folder at `path`, created from `init` first if it holds no model (for benchmarks that own it)."""
    folder = Path(path)
    if (folder / "config.json").exists():
        return folder
    return init_model(dataclasses.replace(init, output=str(folder)))



def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def run_init(config: InitConfig) -> Path:
    folder = init_model(config)
    print(f"random {config.size} LoopLM saved in {folder}")
    return folder



__all__ = ["InitConfig", "ensure_model", "init_model", "run_init"]
