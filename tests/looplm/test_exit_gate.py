"""Exit-distribution math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from looplm import exit_cdf, exit_entropy, exit_lambdas, exit_pdf, q_exit_step
from looplm.losses import final_loop_loss, mean_loop_loss, stage1_loss


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_pdf_cdf_on_a_hand_computed_example():
    lambdas = [0.5, 0.25, 0.2, 0.9]  # the last gate is unused
    gates = torch.tensor([logit(p) for p in lambdas])
    # S1 = .5, S2 = .375, S3 = .3 ; p = (.5, .5*.25, .375*.2, .3)
    torch.testing.assert_close(exit_pdf(gates), torch.tensor([0.5, 0.125, 0.075, 0.3]))
    torch.testing.assert_close(exit_cdf(gates), torch.tensor([0.5, 0.625, 0.7, 1.0]))
    torch.testing.assert_close(exit_lambdas(gates), torch.tensor(lambdas))
    expected_h = -sum(p * math.log(p) for p in (0.5, 0.125, 0.075, 0.3))
    assert exit_entropy(gates).item() == pytest.approx(expected_h, rel=1e-6)
    assert q_exit_step(gates, 0.5).item() == 1
    assert q_exit_step(gates, 0.6).item() == 2
    assert q_exit_step(gates, 0.7).item() == 3
    assert q_exit_step(gates, 0.71).item() == 4


def test_pdf_sums_to_one_and_is_stable_for_extreme_logits():
    gates = torch.randn(64, 7, 4) * 30
    pdf = exit_pdf(gates)
    assert torch.isfinite(pdf).all() and (pdf >= 0).all()
    torch.testing.assert_close(pdf.sum(-1), torch.ones(64, 7))
    assert torch.isfinite(exit_entropy(gates)).all()


def test_q_one_always_gives_T_even_when_a_gate_saturates():
    gates = torch.full((5, 4), 40.0)  # sigmoid(40) == 1.0 in fp32: CDF(1) == 1 already
    assert exit_cdf(gates)[..., 0].eq(1.0).all()
    assert q_exit_step(gates, 1.0).eq(4).all()
    assert q_exit_step(gates, 0.0).eq(1).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q_exit_step(gates, -0.1)


def test_stage1_loss_on_a_hand_computed_example():
    # T = 2, one token: gate logit 0 at loop 1 -> p = (0.5, 0.5); CE = (2.0, 1.0).
    ce = torch.tensor([2.0, 1.0]).view(2, 1, 1)  # (T, B, S-1)
    gates = torch.zeros(1, 2, 2)  # (B, S, T); position 1's gate is dropped (it predicts nothing)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = stage1_loss(ce, gates, mask, beta=0.1)
    assert loss.item() == pytest.approx(1.5 - 0.1 * math.log(2), rel=1e-6)
    assert stats["exit_entropy"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert final_loop_loss(ce, mask).item() == pytest.approx(1.0)
    assert mean_loop_loss(ce, mask).item() == pytest.approx(1.5)


def test_stage1_without_entropy_prefers_the_best_loop():
    """With beta = 0 the gradient pushes mass to the lowest-loss loop (the collapse the paper describes)."""
    ce = torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1)
    gates = torch.zeros(1, 2, 3, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    stage1_loss(ce, gates, mask, beta=0.0)[0].backward()
    # Raising any gate moves mass towards earlier, worse loops: every gradient is positive.
    assert (gates.grad[0, 0, :2] > 0).all()
