"""Shared fixtures: tiny LoopLMs built in code (no downloads), in the spirit of transformers' model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import looplm
import looplm.tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tiny_config(**overrides) -> looplm.LoopLMConfig:
    """hidden 32, 2 layers, vocab 99, T = 4 unless overridden (looplm.tiny's "test" size)."""
    return looplm.tiny.tiny_config("test", **overrides)


def tiny_model(seed: int = 0, **overrides) -> looplm.LoopLMForCausalLM:
    """The "test" size with a spread-out exit gate (the default init keeps lambda near 0.5 everywhere)."""
    return looplm.tiny.tiny_model("test", seed=seed, **overrides)


@pytest.fixture
def model() -> looplm.LoopLMForCausalLM:
    return tiny_model()
