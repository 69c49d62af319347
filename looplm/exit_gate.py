"""Exit-distribution math of an Ouro-style LoopLM, as small pure functions over the last dimension (loops).

With lambda_t = sigmoid(gate(h_t)) the probability of exiting after loop t, given loop t was reached:
    survival  S_t  = prod_{j<=t} (1 - lambda_j),  S_0 = 1
    pdf       p(t) = lambda_t * S_{t-1} for t < T,  p(T) = S_{T-1}   (the last gate is unused)
    CDF       C(n) = 1 - S_n for n < T,  C(T) = 1
    Q-exit    the first n with C(n) >= q;  q = 1.0 always runs T loops.
Loops are numbered 1..T in the API (as `exit_steps` are) and indexed 0..T-1 in tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exit_lambdas(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) gate logits -> (..., T) per-loop exit probabilities lambda_t."""
    return torch.sigmoid(gate_logits)


def log_survival(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T) log S_t for t = 1..T, computed in log space (log(1 - sigmoid(g)) = logsigmoid(-g))."""
    return torch.cumsum(F.logsigmoid(-gate_logits), dim=-1)


def exit_log_pdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T) log p(t); differentiable, stable for large |logits|."""
    log_s = log_survival(gate_logits)
    log_s_prev = F.pad(log_s[..., :-1], (1, 0))  # log S_{t-1}, with log S_0 = 0
    log_p = F.logsigmoid(gate_logits) + log_s_prev
    return torch.cat([log_p[..., :-1], log_s_prev[..., -1:]], dim=-1)  # p(T) = S_{T-1}


def exit_pdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T) exit distribution p(t); sums to 1 over the last dimension."""
    return exit_log_pdf(gate_logits).exp()


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T) C(n) = 1 - S_n for n < T and C(T) = 1."""
    cdf = -torch.expm1(log_survival(gate_logits))
    cdf[..., -1] = 1.0
    return cdf


def exit_entropy(gate_logits: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (...) entropy H(p) of the exit distribution, in nats."""
    log_p = exit_log_pdf(gate_logits)
    return -(log_p.exp() * log_p).sum(dim=-1)


def q_exit_step(gate_logits: torch.Tensor, q: float) -> torch.Tensor:
    """(..., T) -> (...) LongTensor in 1..T: the first loop n whose CDF reaches q (T when q >= 1)."""
    check_threshold(q)
    num_loops = gate_logits.shape[-1]
    if q >= 1.0:
        return torch.full(gate_logits.shape[:-1], num_loops, dtype=torch.long, device=gate_logits.device)
    reached = exit_cdf(gate_logits) >= q  # C(T) = 1 >= q, so every row has a True
    return reached.long().argmax(dim=-1) + 1


def check_threshold(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit threshold q must be in [0, 1], got {q}")


__all__ = [
    "check_threshold",
    "exit_cdf",
    "exit_entropy",
    "exit_lambdas",
    "exit_log_pdf",
    "exit_pdf",
    "log_survival",
    "q_exit_step",
]
