"""Shared fixtures: tiny LoopLMs built in code (no downloads), in the spirit of transformers' model tests.
The helpers behind them, and every other helper test modules share, are in tests/helpers.py."""

from __future__ import annotations

import pytest

import looplm
from tests.helpers import tiny_model


@pytest.fixture
def model() -> looplm.LoopLMForCausalLM:
    return tiny_model()
