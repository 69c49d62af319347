"""A tiny LoopLM checkpoint folder with its tokenizer (random weights, spread-out gate), built in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_checkpoint, single_thread

# Every gate test runs its hidden-32 models on one thread (see `single_thread`).
one_thread = pytest.fixture(autouse=True, scope="package", name="one_thread")(single_thread)


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_looplm"))
