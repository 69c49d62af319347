"""Shared fixtures: tiny LoopLMs built in code (no downloads), in the spirit of transformers' model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import looplm

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tiny_config(**overrides) -> looplm.LoopLMConfig:
    """hidden 32, 2 layers, vocab 99, T = 4 unless overridden."""
    fields = dict(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        total_ut_steps=4, max_position_embeddings=512,
    )
    fields.update(overrides)
    return looplm.LoopLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> looplm.LoopLMForCausalLM:
    torch.manual_seed(seed)
    model = looplm.LoopLMForCausalLM(tiny_config(**overrides)).eval()
    # A gate with a spread of logits (the default init keeps lambda near 0.5 everywhere).
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 1.0)
    return model


@pytest.fixture
def model() -> looplm.LoopLMForCausalLM:
    return tiny_model()
