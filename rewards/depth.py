"""`depth_penalty`: the compute charge of depth-aware RL, -alpha x the loops a completion ran.

Added to a task reward (e.g. `dapo_reward`) it makes the objective "task reward - alpha x compute"; as its own
reward function TRL logs it apart (`rewards/depth_penalty/mean`). It reads `exit_steps`, which the GRPO
recipe's `rollout_func` returns beside the completions (TRL passes such extra keys to every reward function):
per completion token, the loop its position ran at when fed back; the last token never runs and is not counted
(as in `rollout.engine.mean_loops_per_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal


def depth_penalty(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    exit_steps: Sequence[Sequence[int]] | None = None,
    *,
    alpha: float = 0.0,
    per: Literal["mean", "sum"] = "mean",
    **_: Any,
) -> list[float | None]:
    """-alpha x the completion's average loops per decoded position (`per="mean"`), or its total loops over
    every decoded position (`per="sum"`: compute per token, so longer completions pay more). A one-token
    completion ran no decoded position: penalty 0. Without `exit_steps` (a trainer whose rollouts do not record
    depths) the charge does not apply: None per completion."""
    if alpha < 0:
        raise ValueError(f"depth_penalty: alpha must be >= 0, got {alpha}")
    if per not in ("mean", "sum"):
        raise ValueError(f"depth_penalty: per must be 'mean' or 'sum', got {per!r}")
    if exit_steps is None:
        return [None] * len(completions)
    if len(exit_steps) != len(completions):
        raise ValueError(f"depth_penalty: {len(exit_steps)} exit_steps rows for {len(completions)} completions")
    penalties = []
    for steps in exit_steps:
        ran = list(steps)[:-1]  # the last token is never fed back
        loops = sum(ran) if per == "sum" else (sum(ran) / len(ran) if ran else 0.0)
        penalties.append(-alpha * float(loops))
    return penalties


__all__ = ["depth_penalty"]
