"""Our engine with `compile_decode`: its fixed-depth steps run as one torch.compile graph, and give what the eager
engine and the training forward give. (Compiling the graphs, one row and several rows, takes about a minute on a
cold cache; the bench test in test_cli.py reuses them.)"""

from __future__ import annotations

import pytest
import torch

from looplm import decode
from rollout.engine import SamplingConfig
from rollout.parity import check_parity
from rollout.torch_engine import TorchEngine
from tests.helpers import ADAPTIVE, mixed_prompts, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = mixed_prompts(6)
SAMPLING = SamplingConfig(
    n=2, max_new_tokens=16, top_p=0.9, seed=5, return_distributions=True, stop_token_ids=list(range(3, 80))
)  # stop ids end rows at different steps: full batches run compiled, the others eagerly


class CountingCalls:
    """Wraps the model's compiled step from outside, to show that the compiled path ran."""

    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, x, *args):
        self.rows.append(len(x))
        return self.fn(x, *args)


@pytest.fixture(scope="module")
def compiled():
    """An engine whose model compiles its decode step (batch 4, so that the draining tail decodes one row)."""
    engine = TorchEngine(small_model(), max_batch_size=4, compile_decode=True)
    calls = CountingCalls(engine.model.model.__dict__["_compiled_decode"])
    engine.model.model.__dict__["_compiled_decode"] = calls
    return engine, calls


def test_compiled_steps_give_the_eager_engine_s_completions_and_parity(compiled):
    engine, calls = compiled
    records = engine.generate(PROMPTS, SAMPLING)
    assert {1, 4} <= set(calls.rows), calls.rows  # full batches and the one-row tail both ran compiled
    eager = TorchEngine(small_model(), max_batch_size=4).generate(PROMPTS, SAMPLING)
    assert [r.completion_ids for r in records] == [r.completion_ids for r in eager]
    for r, e in zip(records, eager, strict=True):
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(e.logprobs), atol=1e-5, rtol=0)
    stats = check_parity(small_model(), records, SAMPLING).stats()
    assert stats.max_abs_gap_same_support <= 1e-5 and stats.support_changes <= 0.01 * stats.tokens, stats


def test_new_weights_reach_the_compiled_step_without_a_recompile(compiled):
    engine, calls = compiled
    engine.generate(PROMPTS[:4], SAMPLING)  # compiled graphs exist (this test may run alone)
    other = small_model(seed=1)
    engine.load_weights(other.state_dict(), version=1)
    before = len(calls.rows)
    with torch._dynamo.config.patch(error_on_recompile=True):
        records = engine.generate(PROMPTS[:4], SAMPLING)
    assert len(calls.rows) > before
    eager = TorchEngine(other, max_batch_size=4).generate(PROMPTS[:4], SAMPLING)
    assert [r.completion_ids for r in records] == [r.completion_ids for r in eager]


def test_adaptive_depth_keeps_the_eager_step(compiled):
    engine, calls = compiled
    before = len(calls.rows)
    records = engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=8, seed=0), ADAPTIVE)
    assert len(calls.rows) == before and len({e for r in records for e in r.exit_steps[:-1]}) > 1


def test_rows_whose_padding_costs_more_than_a_call_keep_the_eager_step(compiled, monkeypatch):
    """The graph attends over every slot up to the longest. With a call costing nothing, the planner splits rows
    of different lengths (mixed prompts), so those steps run eagerly; only the one-row steps of the draining tail
    still run compiled."""
    engine, calls = compiled
    monkeypatch.setattr(decode, "_CALL_BYTES", 0)
    before = len(calls.rows)
    records = engine.generate(PROMPTS, SAMPLING)
    assert set(calls.rows[before:]) == {1}, calls.rows[before:]
    reference = TorchEngine(small_model(), max_batch_size=4)
    reference.load_weights(engine.model.state_dict(), version=0)  # an earlier test may have loaded others
    eager = reference.generate(PROMPTS, SAMPLING)
    assert [r.completion_ids for r in records] == [r.completion_ids for r in eager]
