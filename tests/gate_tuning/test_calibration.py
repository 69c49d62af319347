"""Calibration from a broken gate (issue 24): the fitted target, its frontier against static depth, and `auto`."""

from __future__ import annotations

import pytest
import torch

from gate_tuning.data import load_examples
from gate_tuning.frontier import FrontierPoint, compare_frontiers, static_gaps
from gate_tuning.recipe import GateTrainingConfig, ModelSection, Stage2Section, tune_gate
from gate_tuning.selection import Selection, SelectSection, budget_rank, point_at_budget
from gate_tuning.stage2 import GATE_PREFIX, fitted_exit_loops, fitted_targets, stage2_loss
from looplm import LoopLMForCausalLM
from looplm.exit_gate import q_exit_step

T = 4


def test_fitted_exit_loop_is_the_first_loop_within_epsilon_of_the_last():
    # Three tokens: done at loop 1 (within 0.01 of loop T), at loop 3, and only at T (loop 2 dips below, loop 3 not).
    ce = torch.tensor([[0.105, 0.9, 0.5], [0.3, 0.6, 0.1], [0.2, 0.2, 0.4], [0.1, 0.2, 0.2]]).view(T, 1, 3)
    assert fitted_exit_loops(ce, 0.01).flatten().tolist() == [1, 3, 2]
    assert fitted_exit_loops(ce, 0.0).flatten().tolist() == [4, 3, 2]
    # Continue labels for running loops 2, 3, 4: 1 while the loop is at or before the exit loop.
    w = fitted_targets(ce, 0.01)[:, 0].T.tolist()
    assert w == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def synthetic_tokens(n: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses of a small-loss model (~0.01 nats) and a one-hot feature naming each token's depth need.

    Token kind k in 1..T is done after loop k: its loss falls by 0.02 nats at each loop up to k, then stays. ->
    ce (T, 1, n), features (1, n + 1, T, T) (the last position is never read), kind (n,)."""
    kind = torch.arange(n) % T + 1
    loops = torch.arange(1, T + 1).view(T, 1)
    ce = (0.002 + 0.02 * (kind.view(1, n) - loops).clamp(min=0)).unsqueeze(1)  # (T, 1, n)
    features = torch.nn.functional.one_hot(kind - 1, T).float().view(1, n, 1, T).expand(1, n, T, T)
    return ce, torch.cat([features, torch.zeros(1, 1, T, T)], dim=1), kind


def zeroed_gate() -> torch.nn.Linear:
    """Issue 24's broken gate: weight 0, bias -3, so lambda = 0.047 and every token runs all loops at q >= 0.2."""
    gate = torch.nn.Linear(T, 1)
    torch.nn.init.zeros_(gate.weight)
    torch.nn.init.constant_(gate.bias, -3.0)
    return gate


def fit_linear_gate(ce, features, target: str, k: float, gamma: float, epsilon: float = 0.0) -> torch.nn.Linear:
    """A gate Linear(T, 1) from the zeroed start, Adam on the Stage-II loss (only the gate exists here)."""
    gate = zeroed_gate()
    opt = torch.optim.Adam(gate.parameters(), lr=0.1)
    mask = torch.ones(ce.shape[1:], dtype=torch.bool)
    for _ in range(200):
        loss, _ = stage2_loss(gate(features).squeeze(-1), ce, mask, k, gamma, "next_loop", "none", target, epsilon)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate


def q_exit_curve(gate: torch.nn.Linear, ce: torch.Tensor, features: torch.Tensor) -> list[FrontierPoint]:
    """Per-token Q-exit (no K/V between tokens here): mean loss at each token's exit loop, over a grid of q."""
    with torch.no_grad():
        logits = gate(features[:, :-1]).squeeze(-1)[0]  # (n, T)
    points = []
    for q in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        exits = q_exit_step(logits, q)  # (n,) in 1..T
        loss = ce[:, 0].gather(0, (exits - 1).view(1, -1)).mean().item()
        points.append(FrontierPoint("q", q, exits.float().mean().item(), loss, None, 0, 0.0))
    return points


def static_curve(ce: torch.Tensor) -> list[FrontierPoint]:
    return [FrontierPoint("static", t + 1, float(t + 1), ce[t].mean().item(), None, 0, 0.0) for t in range(T)]


def test_fitted_calibration_from_a_zeroed_gate_moves_the_frontier_above_static_depth():
    ce, features, _ = synthetic_tokens()
    static = static_curve(ce)
    fitted = q_exit_curve(fit_linear_gate(ce, features, "fitted", 50.0, 0.005), ce, features)
    gaps = static_gaps(fitted, static)
    assert gaps["below"] == 0 and gaps["above"] >= 3  # at or above static depth everywhere, above in between
    assert compare_frontiers(fitted, static, "loss").a_at_or_above_b
    # Every token at its own depth: 2.5 average loops at static T's loss.
    assert any(p.avg_loops == pytest.approx(2.5) and p.loss == pytest.approx(static[-1].loss) for p in fitted)
    # The zeroed start itself sits on static T only: calibration is what moved it.
    assert {p.avg_loops for p in q_exit_curve(zeroed_gate(), ce, features) if 0.2 <= p.param < 1} == {4.0}


@pytest.mark.parametrize("target", ["fitted", "auto"])
def test_calibration_trains_only_the_gate_and_says_which_target(checkpoint, tmp_path, target):
    model = LoopLMForCausalLM.from_pretrained(str(checkpoint))
    with torch.no_grad():  # the zeroed gate of issue 24: every token runs all loops
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(-3.0)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    tokenizer = ModelSection(path=str(checkpoint)).tokenizer()
    examples = load_examples("synthetic", "train", 20, 3, tokenizer, 128)
    cfg = GateTrainingConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=0.05,
                             disable_tqdm=True, select_every=2)
    selection = Selection(examples[-4:], tokenizer, [0.5], batch_size=4)
    results = tune_gate(model, examples[:-4], Stage2Section(target=target, units="mean_loss"), cfg,
                        tokenizer.pad_token_id, selection)
    assert results["target_used"] in {"start", "ouro", "fitted"}
    assert results["selection"]["kept"].split(" ")[0] == results["target_used"]
    tried = list(results["log_history"])
    assert tried[-1] == "fitted" or (target == "auto" and results["target_used"] == "ouro")
    labels = results["targets"]["mean_continue_label"]
    assert len(labels["ouro"]) == len(labels["fitted"]) == T - 1
    for name, tensor in model.state_dict().items():
        if not name.startswith(GATE_PREFIX):
            assert torch.equal(tensor, before[name]), f"{name} changed"


