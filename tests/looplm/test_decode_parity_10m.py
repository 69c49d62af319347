"""Cached decoding against the full forward on a >= 10M-parameter LoopLM over >= 1,000 positions (fp32).

The gap printed here is the number quoted in the foundation issue's closing note (`pytest -s` shows it).
"""

from __future__ import annotations

import pytest
import torch

import looplm
from looplm.tiny import tiny_model
from tests.helpers import decode_incrementally


@pytest.fixture(scope="module")
def model_10m() -> looplm.LoopLMForCausalLM:
    model = tiny_model("10m", seed=0, gate_std=None)
    assert sum(p.numel() for p in model.parameters()) >= 10_000_000
    return model


@torch.no_grad()
@pytest.mark.parametrize("depth", ["fixed", "per_token_exit"])
def test_cached_decoding_matches_full_forward_at_10m_params(model_10m, depth):
    torch.manual_seed(1)
    batch, length, prompt = 4, 260, 20  # 4 x 240 decoded + 80 prefilled = 1,040 positions
    ids = torch.randint(0, 8192, (batch, length))
    steps = None
    if depth == "per_token_exit":
        steps = torch.randint(1, 5, (batch, length))
        steps[:, :prompt] = 4
    full = model_10m(ids, exit_steps=steps, use_cache=False).logits.log_softmax(-1)
    incremental = decode_incrementally(model_10m, ids, prompt_len=prompt, exit_steps=steps)[0].log_softmax(-1)
    gap = (full - incremental).abs()
    print(f"\n[{depth}] {batch * length} positions, max |dlogp| = {gap.max():.3e}, mean = {gap.mean():.3e}")
    assert gap.max().item() <= 1e-5
