"""Stage II: improvements, targets, the loss on a hand-computed example, and a trainer that moves only the gate."""

from __future__ import annotations

import math

import pytest
import torch

from gate_tuning.data import PadCollator, load_examples, training_features
from gate_tuning.recipe import GateTrainingConfig, ModelSection, Stage2Section, tune_gate
from gate_tuning.stage2 import (
    GATE_PREFIX,
    continue_targets,
    freeze_lm,
    loop_improvements,
    scaled_target_args,
    stage2_loss,
)
from looplm import LoopLMForCausalLM


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(p: float, w: float) -> float:
    return -(w * math.log(p) + (1 - w) * math.log(1 - p))


def test_improvements_and_targets():
    ce = torch.tensor([3.0, 2.0, 2.5, 2.49]).view(4, 1, 1)  # (T, B, S-1)
    assert loop_improvements(ce).flatten().tolist() == pytest.approx([1.0, 0.0, 0.01])
    w = continue_targets(ce, k=50.0, gamma=0.005).flatten().tolist()
    assert w == pytest.approx([sigmoid(50 * 0.995), sigmoid(-0.25), sigmoid(50 * 0.005)], abs=1e-6)


@pytest.mark.parametrize("alignment", ["same_loop", "next_loop"])
def test_stage2_loss_hand_computed(alignment):
    # T = 3, one sequence of 3 positions: the last position's gates are never read (no next token), and the
    # second position's label is masked out.
    ce = torch.tensor([[[2.0, 9.0]], [[1.0, 9.0]], [[1.0, 0.0]]])  # (T=3, B=1, S-1=2)
    mask = torch.tensor([[True, False]])
    g = torch.tensor([[[0.5, -1.0, 2.0], [7.0, 7.0, 7.0], [9.0, 9.0, 9.0]]])  # (B, S, T)
    k, gamma = 10.0, 0.1
    # Position 0: I_2 = 1.0, I_3 = 0.0 -> w_2 = sigmoid(9), w_3 = sigmoid(-1).
    w2, w3 = sigmoid(k * (1.0 - gamma)), sigmoid(k * (0.0 - gamma))
    gates = (-1.0, 2.0) if alignment == "same_loop" else (0.5, -1.0)  # lambda_t (same) or lambda_{t-1} (next)
    cont = [1 - sigmoid(x) for x in gates]  # continue probability 1 - lambda
    expected = (bce(cont[0], w2) + bce(cont[1], w3)) / 3  # (1/T) sum_{t=2..T}
    loss, stats = stage2_loss(g, ce, mask, k=k, gamma=gamma, alignment=alignment)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["target_continue"].tolist() == pytest.approx([w2, w3], abs=1e-6)
    assert stats["gate_continue"].tolist() == pytest.approx(cont, abs=1e-6)


def test_loss_change_weighting_hand_computed():
    # T = 2, two label positions: loop 2 lowers the first token's loss by 0.5 and raises the second's by 0.2.
    ce = torch.tensor([[[1.0, 0.1]], [[0.5, 0.3]]])  # (T=2, B=1, S-1=2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    g = torch.tensor([[[0.0, 1.0], [0.0, -2.0], [0.0, 0.0]]])  # (B, S=3, T=2); same_loop reads loop 2's gate
    k, gamma = 10.0, 0.1
    w = [sigmoid(k * (0.5 - gamma)), sigmoid(k * (0.0 - gamma))]
    terms = [bce(1 - sigmoid(1.0), w[0]), bce(1 - sigmoid(-2.0), w[1])]
    weighted, _ = stage2_loss(g, ce, mask, k=k, gamma=gamma, weighting="loss_change")
    assert weighted.item() == pytest.approx((0.5 * terms[0] + 0.2 * terms[1]) / 0.7 / 2, abs=1e-6)
    plain, _ = stage2_loss(g, ce, mask, k=k, gamma=gamma)
    assert plain.item() == pytest.approx((terms[0] + terms[1]) / 2 / 2, abs=1e-6)
    # A token whose loss does not move at all carries no weight.
    still = torch.tensor([[[1.0, 0.1]], [[0.5, 0.1]]])
    alone, _ = stage2_loss(g, still, mask, k=k, gamma=gamma, weighting="loss_change")
    assert alone.item() == pytest.approx(terms[0] / 2, abs=1e-6)


def test_loss_rejects_bad_k_and_one_loop():
    ce, mask, g = torch.zeros(2, 1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="k must be > 0"):
        stage2_loss(g, ce, mask, k=0.0)
    with pytest.raises(ValueError, match="T >= 2"):
        stage2_loss(g[..., :1], ce[:1], mask, k=50.0)


