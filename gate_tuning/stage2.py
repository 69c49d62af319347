"""Stage II (Ouro): tune the exit gate with the LM frozen, from how much each extra loop lowered each token's loss.

Per token and loop t = 2..T, with L_t the token's cross-entropy read at loop t (all T loops computed in one
forward, detached):
    improvement  I_t = max(0, L_{t-1} - L_t)
    target       w_t = sigmoid(k * (I_t - gamma))           the "continue" label; k = 50, gamma = 0.005
    loss         (1/T) * sum_{t=2..T} BCE(1 - lambda_{g(t)}, w_t), each averaged over label tokens (weighted by
                 `weighting`: none as Ouro, or loss_change |L_{t-1} - L_t|, see `token_weights`)
Which gate g(t) pairs with improvement I_t (`alignment`):
    same_loop  g(t) = t, as Ouro writes it (looplm-facts.md): lambda_t is read from h_t, the state after loop t,
               and learns whether loop t improved on loop t-1. Gates 2..T train; gate 1 keeps its Stage-I
               value, and gate T trains although the exit distribution never reads it.
    next_loop  g(t) = t - 1: lambda_{t-1}, read before loop t runs, learns whether running loop t pays. Trains
               exactly the gates 1..T-1 that Q-exit reads.
Units of I_t and gamma (`units`, `scaled_target_args`):
    nats       as Ouro: k = 50 per nat, gamma = 0.005 nats, fit for a model whose per-token losses are ~1 nat.
    mean_loss  in units of the model's own mean per-token loss s at the last loop (measured once on the training
               rows, LM frozen): w_t = sigmoid(k * (I_t / s - gamma)). For s ~ 1 nat this is Ouro's target; for a
               model whose losses are 100x smaller, it keeps the target's logit range, k * I_t / s, as wide as
               Ouro's instead of squeezing every token's target into sigmoid(k * (0 .. 0.01) - 0.25) ~ 0.44 .. 0.56,
               which pulls every gate toward 1/2. (On the tiny models of BENCHMARKS.md this alone did not keep the
               Stage-I gate's frontier; held-out selection, `training.select_every`, keeps it on validation rows.)
Which targets (`target`):
    ouro       the continue label w_t above (Ouro's Stage II).
    fitted     w_t = 1 if t <= e, else 0, with e each token's first loop whose loss is within `epsilon` of its loss at
               loop T (L_e <= L_T + epsilon; `epsilon` in the same `units` as gamma): the gate is fitted, as a
               classifier, to "is this token done?", and Q-exit's q is then the probability of being done that a
               token needs before it exits. Ouro's w_t asks whether loop t alone gains more than gamma, so a token
               whose gain arrives at a later loop, or spreads below gamma over several loops, is told to stop; and on
               a model whose losses are ~0.03 nats almost every token's I_t sits below gamma, where w ~ 0.44 says
               "stop or go, either way" (BENCHMARKS.md, issue 24). Fitted labels are hard, so the labels' balance
               follows the data, not a sigmoid's offset; always paired next_loop (the label is about running loop t).
Only the gate's parameters get gradients: the LM is frozen by `requires_grad=False` and its states carry no
graph, so the backward pass is the gate's alone. Shapes follow `looplm.losses`: ce (T, B, S-1), mask (B, S-1),
gate_logits (B, S, T) (position i's gate decides the depth used to predict token i + 1).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from looplm import LoopLMForCausalLM
from looplm.losses import per_loop_token_losses
from posttrain.recipe_parts import MarkCompleteCheckpoints

logger = logging.getLogger(__name__)

Alignment = Literal["same_loop", "next_loop"]
Units = Literal["nats", "mean_loss"]
Target = Literal["ouro", "fitted"]
Weighting = Literal["none", "loss_change"]
GATE_PREFIX = "model.early_exit_gate."


def check_stage2_args(k: float, num_loops: int) -> None:
    if not k > 0:
        raise ValueError(f"stage2.k must be > 0 (the sharpness of the continue target), got {k}")
    if num_loops < 2:
        raise ValueError(f"Stage II needs a model with T >= 2 loops (total_ut_steps), got T = {num_loops}")


def loop_improvements(ce: torch.Tensor) -> torch.Tensor:
    """(T, B, S-1) per-loop losses -> (T-1, B, S-1) I_t = max(0, L_{t-1} - L_t) for t = 2..T."""
    return (ce[:-1] - ce[1:]).clamp(min=0.0)


def continue_targets(ce: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """(T, B, S-1) -> (T-1, B, S-1) w_t = sigmoid(k * (I_t - gamma)) for t = 2..T (detached)."""
    return torch.sigmoid(k * (loop_improvements(ce.detach().float()) - gamma))


def fitted_exit_loops(ce: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(T, B, S-1) -> (B, S-1) each token's first loop e (1..T) with L_e <= L_T + epsilon (T always qualifies)."""
    done = ce <= ce[-1:] + epsilon  # (T, B, S-1)
    return done.float().argmax(0) + 1  # argmax returns the first maximum: the first loop that is done


