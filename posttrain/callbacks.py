"""Trainer callbacks shared by the recipes."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger(__name__)


class NonFiniteGuard(TrainerCallback):
    """Skip an optimizer step whose gradients hold a NaN or inf; stop after `max_consecutive` such steps in a row.

    Runs after gradient clipping and before `optimizer.step()`. A skipped step drops every gradient (`grad = None`),
    which torch's optimizers treat as "no update" (moments untouched), so the weights stay as they were.
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        logger.warning(
            "step %d: non-finite gradient, optimizer step skipped (%d in a row, %d in all)",
            state.global_step + 1, self.consecutive, self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} consecutive optimizer steps had non-finite gradients (limit "
                f"{self.max_consecutive}); stopping at step {state.global_step + 1}. Lower the learning rate or "
                "check the data and rewards; the last checkpoint holds finite weights."
            )
        for p in model.parameters():
            p.grad = None


class CompactProgress(ProgressCallback):
    """transformers' progress bar, with one readable line per log instead of a printed dict of strings, and no
    bar of its own for evaluation batches.

    `keys` maps a logged metric to its label; metrics not logged this time are left out.
    """

    def __init__(self, keys: dict[str, str]):
        super().__init__()
        self.keys = keys

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if not any(k in logs for k in self.keys):
            return
        parts = [f"{label} {logs[k]:.3g}" for k, label in self.keys.items() if isinstance(logs.get(k), (int, float))]
        self.training_bar.write(f"step {state.global_step:>4}: " + ", ".join(parts))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """No second bar for evaluation batches: the training bar is the stage's one bar."""


__all__ = ["CompactProgress", "NonFiniteGuard"]