def test_only_the_gate_trains_and_the_lm_stays_bit_identical(checkpoint, tmp_path):
    model = LoopLMForCausalLM.from_pretrained(str(checkpoint))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    tokenizer = ModelSection(path=str(checkpoint)).tokenizer()
    examples = load_examples("synthetic", "train", 16, 3, tokenizer, 128)
    cfg = GateTrainingConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=0.05,
                             disable_tqdm=True)
    tune_gate(model, examples, Stage2Section(), cfg, tokenizer.pad_token_id)
    after = model.state_dict()
    gate = [n for n in after if n.startswith(GATE_PREFIX)]
    assert sorted(gate) == ["model.early_exit_gate.bias", "model.early_exit_gate.weight"]
    for name, tensor in after.items():
        if name in gate:
            assert not torch.equal(tensor, before[name]), f"{name} did not change"
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == gate


def test_freeze_needs_a_gate():
    class NoGate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no exit gate"):
        freeze_lm(NoGate())


def test_collator_pads_right_and_masks_the_prompt():
    from gate_tuning.data import Example

    features = [training_features(Example([5, 6], [7, 2], "1")), training_features(Example([5], [2], None))]
    batch = PadCollator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_mean_loss_units_keep_the_target_independent_of_the_loss_scale():
    # The same per-loop losses at Ouro's scale (~1 nat) and 100x smaller, as a tiny model's.
    ce = torch.tensor([1.7, 1.2, 1.2, 1.19]).view(4, 1, 1)
    small = ce / 100
    k, gamma = scaled_target_args(50.0, 0.005, "mean_loss", loss_scale=1.19 / 100)
    k1, gamma1 = scaled_target_args(50.0, 0.005, "mean_loss", loss_scale=1.19)
    assert continue_targets(small, k, gamma).flatten().tolist() == pytest.approx(
        continue_targets(ce, k1, gamma1).flatten().tolist(), abs=1e-6)
    # In nats the small model's targets all sit near 1/2, the gain of loop 2 (0.005 nats) included.
    nats = continue_targets(small, 50.0, 0.005).flatten().tolist()
    assert max(nats) < 0.51 and min(nats) > 0.43
    assert scaled_target_args(50.0, 0.005, "nats", None) == (50.0, 0.005)
    with pytest.raises(ValueError, match="mean per-token loss > 0"):
        scaled_target_args(50.0, 0.005, "mean_loss", 0.0)


def fit_gate(ce: torch.Tensor, features: torch.Tensor, init: tuple[float, float], k: float, gamma: float):
    """A one-feature gate (logit = a x + b, shared by the loops) trained on the Stage-II loss; -> (a, b)."""
    params = torch.tensor(init, requires_grad=True)
    opt = torch.optim.Adam([params], lr=0.05)
    mask = torch.ones(ce.shape[1:], dtype=torch.bool)
    for _ in range(300):
        logits = (params[0] * features + params[1])  # (B, S, T)
        loss, _ = stage2_loss(logits, ce, mask, k=k, gamma=gamma, alignment="next_loop")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params.detach()


def test_mean_loss_units_let_a_small_loss_model_keep_its_ranking_of_tokens():
    """A model with tiny per-token losses (mean ~0.01 nats): tokens with feature x = 1 gain 0.02 nats from every
    loop, tokens with x = 0 gain nothing. The Stage-I-like gate ranks them (exit prob 0.12 vs 0.88). Stage II in
    nats pulls both toward 1/2; in mean-loss units the gate keeps (and sharpens) the gap."""
    T, n = 4, 64
    x = (torch.arange(n) % 2).float()  # 1: a token that keeps gaining, 0: one that has converged
    gain = 0.02 * x
    ce = torch.stack([0.005 + gain * (T - 1 - t) for t in range(T)])[:, None, :]  # (T, 1, n)
    features = x.view(1, n, 1).expand(1, n, T).clone()
    features = torch.cat([features, torch.zeros(1, 1, T)], dim=1)  # (B, S = n + 1, T): the last position is unread
    init = (-4.0, 2.0)  # lambda(x=1) = sigmoid(-2) ~ 0.12, lambda(x=0) = sigmoid(2) ~ 0.88
    scale = ce[-1].mean().item()

    def spread(ab: torch.Tensor) -> float:
        return (torch.sigmoid(ab[1]) - torch.sigmoid(ab[0] + ab[1])).item()  # lambda(x=0) - lambda(x=1)

    assert spread(torch.tensor(init)) == pytest.approx(0.76, abs=0.01)
    in_nats = spread(fit_gate(ce, features, init, 50.0, 0.005))
    in_mean_loss = spread(fit_gate(ce, features, init, *scaled_target_args(50.0, 0.005, "mean_loss", scale)))
    assert in_nats < 0.3  # gains of 0.02 nats barely move the target from sigmoid(-0.25): the ranking fades
    assert in_mean_loss > 0.5  # converged tokens exit, gaining ones continue
