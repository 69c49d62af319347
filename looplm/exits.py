"""Per-token depth: the exit rules, written once for the parallel forward and the decode fast path.

An `ExitRule` is how deep tokens run: a fixed number of loops, replayed `exit_steps`, Q-exit at a threshold q (a
float, or a per-token tensor u ~ U(0, 1): sampled exits, the gate logits divided by `temperature`), or the
hidden-state-difference rule (`hidden_eps`). `ExitRun.newly_exited` is THE per-loop decision, in the rule order
last loop > replay > Q-exit > hidden difference; both sides call it:
  * the forward's `ExitTracker` keeps every token and masks the exited ones (their K/V stays "last exited");
  * the decode path's `RunningExits` keeps only the rows still running (`ExitRun.keep` drops the rest), so deeper
    loops compute for those rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .exit_gate import check_threshold, q_exit_reached

# How `ExitRule.check` names its fields: as the model's arguments (a config passes its own field names).
ARG_NAMES = {"num_loops": "num_loops", "threshold": "exit threshold", "hidden_eps": "exit_hidden_eps",
             "temperature": "exit_temperature"}


@dataclass(frozen=True)
class ExitRule:
    """How deep each token runs (see the module docstring); `check` validates it, `start` begins one pass."""

    num_loops: int
    exit_steps: torch.Tensor | None = None  # (B, S) in 1..num_loops: replay
    threshold: float | torch.Tensor | None = None  # Q-exit q, one or per token (sampled exits)
    hidden_eps: float | None = None
    temperature: float = 1.0  # divides the gate logits of Q-exit

    @property
    def q_exit(self) -> bool:
        """Q-exit decides exits: a float q of 1 never exits early, so it runs as fixed depth (same exits)."""
        return self.threshold is not None and (torch.is_tensor(self.threshold) or self.threshold < 1.0)

    def check(self, shape: tuple[int, ...] | None = None, names: dict[str, str] = ARG_NAMES) -> ExitRule:
        """Raise ValueError naming the first bad argument (by `names`: the model's arguments, or a config's
        fields); per-token tensors must have `shape` when it is given. -> self."""
        if self.num_loops < 1:
            raise ValueError(f"{names['num_loops']} must be >= 1, got {self.num_loops}")
        if self.exit_steps is not None:
            self._check_exit_steps(shape)
        if torch.is_tensor(self.threshold):
            check_threshold(self.threshold)
            if shape is not None and tuple(self.threshold.shape) != shape:
                raise ValueError(
                    f"exit_threshold tensor must have shape (batch, seq) = {shape}, got {tuple(self.threshold.shape)}"
                )
        elif self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{names['threshold']} q must be in [0, 1], got {self.threshold}")
        if self.hidden_eps is not None:
            if self.exit_steps is not None or self.threshold is not None:
                raise ValueError("pass one depth rule: exit_steps, exit_threshold or exit_hidden_eps")
            if not self.hidden_eps >= 0.0:
                raise ValueError(f"{names['hidden_eps']} must be >= 0, got {self.hidden_eps}")
        if not self.temperature > 0.0:
            raise ValueError(f"{names['temperature']} must be > 0, got {self.temperature}")
        return self

    def _check_exit_steps(self, shape: tuple[int, ...] | None) -> None:
        steps = self.exit_steps
        if self.threshold is not None:
            raise ValueError("pass either exit_steps (replay) or exit_threshold (Q-exit), not both")
        if shape is not None and tuple(steps.shape) != shape:
            raise ValueError(f"exit_steps must have shape (batch, seq) = {shape}, got {tuple(steps.shape)}")
        if steps.dtype.is_floating_point:
            raise ValueError(f"exit_steps must be an integer tensor, got {steps.dtype}")
        lo, hi = int(steps.min()), int(steps.max())
        if lo < 1 or hi > self.num_loops:
            raise ValueError(f"exit_steps must be in 1..{self.num_loops} (num_loops), got values in {lo}..{hi}")

    def start(self) -> ExitRun:
        return ExitRun(self)


class ExitRun:
    """One pass of a rule over a batch of tokens: the per-token state the rules carry from loop to loop."""

    def __init__(self, rule: ExitRule):
        self.rule = rule
        self.exit_steps, self.threshold = rule.exit_steps, rule.threshold  # per token where tensors
        self.log_survival: torch.Tensor | None = None  # Q-exit: log S_t after the loops run so far
        self.previous: torch.Tensor | None = None  # hidden difference: the normed state after the previous loop

    def newly_exited(self, loop: int, h: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor | None:
        """(..., D) normed states and (...) gate logits after `loop` (0-based) -> (...) bool: the tokens whose
        rule ends them at this loop (the caller drops those already exited); None: no token can exit here."""
        rule = self.rule
        if loop == rule.num_loops - 1:
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        if self.exit_steps is not None:
            return self.exit_steps == loop + 1
        if rule.q_exit:
            # log S accumulated loop by loop (log(1 - sigmoid(g)) = logsigmoid(-g)), the same op order on both sides
            step = F.logsigmoid(-gate_logit.float() / rule.temperature)
            self.log_survival = step if self.log_survival is None else self.log_survival + step
            return q_exit_reached(self.log_survival, self.threshold)
        if rule.hidden_eps is not None:
            previous, self.previous = self.previous, h
            if previous is None:  # loop 1 has no previous state to compare with
                return None
            return hidden_converged(h, previous, rule.hidden_eps)
        return None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the per-token state of these rows only (a bool mask over the current rows)."""
        for name in ("exit_steps", "threshold", "log_survival", "previous"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value[rows])


