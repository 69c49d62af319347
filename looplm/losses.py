"""Loop-aware language-modelling losses, as pure functions over per-loop, per-token cross-entropies.

Shapes: `ce` is (T, B, S-1), the next-token cross-entropy read at every loop (position i predicts token i+1),
`mask` is (B, S-1), true where a label counts. `gate_logits` is (B, S, T) as the model returns it; the gate
at position i decides the depth used to predict token i+1, so the losses use `gate_logits[:, :-1]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .exit_gate import exit_log_pdf

IGNORE_INDEX = -100


def per_loop_token_losses(
    loop_hidden_states: Sequence[torch.Tensor], lm_head: nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ce (T, B, S-1), mask (B, S-1)). One loop's logits at a time, so (T, B, S, V) never exists at once."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    ce = []
    for h in loop_hidden_states:
        logits = lm_head(h[:, :-1]).float()  # (B, S-1, V)
        ce.append(F.cross_entropy(logits.transpose(1, 2), safe_targets, reduction="none") * mask)
    return torch.stack(ce), mask


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    return (per_token * mask).sum() / denom


def final_loop_loss(ce: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Cross-entropy at the last loop: the standard objective, the default for SFT."""
    return _token_mean(ce[-1], mask, normalizer)


def mean_loop_loss(ce: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Cross-entropy averaged uniformly over loops (deep supervision)."""
    return _token_mean(ce.mean(dim=0), mask, normalizer)


def stage1_loss(
    ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor, beta: float, normalizer=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Ouro's Stage-I objective: sum_t p(t) * CE_t - beta * H(p), averaged over tokens.

    Trains the exit gate jointly with the LM; the entropy term (KL to a uniform prior over depths, up to a
    constant) keeps p from collapsing onto t = T. Returns the loss and detached stats: the mean exit
    entropy and the mean exit distribution (for logging collapse).
    """
    log_p = exit_log_pdf(gate_logits[:, :-1].float())  # (B, S-1, T)
    p = log_p.exp()
    expected_ce = (p * ce.permute(1, 2, 0)).sum(-1)  # (B, S-1)
    entropy = -(p * log_p).sum(-1)  # (B, S-1)
    loss = _token_mean(expected_ce - beta * entropy, mask, normalizer)
    count = mask.sum().clamp(min=1)
    stats = {
        "exit_entropy": ((entropy * mask).sum() / count).detach(),
        "exit_pdf": ((p * mask[..., None]).sum((0, 1)) / count).detach(),
    }
    return loss, stats


__all__ = ["IGNORE_INDEX", "final_loop_loss", "mean_loop_loss", "per_loop_token_losses", "stage1_loss"]
