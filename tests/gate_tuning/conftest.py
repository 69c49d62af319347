"""A tiny LoopLM checkpoint folder with its tokenizer (random weights, spread-out gate), built in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from looplm.tiny import tiny_model
from looplm.tokenizer import build_tokenizer, fix_ouro_special_tokens
from posttrain.synthetic import arithmetic_traces


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Hidden-32 models gain nothing from intra-op threads; on a busy 2-core machine two threads slow them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    rows = arithmetic_traces(64, seed=seed)
    tokenizer = build_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    model = tiny_model("test", seed=seed, vocab_size=len(tokenizer), **overrides)
    fix_ouro_special_tokens(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_looplm"))