def hidden_converged(h: torch.Tensor, previous: torch.Tensor, eps: float) -> torch.Tensor:
    """(...) bool: the hidden-state-difference rule, ||h_t - h_{t-1}|| / ||h_{t-1}|| < eps per token (relative,
    so one eps fits any hidden size), on (..., D) normed states after loops t and t - 1."""
    change = (h - previous).float().norm(dim=-1) / previous.float().norm(dim=-1).clamp(min=1e-12)
    return change < eps


class ExitTracker:
    """The forward's exits: which tokens have exited, at which loop, and their output state; every token stays in
    the batch (exited ones are masked). `active` is None while every token runs, keeping the default path
    select-free. Arguments as `ExitRule`'s (`shape` (B, S) of the tokens)."""

    def __init__(
        self, shape, num_loops: int, exit_steps=None, threshold: float | torch.Tensor | None = None, device=None,
        hidden_eps: float | None = None, temperature: float = 1.0,
    ):
        self.num_loops = num_loops
        self.run = ExitRule(num_loops, exit_steps, threshold, hidden_eps, temperature).start()
        self.exited = torch.zeros(shape, dtype=torch.bool, device=device)
        self.steps = torch.full(shape, num_loops, dtype=torch.long, device=device)
        self.any_exited = False
        self.output: torch.Tensor | None = None

    @property
    def active(self) -> torch.Tensor | None:
        return ~self.exited if self.any_exited else None

    @property
    def all_exited(self) -> bool:
        return self.any_exited and bool(self.exited.all())

    def step(self, loop: int, h: torch.Tensor, gate_logits: list[torch.Tensor]) -> None:
        """After `loop`: h (B, S, D) normed state, gate_logits the (B, S) logits of every loop so far."""
        newly = self.run.newly_exited(loop, h, gate_logits[-1])
        if newly is None:
            return
        newly = ~self.exited & newly
        if not self.any_exited and bool(newly.all()):
            self.output = h
        else:
            self.output = h if self.output is None else torch.where(newly[..., None], h, self.output)
        self.steps = torch.where(newly, loop + 1, self.steps)
        self.exited = self.exited | newly
        self.any_exited = self.any_exited or bool(newly.any())


class RunningExits:
    """The decode path's exits, kept for the running rows only: rows that exit leave the running set (their state
    is final) instead of being masked, so deeper loops compute only for the rest."""

    def __init__(self, b: int, rule: ExitRule, device):
        num_loops = rule.num_loops
        self.run = rule.start()
        self.running: torch.Tensor | None = None  # local indices of running rows; None: all
        self.output: torch.Tensor | None = None  # (b, D)
        self.steps = torch.full((b,), num_loops, dtype=torch.long, device=device)
        self.gate_logits = torch.full((b, num_loops), float("nan"), device=device)

    def step(self, loop: int, h: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
        """(b_run, D) normed state and (b_run,) gate logit after `loop` -> the states of the rows still running."""
        b = self.steps.shape[0]
        if self.running is None:
            self.gate_logits[:, loop] = gate_logit
        else:
            self.gate_logits[self.running, loop] = gate_logit.float()
        newly = self.run.newly_exited(loop, h, gate_logit)
        if newly is None or not bool(newly.any()):
            return h
        rows = torch.arange(b, device=h.device) if self.running is None else self.running
        if self.running is None and bool(newly.all()):  # the common case: everyone exits together
            self.output, self.running = h, rows[:0]
            self.steps.fill_(loop + 1)
            return h[:0]
        if self.output is None:
            self.output = h.new_empty(b, h.shape[-1])
        self.output[rows[newly]] = h[newly]
        self.steps[rows[newly]] = loop + 1
        keep = ~newly
        self.running = rows[keep]
        self.run.keep(keep)
        return h[keep]


__all__ = ["ARG_NAMES", "ExitRule", "ExitRun", "ExitTracker", "RunningExits", "hidden_converged"]