def fitted_targets(ce: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(T, B, S-1) -> (T-1, B, S-1) the continue label for running loop t = 2..T: 1 while t <= e (detached)."""
    exit_loop = fitted_exit_loops(ce.detach().float(), epsilon)
    loops = torch.arange(2, ce.shape[0] + 1, device=ce.device).view(-1, 1, 1)
    return (loops <= exit_loop).float()


def token_weights(ce: torch.Tensor, mask: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """(T, B, S-1), (B, S-1) -> (T-1, B, S-1) each token's weight in loop t's BCE (masked; zero off the labels).

    none         every label token alike (Ouro).
    loss_change  |L_{t-1} - L_t|: what deciding wrongly at loop t costs that token. Most tokens of a trained model
                 sit at near-zero loss whichever loop they stop at; unweighted, their targets (all ~sigmoid(-k
                 gamma)) outvote the few tokens whose loss the extra loop actually moves.
    """
    if weighting == "none":
        return mask.float().expand(ce.shape[0] - 1, *mask.shape)
    return (ce[:-1] - ce[1:]).detach().float().abs() * mask


def stage2_loss(
    gate_logits: torch.Tensor,
    ce: torch.Tensor,
    mask: torch.Tensor,
    k: float = 50.0,
    gamma: float = 0.005,
    alignment: Alignment = "same_loop",
    weighting: Weighting = "none",
    target: Target = "ouro",
    epsilon: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (loss, detached stats). gate_logits (B, S, T), ce (T, B, S-1), mask (B, S-1); see the module docstring."""
    num_loops = ce.shape[0]
    check_stage2_args(k, num_loops)
    w = continue_targets(ce, k, gamma) if target == "ouro" else fitted_targets(ce, epsilon)  # (T-1, B, S-1)
    gates = gate_logits[:, :-1].float().permute(2, 0, 1)  # (T, B, S-1)
    gates = gates[1:] if alignment == "same_loop" else gates[:-1]  # the gate paired with each I_t
    # BCE of the continue probability 1 - lambda = sigmoid(-g) against w, in logit form for stability.
    bce = F.binary_cross_entropy_with_logits(-gates, w, reduction="none")  # (T-1, B, S-1)
    count = mask.sum().clamp(min=1)
    weights = token_weights(ce, mask, weighting)  # (T-1, B, S-1)
    per_loop = (bce * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1e-12)  # (T-1,) weighted token means
    loss = per_loop.sum() / num_loops
    stats = {
        "target_continue": ((w * mask).sum((1, 2)) / count).detach(),
        "gate_continue": ((torch.sigmoid(-gates) * mask).sum((1, 2)) / count).detach(),
    }
    return loss, stats


def freeze_lm(model: LoopLMForCausalLM) -> list[str]:
    """requires_grad=False on every parameter but the exit gate's; -> the trainable names (the gate's)."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(GATE_PREFIX))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"the model has no exit gate ({GATE_PREFIX}*): nothing for Stage II to tune")
    return trainable


@torch.no_grad()
def mean_final_loss(model: LoopLMForCausalLM, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """The mean per-token cross-entropy at the last loop over `batches` (label tokens), LM as it is."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {name: t.to(model.device) for name, t in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_loop_states=True, logits_to_keep=1)
        ce, mask = per_loop_token_losses(out.loop_hidden_states[-1:], model.get_output_embeddings(), batch["labels"])
        total, count = total + ce[-1][mask].double().sum().item(), count + int(mask.sum())
    if count == 0:
        raise ValueError("mean_final_loss: no label tokens in the batches")
    return total / count


def scaled_target_args(k: float, gamma: float, units: Units, loss_scale: float | None) -> tuple[float, float]:
    """(k, gamma) in nats for `continue_targets`: w = sigmoid(k (I / s - gamma)) = sigmoid((k / s) (I - gamma s))."""
    if units == "nats":
        return k, gamma
    if loss_scale is None or not loss_scale > 0:
        raise ValueError(f"stage2.units = mean_loss needs the model's mean per-token loss > 0, got {loss_scale}")
    return k / loss_scale, gamma * loss_scale


@torch.no_grad()
def target_stats(
    model: LoopLMForCausalLM, batches: Iterable[dict[str, torch.Tensor]], k: float, gamma: float, epsilon: float
) -> dict[str, list[float]]:
    """Mean continue label per loop t = 2..T over the label tokens of `batches`, for both targets (nats args).

    Logged before training, so a reader sees what each target asks of the gate on this model (issue 24: Ouro's
    labels on a ~0.03-nat model sit near sigmoid(-k gamma) for almost every token).
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches:
        batch = {name: t.to(model.device) for name, t in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_loop_states=True, logits_to_keep=1)
        ce, mask = per_loop_token_losses(out.loop_hidden_states, model.get_output_embeddings(), batch["labels"])
        for name, w in (("ouro", continue_targets(ce, k, gamma)), ("fitted", fitted_targets(ce, epsilon))):
            sums[name] = sums.get(name, 0) + (w * mask).sum((1, 2)).double()
        count += int(mask.sum())
    return {name: (total / max(count, 1)).tolist() for name, total in sums.items()}


def gate_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the exit gate's parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(GATE_PREFIX)}


@torch.no_grad()
def load_gate_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


class GateSnapshots(TrainerCallback):
    """Copies of the gate during one Stage-II run, every `every` steps and at the last step, named
    "<label> step N", for held-out selection (`gate_tuning.selection.select_gate`)."""

    def __init__(self, model: nn.Module, every: int, label: str):
        self.model, self.every, self.label = model, every, label
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.snapshots[f"{self.label} step {state.global_step}"] = gate_state(self.model)


class GateTrainer(Trainer):
    """transformers' Trainer with the Stage-II loss. Overrides only `compute_loss` (public, documented hook).

    The model must come through `freeze_lm`: the optimizer then holds the gate's parameters alone.
    """

    def __init__(self, *args, k: float = 50.0, gamma: float = 0.005, alignment: Alignment = "same_loop",
                 weighting: Weighting = "none", target: Target = "ouro", epsilon: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.k, self.gamma, self.alignment, self.weighting = k, gamma, alignment, weighting
        self.target, self.epsilon = target, epsilon
        # Checkpoints (save_strategy) get `recipe_parts`' completion marker; Stage II never resumes from one.
        self.add_callback(MarkCompleteCheckpoints())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        # One forward computes all T loops; only the gate's logits carry a graph (the LM is frozen).
        outputs = model(**inputs, use_cache=False, output_loop_states=True, logits_to_keep=1)
        with torch.no_grad():
            lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
            ce, mask = per_loop_token_losses(outputs.loop_hidden_states, lm_head, labels)
        loss, _ = stage2_loss(outputs.gate_logits, ce, mask, self.k, self.gamma, self.alignment, self.weighting,
                              self.target, self.epsilon)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "GATE_PREFIX",
    "GateSnapshots",
    "GateTrainer",
    "check_stage2_args",
    "continue_targets",
    "fitted_exit_loops",
    "fitted_targets",
    "freeze_lm",
    "gate_state",
    "load_gate_state",
    "loop_improvements",
    "mean_final_loss",
    "scaled_target_args",
    "stage2_loss",
    "target_stats",
    "token_weights",
]
