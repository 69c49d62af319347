"""`LoopSFTTrainer`: TRL's SFTTrainer with a loop-aware loss, and the objectives it computes.

Objectives (`objective.kind`), all from `looplm.losses`:
  final   cross-entropy at the last loop (default). Trains through TRL's fused lm-head path, which runs the
          backbone and reads `last_hidden_state` (each token's exit-loop state: loop T in training).
  stage1  Ouro's Stage-I objective, sum_t p(t) * CE_t - beta * H(p): trains the exit gate with the LM.
  mean    cross-entropy averaged over loops (deep supervision).
The last two need every loop's state, so `LoopSFTTrainer.compute_loss` runs the model with
`output_loop_states=True`; evaluation always does, to log each loop's cross-entropy and the exit distribution.
The recipe that wires it (data, model, outputs) is `posttrain.sft_recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from trl import SFTTrainer

from looplm import LoopLMForCausalLM, exit_log_pdf
from looplm.losses import final_loop_loss, mean_loop_loss, per_loop_token_losses, stage1_loss
from posttrain.recipe_parts import MarkCompleteCheckpoints


@dataclass
class ObjectiveSection:
    kind: Literal["final", "stage1", "mean"] = "final"
    # Stage-I entropy weight: 0.1 early and 0.05 later in the paper; 0 lets the exit distribution collapse.
    beta: float = 0.1
    # Only Stage I gives the gate a gradient; false freezes it (the other objectives always freeze it).
    gate_trainable: bool = True

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"objective.beta must be >= 0, got {self.beta}")


def unwrap_looplm(model: torch.nn.Module) -> LoopLMForCausalLM:
    """The LoopLMForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LoopSFTTrainer(SFTTrainer):
    """`SFTTrainer` with a loop-aware `compute_loss`. Overrides only `compute_loss` (public, documented hook);
    it writes to `self._metrics`, TRL's private per-mode metric lists that `log` averages (trl >=1.16,<2).
    """

    def __init__(self, *args, objective: ObjectiveSection, **kwargs):
        self.objective = objective
        super().__init__(*args, **kwargs)
        self.add_callback(MarkCompleteCheckpoints())  # `resume_checkpoint` only resumes from marked checkpoints

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective.kind == "final" and self.model.training and not return_outputs:
            # TRL's fused lm-head path: the backbone's last_hidden_state is the last loop's state.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self.loop_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def loop_loss(self, model, inputs, num_items_in_batch=None):
        """The configured objective from every loop's states; logs per-loop CE and exit statistics."""
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        # logits_to_keep=1: skip the exit loop's (B, S, V) logits; per_loop_token_losses makes its own.
        outputs = model(**inputs, use_cache=False, output_loop_states=True, logits_to_keep=1)
        lm_head = unwrap_looplm(self.accelerator.unwrap_model(model)).get_output_embeddings()
        ce, mask = per_loop_token_losses(outputs.loop_hidden_states, lm_head, labels)
        loss = objective_loss(self.objective, ce, mask, outputs.gate_logits, num_items_in_batch)
        # As TRL's compute_loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self.log_loop_metrics(mode, ce, mask, outputs.gate_logits)
        return loss, outputs

    def log_loop_metrics(
        self, mode: str, ce: torch.Tensor, mask: torch.Tensor, gate_logits: torch.Tensor
    ) -> None:
        for name, value in loop_metrics(ce.detach(), mask, gate_logits.detach()).items():
            self._metrics[mode][name].append(value)


def objective_loss(
    objective: ObjectiveSection,
    ce: torch.Tensor,
    mask: torch.Tensor,
    gate_logits: torch.Tensor,
    normalizer=None,
) -> torch.Tensor:
    """ce (T, B, S-1), mask (B, S-1), gate_logits (B, S, T) -> the loss; `normalizer`: num_items_in_batch."""
    if objective.kind == "stage1":
        return stage1_loss(ce, gate_logits, mask, objective.beta, normalizer)[0]
    if objective.kind == "mean":
        return mean_loop_loss(ce, mask, normalizer)
    return final_loop_loss(ce, mask, normalizer)


def loop_metrics(ce: torch.Tensor, mask: torch.Tensor, gate_logits: torch.Tensor) -> dict[str, float]:
    """Token-mean CE at every loop, exit entropy (nats) and mean exit pdf p(t), over the label positions."""
    count = mask.sum().clamp(min=1)
    log_p = exit_log_pdf(gate_logits[:, :-1].float())  # (B, S-1, T)
    p = log_p.exp()
    metrics = {f"ce_loop{t + 1}": float(ce[t].sum() / count) for t in range(ce.shape[0])}
    metrics["exit_entropy"] = float((-(p * log_p).sum(-1) * mask).sum() / count)
    pdf = (p * mask[..., None]).sum((0, 1)) / count
    metrics |= {f"exit_p{t + 1}": float(v) for t, v in enumerate(pdf)}
    return metrics


__all__ = ["LoopSFTTrainer", "ObjectiveSection", "loop_metrics", "objective_loss", "unwrap_looplm"]
