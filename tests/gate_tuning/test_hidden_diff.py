"""The hidden-state-difference exit rule: in the model's forward, in DepthConfig, and replayable from a rollout."""

from __future__ import annotations

import pytest
import torch

from looplm import LoopKVCache
from looplm.tiny import tiny_model
from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import check_parity
from rollout.torch_engine import TorchEngine

EPS = 0.8  # on this random model's states (relative changes 0.3 to 1.1) it gives a mix of depths


@pytest.fixture(scope="module")
def model():
    return tiny_model("test", seed=0)


@torch.no_grad()
def test_exit_is_the_first_loop_whose_relative_change_is_below_eps(model):
    ids = torch.randint(3, 99, (3, 20), generator=torch.Generator().manual_seed(0))
    steps = model(ids, exit_hidden_eps=EPS).exit_steps
    assert len(steps.unique()) >= 2
    # The states of the replay (same exits, so the same "last exited" K/V) hold the rule at every token:
    # the change is >= eps at loops 2..e-1 and < eps at its exit loop e (unless e = T, where all exit).
    states = model(ids, exit_steps=steps, output_loop_states=True).loop_hidden_states
    change = torch.stack([(states[t] - states[t - 1]).norm(dim=-1) / states[t - 1].norm(dim=-1) for t in range(1, 4)])
    for loop in (2, 3, 4):
        running = steps > loop
        assert (change[loop - 2][running] >= EPS).all()
        exits = steps == loop
        if loop < 4:
            assert (change[loop - 2][exits] < EPS).all()
    assert model(ids, exit_hidden_eps=0.0).exit_steps.eq(4).all()
    assert model(ids, exit_hidden_eps=10.0).exit_steps.eq(2).all()  # never at loop 1: nothing to compare with


@torch.no_grad()
def test_cached_decoding_matches_the_parallel_forward(model):
    ids = torch.randint(3, 99, (4, 24), generator=torch.Generator().manual_seed(1))
    cache = LoopKVCache(model.config)
    logits, steps = [model(ids[:, :6], cache=cache).logits], [torch.full((4, 6), 4)]
    for i in range(6, 24):
        out = model(ids[:, i : i + 1], cache=cache, exit_hidden_eps=EPS)
        logits.append(out.logits)
        steps.append(out.exit_steps)
    steps = torch.cat(steps, dim=1)
    replay = model(ids, exit_steps=steps, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), replay, rtol=0, atol=1e-5)
    # A one-chunk forward of the same tokens after the same prefill decides the same exits.
    cache = LoopKVCache(model.config)
    model(ids[:, :6], cache=cache)
    chunk = model(ids[:, 6:], cache=cache, exit_hidden_eps=EPS)
    assert torch.equal(chunk.exit_steps, steps[:, 6:])


def test_engine_rollouts_at_hidden_diff_depth_replay_exactly(model):
    depth = DepthConfig(policy="hidden_diff", hidden_eps=EPS)
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    records = TorchEngine(model).generate(prompts, sampling, depth)
    assert check_parity(model, records, sampling).stats().max_abs_gap <= 1e-5
    assert {e for r in records for e in r.exit_steps[:-1]} >= {2, 4}


def test_bad_arguments_are_named(model):
    ids = torch.randint(3, 99, (1, 4))
    with pytest.raises(ValueError, match="exit_hidden_eps must be >= 0"):
        model(ids, exit_hidden_eps=-0.1)
    with pytest.raises(ValueError, match="one depth rule"):
        model(ids, exit_hidden_eps=0.1, exit_threshold=0.5)
    with pytest.raises(ValueError, match="hidden_eps must be >= 0"):
        DepthConfig(policy="hidden_diff", hidden_eps=-1.0).check()
    assert DepthConfig(policy="hidden_diff", hidden_eps=0.2).label() == "hidden_diff(eps=0.2)"
    assert DepthConfig(policy="hidden_diff", hidden_eps=0.2).decode_kwargs() == {"exit_hidden_eps": 0.2}