def validation_point(rule: str, q: float, loops: float, exact: float) -> FrontierPoint:
    return FrontierPoint(rule, q, loops, 0.03, None, 0, loops, exact_tf=exact)


def test_selection_ranks_by_the_loops_at_the_users_budget_not_by_area():
    """The demo's case (last round): a gate that saves 45% of the loops with a 0.05-point dip below static depth
    must outrank a snapshot whose only offered q is 1.0 (static T), though the dip makes its area smaller."""
    static = [validation_point("static", t, t, e) for t, e in zip((1, 2, 3, 4), (0.68, 0.859, 0.891, 0.883), strict=True)]
    stage1 = [validation_point("start", 0.0, 1.0, 0.68), validation_point("start", 0.4, 2.2, 0.8745),
              validation_point("start", 0.7, 2.9, 0.8905), validation_point("start", 1.0, 4.0, 0.883)]
    flat = [validation_point("fitted step 50", 0.0, 1.0, 0.68), validation_point("fitted step 50", 1.0, 4.0, 0.883)]
    drop = SelectSection(max_accuracy_drop=0.01)
    at_start, at_flat = (point_at_budget(c, static, drop, T) for c in (stage1, flat))
    assert (at_start.param, at_flat.param) == (0.4, 1.0)
    assert budget_rank(at_start, drop) > budget_rank(at_flat, drop)
    loops = SelectSection(max_accuracy_drop=None, target_avg_loops=3.0)  # the best exact match within 3 loops
    assert point_at_budget(stage1, static, loops, T).param == 0.7
    assert budget_rank(point_at_budget(stage1, static, loops, T), loops) == pytest.approx(0.8905)
