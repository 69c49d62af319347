"""Token log-probs, entropy and exit log-probs: one home for the rollout engine, the parity check and the trainer.

Alignment, the same everywhere: position p predicts token p + 1, so the log-probs of a completion of C tokens come
from the C positions before them (`predictors`). The exit decision of a position precedes the token it predicts:
  * record form (a rollout record's `exit_logprobs`): per completion position i, log p(exit_steps[i]); the last
    token is never fed back, so its entry is 0 (`position_exit_logprobs`);
  * action form (the trainer's per-token terms): per completion token j, the exit of its predictor, position
    j - 1; token 0 is predicted by the last prompt position, always at full depth: 0 (`exit_action_logprobs`).
"""

from __future__ import annotations

import math

import torch

from .exit_gate import exit_log_prob


def processed_logprobs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 log-probs of the distribution sampled from; filtered tokens -inf.

    Order (HF's warpers): temperature (0: greedy, whose log-probs are the temperature-1 ones), top-k, top-p,
    min-p. Ties at a top-k / top-p boundary are kept.
    """
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = x.softmax(-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        logp = x.log_softmax(-1)
        floor = logp.max(-1, keepdim=True).values + math.log(min_p)
        x = x.masked_fill(logp < floor, float("-inf"))
    return x.log_softmax(-1)


def token_logprobs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probs, (...) token ids -> (...) the tokens' log-probs."""
    return logp.gather(-1, tokens[..., None])[..., 0]


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) logits, (...) ids -> (...) log-probs under softmax(logits / temperature), without the full
    (..., V) log-softmax (the trainer takes it per loop)."""
    logits = logits.float() / temperature
    return token_logprobs(logits, tokens) - logits.logsumexp(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probs -> (...) entropy in nats; filtered tokens (-inf) contribute 0."""
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def predictors(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S, ...) per position -> (B, width, ...) at the positions that predict the last `width` tokens."""
    return x[:, -width - 1 : -1]


def exit_action_logprobs(
    gate_logits: torch.Tensor, exit_steps: torch.Tensor, completion_width: int, num_loops: int, temperature: float
) -> torch.Tensor:
    """(B, S, L) gate logits and (B, S) replayed exit steps -> (B, C) log p(exit) in action form (see the module
    docstring): the exits of the positions that predict the last C = `completion_width` tokens, 0 for the first."""
    width = completion_width
    logp = exit_log_prob(predictors(gate_logits, width), predictors(exit_steps, width), num_loops, temperature)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp[:, 1:]], dim=1)


def exit_actions(record_form: torch.Tensor) -> torch.Tensor:
    """(..., C) exit log-probs in record form -> (..., C) in action form (see the module docstring)."""
    return torch.cat([torch.zeros_like(record_form[..., :1]), record_form[..., :-1]], dim=-1)


def position_exit_logprobs(
    gate_logits: torch.Tensor, exit_steps: torch.Tensor, num_loops: int, temperature: float
) -> torch.Tensor:
    """(C, L) gate logits and (C,) exit steps of a completion's positions -> (C,) log p(exit) in record form (see
    the module docstring): the last position's is 0."""
    logp = exit_log_prob(gate_logits, exit_steps, num_loops, temperature)
    return torch.cat([logp[:-1], logp.new_zeros(1)])


__all__ = [
    "entropy",
    "exit_action_logprobs",
    "exit_actions",
    "position_exit_logprobs",
    "predictors",
    "processed_logprobs",
    "sampled_logprobs",
    "token_logprobs",
]
