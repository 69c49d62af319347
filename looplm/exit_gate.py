"""Exit-distribution math of an Ouro-style LoopLM, as small pure functions over the last dimension (loops).

With lambda_t = sigmoid(gate(h_t)) the probability of exiting after loop t, given loop t was reached:
    survival  S_t  = prod_{j<=t} (1 - lambda_j),  S_0 = 1
    pdf       p(t) = lambda_t * S_{t-1} for t < T,  p(T) = S_{T-1}   (the last gate is unused)
    CDF       C(n) = 1 - S_n for n < T,  C(T) = 1
    Q-exit    the first n with C(n) >= q;  q = 1.0 always runs T loops.
Sampling the exit loop e ~ p is Q-exit with a per-token threshold u ~ U(0, 1) (inverse-CDF sampling, and C(n)
needs only gates 1..n, so it is decided loop by loop). A temperature tau acts on the gate logits,
lambda_t = sigmoid(g_t / tau), which keeps that sequential sampling exact.
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


def q_exit_reached(log_survival_t: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Q-exit's test after loop t, from log S_t: C(t) = 1 - S_t >= q. A threshold of 1 or more never exits early
    (the last loop still ends every token), even where C(t) rounds to 1. q: one, or per token (broadcasts)."""
    return (-torch.expm1(log_survival_t) >= q) & (q < 1.0)


def exit_log_prob(
    gate_logits: torch.Tensor, exit_steps: torch.Tensor, num_loops: int, temperature: float = 1.0
) -> torch.Tensor:
    """(..., L) gate logits of the loops run (L <= num_loops), (...) exit steps in 1..L -> (...) log p(e).

    log p(e) = sum_{j<e} log(1 - lambda_j) + [e < T] log lambda_e with lambda = sigmoid(g / temperature). Only
    gates 1..e enter, so a forward that stopped once every token had exited (L < T) gives the same value.
    Differentiable in the gate logits.
    """
    if temperature <= 0:
        raise ValueError(f"exit temperature must be > 0, got {temperature}")
    g = gate_logits.float() / temperature
    index = (exit_steps.long() - 1).unsqueeze(-1)  # (..., 1)
    log_s_prev = F.pad(log_survival(g)[..., :-1], (1, 0)).gather(-1, index)[..., 0]  # log S_{e-1}
    log_lambda = F.logsigmoid(g).gather(-1, index)[..., 0]
    return log_s_prev + torch.where(exit_steps < num_loops, log_lambda, torch.zeros_like(log_lambda))


def check_threshold(q: float | torch.Tensor) -> None:
    """q: one threshold, or a tensor of per-token thresholds (sampled exits)."""
    if isinstance(q, torch.Tensor):
        if q.numel() and not (0.0 <= float(q.min()) and float(q.max()) <= 1.0):
            raise ValueError(f"exit thresholds must be in [0, 1], got values in {float(q.min())}..{float(q.max())}")
        return
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit threshold q must be in [0, 1], got {q}")


__all__ = [
    "check_threshold",
    "exit_cdf",
    "exit_entropy",
    "exit_lambdas",
    "exit_log_pdf",
    "exit_log_prob",
    "exit_pdf",
    "log_survival",
    "q_exit_reached",
    "q_exit_step",
]
