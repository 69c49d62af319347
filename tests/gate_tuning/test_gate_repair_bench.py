"""The gate-repair benchmark's broken starts change the exit gate only, as their names say."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bench.gate_repair import WEIGHTS, GateRepairBenchConfig, write_start
from gate_tuning.stage2 import GATE_PREFIX
from looplm import LoopLMForCausalLM
from looplm.exit_gate import q_exit_step
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("stale"), seed=1)


@pytest.mark.parametrize("start", ["zeroed", "random", "exit1", "stale"])
def test_a_broken_start_replaces_the_gate_and_nothing_else(checkpoint, stale, tmp_path, start):
    folder = write_start(checkpoint, tmp_path / start, start, stale, seed=0)
    before, after = load_file(str(checkpoint / WEIGHTS)), load_file(str(folder / WEIGHTS))
    assert before.keys() == after.keys()
    gate = [n for n in after if n.startswith(GATE_PREFIX)]
    assert all(torch.equal(after[n], before[n]) for n in after if n not in gate)
    assert not all(torch.equal(after[n], before[n]) for n in gate)
    if start == "stale":
        stale_gate = load_file(str(stale / WEIGHTS))
        assert all(torch.equal(after[n], stale_gate[n]) for n in after if n.startswith(GATE_PREFIX))
    model = LoopLMForCausalLM.from_pretrained(str(folder))  # the folder loads, and the gate does what it says
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        logits = model(ids, num_loops=4).gate_logits
    exits = q_exit_step(logits, 0.5)
    if start == "zeroed":
        assert bool((exits == 4).all())
    if start == "exit1":
        assert bool((exits == 1).all())


def test_unknown_starts_are_refused():
    with pytest.raises(ValueError, match="unknown start"):
        GateRepairBenchConfig(starts=["zeroed", "broken"])
