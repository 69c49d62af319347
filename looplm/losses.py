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
from torch.utils.checkpoint import checkpoint

from .exit_gate import exit_log_pdf

IGNORE_INDEX = -100
# Logits per chunk of the per-loop cross-entropy: 1,024 tokens at Ouro's vocabulary (49,152), 201 MB in fp32.
# A budget in logits, not tokens, so that a small vocabulary (the CPU models) runs in one chunk.
DEFAULT_CHUNK_LOGITS = 1024 * 49152


def per_loop_token_losses(
    loop_hidden_states: Sequence[torch.Tensor],
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_logits: int | None = DEFAULT_CHUNK_LOGITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ce (T, B, S-1), mask (B, S-1)), computed about `chunk_logits` logits (tokens x V) at a time.

    Autograd would keep each loop's (B, S-1, V) log-softmax for the backward: at Ouro's vocabulary (49,152)
    and T = 4 that is 4 x 196 KB per token. Each chunk's logits are instead recomputed in the backward
    (activation checkpointing), so only one chunk's (chunk_logits / V tokens, V) logits exist at a time,
    forward or backward; the values and gradients are those of the unchunked loss. `chunk_logits=None`: no
    chunking.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    if chunk_logits is not None and chunk_logits < 1:
        raise ValueError(f"chunk_logits must be >= 1 or None, got {chunk_logits}")
    chunk_tokens = None if chunk_logits is None else max(1, chunk_logits // lm_head.weight.shape[0])
    ce = []
    for h in loop_hidden_states:
        hidden = h[:, :-1]  # (B, S-1, H)
        if chunk_tokens is None or not torch.is_grad_enabled() or hidden.shape[0] * hidden.shape[1] <= chunk_tokens:
            # No backward (nothing is kept), or one chunk: at most T chunks' logits, the unchunked computation.
            ce.append(_token_ce(hidden, safe_targets, lm_head))
        else:
            ce.append(_chunked_token_ce(hidden, safe_targets, lm_head, chunk_tokens))
    return torch.stack(ce) * mask, mask


def _token_ce(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """hidden (B, N, H), targets (B, N) -> cross-entropy (B, N) in fp32."""
    logits = lm_head(hidden).float()  # (B, N, V)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def _chunked_token_ce(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, chunk_tokens: int
) -> torch.Tensor:
    """`_token_ce` over the flattened (B * N) positions in chunks, each recomputed in the backward."""
    batch, n, width = hidden.shape
    flat_h, flat_t = hidden.reshape(1, batch * n, width), targets.reshape(1, batch * n)
    pieces = [
        checkpoint(_token_ce, flat_h[:, i : i + chunk_tokens], flat_t[:, i : i + chunk_tokens], lm_head,
                   use_reentrant=False)
        for i in range(0, batch * n, chunk_tokens)
    ]
    return torch.cat(pieces, dim=1).reshape(batch, n)


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


__all__ = ["DEFAULT_CHUNK_LOGITS", "IGNORE_INDEX", "final_loop_loss", "mean_loop_loss", "per_loop_token_losses", "stage1_loss"]
