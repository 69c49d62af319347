"""`LoopGRPOTrainer`: TRL's GRPOTrainer made on-policy for looped models, and the loop-aware math it needs.

What TRL's trainer does not do for a LoopLM, and this file adds (pinned to trl>=1.16,<1.17: it overrides
`_generate_and_score_completions`, `_get_per_token_logps_and_entropies`, `_compute_loss` and `training_step`,
each by wrapping TRL's own method, never by copying it):

* Generation through our engines (`rollout.RolloutPool` / `TorchEngine` / `VLLMEngine`) as TRL's `rollout_func`.
  Weights go to the engine once per optimizer step, with the step as `policy_version`; every completion of the
  step must carry that version (asserted).
* Exit replay: the update forward runs each completion at the depth it was sampled at (`exit_steps`, prompt
  positions at full depth) through TRL's fused lm-head path, which forwards `exit_steps` to our backbone.
* Per-step parity: the rollout's log-probs against the trainer's log-probs of the same tokens before the update
  (`parity/max_abs`, `parity/mean_abs`, `parity/kl`), which TRL only measures on its own vLLM path. Those
  trainer log-probs are also the "old" log-probs of the ratio, so measuring costs no extra forward.
* Importance-sampling correction (TRL's options `vllm_importance_sampling_mode` / `_clip_min` / `_clip_max`)
  for engines whose numerics differ from the trainer (vLLM in bf16) and for the mismatch control; applied as a
  per-token factor on the advantages, which scales every TRL loss type's per-token term the same way.
* Loop credit (RLTT): the policy-gradient term over every loop's log-probability of the sampled token.
* DAPO's dynamic sampling: groups whose rewards are all equal are dropped and refilled from fresh prompts.
* Depth as part of the action (`exit_action`, with sampled-depth rollouts): completion token j's log-prob is
  log p(e_{j-1}) + log pi_{e_{j-1}}(token j), the exit sampled at the position that predicts it and the token
  read from that exit's logits; the update recomputes both from the replayed exit steps in one forward (the
  gate logits are read off the backbone's output by a forward hook, since TRL's fused head keeps only
  `last_hidden_state`), and parity covers the exit log-probs (`parity/exit_max_abs`, ...). The compute charge
  is a reward function (`rewards.depth_penalty`), fed the `exit_steps` this trainer's `rollout_func` returns,
  or (`exit_credit=token`) each exit's own term on the advantages (`token_exit_advantages`).

Pure functions come first (shapes in their docstrings), then the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from trl import GRPOTrainer

from configs import UserError
from looplm import exit_log_pdf
from looplm.logprobs import (
    entropy,
    exit_actions,
    predictors,
    processed_logprobs,
    sampled_logprobs,
    token_logprobs,
)
from looplm.logprobs import exit_action_logprobs as exit_action_logps  # its name here (tests and callers)
from posttrain.async_rollouts import Lookahead, RolloutQueue
from posttrain.callbacks import NonFiniteGuard
from posttrain.distributed import SharedEngine, full_state_dict
from posttrain.recipe_parts import MarkCompleteCheckpoints
from rollout.engine import DepthConfig, RolloutEngine, RolloutRecord, SamplingConfig
from rollout.parity import k3_kl

logger = logging.getLogger(__name__)


@dataclass
class LoopRLConfig:
    """Our options, beside TRL's `GRPOConfig` (the recipe's `training:` section)."""

    # replay: the update runs every completion at the depth it was sampled at (on-policy by construction).
    # full: the update runs every token at full depth whatever the rollout did: the Ouro authors' failure,
    # reproduced on purpose as a control (pair it with adaptive rollouts); its gap is measured all the same.
    update_depth: Literal["replay", "full"] = "replay"
    # Credit over loops (RLTT): last = the standard term on the exit loop's log-prob; uniform, progressive
    # (weights t^progressive_power) or exit (the gate's exit distribution, detached) spread it over loops.
    loop_credit: Literal["last", "uniform", "progressive", "exit"] = "last"
    progressive_power: float = 1.0
    # Reweight each token by exp(logp_trainer - logp_rollout) (TRL's vllm_importance_sampling_* options set the
    # mode and clipping). Not needed when replay parity holds (fp32, our engine); for vLLM/bf16 and the control.
    importance_sampling_correction: bool = False
    # Stop the run when a step's max |logp_rollout - logp_trainer| exceeds this (None: only log it).
    max_parity_gap: float | None = None
    # Steps with a NaN/inf gradient are skipped; this many in a row stop the run with an error.
    max_consecutive_nonfinite_steps: int = 3
    # The sampled exit is part of the action (needs rollout.depth.policy=sampled): each completion token's
    # log-prob is log p(exit of its predicting position) + log pi_exit(token), in the ratio and the gradient.
    exit_action: bool = False
    # Where the exit term's gradient goes. False: to the gate only (the gate reads the states detached), so the
    # LM's gradient is the standard token term; True: also into the LM through the states the gate reads.
    exit_grad_to_lm: bool = False
    # How the compute charge reaches the exits (with exit_action). sequence: through the reward
    # (rewards.depth_penalty), one advantage per completion shared by its ~30 exits. token: each exit is charged
    # its own loops, exit_cost per loop, against the mean loops per exit of the batch (a baseline), on top of the
    # completion's task advantage; the reward then holds the task's score alone.
    exit_credit: Literal["sequence", "token"] = "sequence"
    exit_cost: float = 0.0
    # The exit gate's learning rate as a multiple of training.learning_rate (its own optimizer group, scheduled
    # alike): the gate's 65 parameters barely move at a rate chosen for the LM.
    gate_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.progressive_power < 0:
            raise ValueError(f"loop.progressive_power must be >= 0, got {self.progressive_power}")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(
                f"loop.max_consecutive_nonfinite_steps must be >= 1, got {self.max_consecutive_nonfinite_steps}"
            )
        if self.max_parity_gap is not None and self.max_parity_gap <= 0:
            raise ValueError(f"loop.max_parity_gap must be > 0 or null, got {self.max_parity_gap}")
        if self.exit_action and (self.loop_credit != "last" or self.update_depth != "replay"):
            raise ValueError(
                "loop.exit_action needs loop.loop_credit=last and loop.update_depth=replay (the exit is scored at "
                f"the depth the rollout sampled), got {self.loop_credit} and {self.update_depth}"
            )
        if self.gate_lr_scale <= 0:
            raise ValueError(f"loop.gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        if self.exit_cost < 0:
            raise ValueError(f"loop.exit_cost must be >= 0, got {self.exit_cost}")
        if self.exit_credit == "token" and not self.exit_action:
            raise ValueError("loop.exit_credit=token needs loop.exit_action=true (it charges the sampled exits)")
        if self.exit_credit != "token" and self.exit_cost:
            raise ValueError("loop.exit_cost is charged per exit with loop.exit_credit=token only; with sequence "
                             "credit the charge is rewards.options.alpha (rewards.depth_penalty)")


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: keep only groups whose rewards differ; TRL has no such option."""

    enabled: bool = False
    max_retries: int = 3  # refill rounds per step before giving up and keeping uninformative groups
    oversample: float = 2.0  # fresh prompts drawn per missing group in a refill round

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"dynamic_sampling.max_retries must be >= 0, got {self.max_retries}")
        if self.oversample < 1.0:
            raise ValueError(f"dynamic_sampling.oversample must be >= 1, got {self.oversample}")


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def replay_exit_steps(
    records: Sequence[RolloutRecord], prompt_width: int, completion_width: int, num_loops: int, full_depth: bool
) -> torch.Tensor:
    """(B, prompt_width + completion_width) exit steps for TRL's padded batch (prompts left-, completions
    right-padded): prompt and pad positions run all `num_loops`; completion position j runs at the depth its
    token was fed back at in the rollout (`full_depth`: at `num_loops`, the mismatch control)."""
    steps = torch.full((len(records), prompt_width + completion_width), num_loops, dtype=torch.long)
    if not full_depth:
        for i, r in enumerate(records):
            steps[i, prompt_width : prompt_width + len(r.exit_steps)] = torch.tensor(r.exit_steps)
    return steps


def loop_credit_weights(
    kind: str, exit_steps: torch.Tensor, num_loops: int, gate_logits: torch.Tensor | None = None, power: float = 1.0
) -> torch.Tensor:
    """(B, C) exit steps -> (B, C, T) weights over loops, summing to 1 over the loops each token ran.

    uniform: 1/e over loops 1..e; progressive: proportional to t^power; exit: the gate's exit distribution
    p(t) (gate_logits (B, C, T), detached), renormalised over loops 1..e.
    """
    loops = torch.arange(1, num_loops + 1, device=exit_steps.device, dtype=torch.float32)
    ran = (loops <= exit_steps[..., None]).float()  # (B, C, T)
    if kind == "uniform":
        raw = ran
    elif kind == "progressive":
        raw = ran * (loops / num_loops).pow(power)  # scaled by T first: no overflow at large powers
    elif kind == "exit":
        if gate_logits is None:
            raise ValueError("loop_credit='exit' needs the gate logits")
        raw = ran * exit_log_pdf(gate_logits.detach().float()).exp()
    else:
        raise ValueError(f"unknown loop credit {kind!r}; expected uniform, progressive or exit")
    return raw / raw.sum(-1, keepdim=True).clamp(min=1e-12)


def token_exit_advantages(
    advantages: torch.Tensor, exit_steps: torch.Tensor, completion_mask: torch.Tensor, cost: float
) -> tuple[torch.Tensor, float]:
    """Per-exit compute credit: (B,) or (B, C) advantages, (B, C) the completion positions' exit steps (record
    form) and mask -> ((B, C) advantages in action form, the baseline).

    Column j's action is the exit of the position that predicts token j (completion position j - 1); it gets
    -cost x (its loops - the batch's mean loops per exit). Column 0 (predicted by the prompt, which runs every
    loop) and padding get no charge. The charge is constant given the exit, so on the token part of the joint
    (exit, token) log-prob its expectation is zero: it moves the exits, and adds only variance to the tokens."""
    loops = exit_actions(exit_steps.float())  # column j: the loops of position j - 1
    charged = completion_mask.float().clone()
    charged[:, 0] = 0.0
    baseline = (loops * charged).sum() / charged.sum().clamp(min=1.0)
    charge = -cost * (loops - baseline) * charged
    return advantages.reshape(len(charge), -1) + charge, baseline.item()


def rollout_exit_logps(records: Sequence[RolloutRecord], completion_width: int) -> torch.Tensor:
    """(B, C) the rollout's exit log-probs in `exit_action_logps`' alignment: column j holds record
    `exit_logprobs[j - 1]` (column 0 and padding: 0)."""
    out = torch.zeros(len(records), completion_width)
    for i, r in enumerate(records):
        if len(r.exit_logprobs) != len(r.completion_ids):
            raise ValueError(f"record {i} has no exit_logprobs: loop.exit_action needs rollout.depth.policy=sampled")
        out[i, : len(r.exit_logprobs)] = exit_actions(torch.tensor(r.exit_logprobs))
    return out


def parity_metrics(
    rollout_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor, gather: Gather | None = None
) -> dict[str, float]:
    """(B, C) x 2 and a (B, C) mask -> max and mean |dlogp| and the k3 KL estimate over the completion tokens.

    gather: stacks each training process's (k,) partial sums into (processes, k) (the trainer passes
    accelerate's gather), so every process reports the whole batch's numbers; None: this process's alone."""
    keep = mask.bool()
    rollout, trainer = rollout_logps[keep].double().cpu(), trainer_logps[keep].double().cpu()
    gap = (rollout - trainer).abs()
    parts = torch.stack([
        gap.max() if gap.numel() else torch.zeros((), dtype=torch.float64), gap.sum(),
        k3_kl(rollout, trainer).double().sum(), torch.tensor(float(gap.numel()), dtype=torch.float64),
    ])
    parts = (gather or _alone)(parts)  # (processes, 4)
    tokens = parts[:, 3].sum()
    if tokens == 0:  # nothing to compare (every row masked out): no number rather than a perfect one
        return {"parity/max_abs": math.nan, "parity/mean_abs": math.nan, "parity/kl": math.nan}
    return {
        "parity/max_abs": parts[:, 0].max().item(),
        "parity/mean_abs": (parts[:, 1].sum() / tokens).item(),
        "parity/kl": (parts[:, 2].sum() / tokens).item(),
    }


def exit_metrics(records: Sequence[RolloutRecord], num_loops: int, gather: Gather | None = None) -> dict[str, float]:
    """Mean exit loop of the decoded positions that ran (each completion's last token never does) and its
    histogram, as fractions per loop, over every training process's records (`gather`: see parity_metrics)."""
    steps = torch.tensor([s for r in records for s in r.exit_steps[:-1]], dtype=torch.long)
    counts = torch.bincount(steps, minlength=num_loops + 1)[1:].double()  # (T,)
    counts = (gather or _alone)(counts).sum(0)
    if counts.sum() == 0:  # no position ran (one-token completions): report full depth, as the engine ran it
        counts[-1] = 1.0
    hist = counts / counts.sum()
    mean = (hist * torch.arange(1, num_loops + 1, dtype=torch.float64)).sum().item()
    return {"loops/mean_exit_loop": mean} | {f"loops/exit_frac_{t + 1}": v for t, v in enumerate(hist.tolist())}


Gather = Callable[[torch.Tensor], torch.Tensor]


def _alone(parts: torch.Tensor) -> torch.Tensor:
    return parts[None]


def importance_weights(
    trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor, mode: str,
    clip_min: float | None, clip_max: float | None,
) -> torch.Tensor:
    """(B, C) -> (B, C) importance weights p_trainer / p_rollout, as TRL computes them for vLLM.

    mode: token_truncate / token_mask / sequence_truncate / sequence_mask (TRL's `vllm_importance_sampling_mode`).
    """
    diff = (trainer_logps - rollout_logps) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(diff)
    ratio = diff.exp()
    low = -float("inf") if clip_min is None else clip_min
    high = float("inf") if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return ratio.clamp(min=None if clip_min is None else clip_min, max=clip_max)
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# ----------------------------------------------------------------------------------------------------------
# The trainer


class LoopGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts come from a LoopRL engine and whose update replays their depths.

    engine: where completions come from (its weights are synced from the trainer's model every step). With several
    training processes, the main process's engine serves them all (`SharedEngine`); the others pass None.
    depth: the rollout's depth policy. rollout_seed: base seed of the engine's sampling noise (per step).
    """

    def __init__(
        self,
        *args,
        engine: RolloutEngine | None,
        depth: DepthConfig,
        loop: LoopRLConfig | None = None,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        rollout_seed: int = 0,
        max_staleness: int = 0,
        **kwargs,
    ):
        super().__init__(*args, rollout_func=self._rollout_func, **kwargs)
        self.engine = SharedEngine(engine, self.accelerator.process_index, self.accelerator.num_processes)
        if self.accelerator.num_processes > 1:
            logger.info(
                "%d training processes (%s) share the main process's rollout engine", self.accelerator.num_processes,
                self.accelerator.distributed_type.value,
            )
        self.depth = depth
        self.loop = loop or LoopRLConfig()
        self.add_callback(NonFiniteGuard(self.loop.max_consecutive_nonfinite_steps))
        self.add_callback(MarkCompleteCheckpoints())  # the recipe resumes only from marked checkpoints
        self.dynamic = dynamic_sampling or DynamicSamplingConfig()
        if self.accelerator.num_processes > 1 and self.args.per_device_train_batch_size % self.num_generations:
            raise UserError(
                f"training.per_device_train_batch_size={self.args.per_device_train_batch_size} with "
                f"{self.accelerator.num_processes} processes: it must be a multiple of training.num_generations="
                f"{self.num_generations}, so that each process holds whole groups (rollouts and dynamic sampling "
                "work per group)"
            )
        self.rollout_seed = rollout_seed
        self.num_loops = self._policy().config.total_ut_steps
        if self._policy().config.exact_mode:
            logger.info(
                "exact mode: the trainer's log-probs are the rollout's bit for bit (parity/max_abs reads 0); "
                "importance-sampling correction is unnecessary%s",
                " (its weights are all exactly 1)" if self.loop.importance_sampling_correction else "",
            )
        # The batch rollout_func just generated, in TRL's row order: read by TRL's own old-log-prob pass (no argument
        # of that pass can carry it); once TRL's scoring returns, it travels in the batch dict (`_rollout_tensors`).
        self._records: list[RolloutRecord] = []
        self._stash: list[RolloutRecord] | None = None  # dynamic sampling's chosen records
        self._replay: torch.Tensor | None = None  # (B, P+C) exit steps of the batch being scored
        self._phase_s: dict[str, float] = {}
        self._update_tokens = 0.0
        self._weights_synced = False  # the engine starts from its own copy: sync before the first rollout
        self._calls_at_step = (-1, 0)
        self.completions_generated = 0
        self.max_staleness = max_staleness
        self._rollouts: RolloutQueue | None = None  # asynchronous rollouts (max_staleness > 0): every engine call
        self._lookahead: Lookahead | None = None  # the data loader's epoch iterator, peeked at
        if max_staleness:
            self._check_async()
            self._rollouts = RolloutQueue(self.engine, depth)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the trainable exit-gate parameters moved to a group of their own at
        `loop.gate_lr_scale` x training.learning_rate (the scheduler then scales every group alike)."""
        optimizer = super().create_optimizer(model)
        if self.loop.gate_lr_scale != 1.0:
            gate = {id(p) for p in self._policy().model.early_exit_gate.parameters() if p.requires_grad}
            moved = []
            for group in optimizer.param_groups:
                moved += [p for p in group["params"] if id(p) in gate]
                group["params"] = [p for p in group["params"] if id(p) not in gate]
            if moved:
                lr = self.args.learning_rate * self.loop.gate_lr_scale
                optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0})
            else:  # a frozen gate, or parameters flattened by a wrapper (FSDP1)
                logger.warning("loop.gate_lr_scale=%g: no trainable gate parameter in the optimizer, nothing to "
                               "scale", self.loop.gate_lr_scale)
        return optimizer

    # -- rollouts ------------------------------------------------------------------------------------------

    def _policy(self) -> torch.nn.Module:
        """The LoopLM being trained (inside accelerate's and PEFT's wrappers)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _sync_weights(self) -> int:
        version = self.state.global_step
        if self.engine.policy_version != version or not self._weights_synced:
            self.engine.load_weights(gathered_policy_state(self.accelerator, self.model), version)
            self._weights_synced = True
        return version

    def _gather(self, parts: torch.Tensor) -> torch.Tensor:
        """(k,) partial sums of this process -> (processes, k): the metrics cover the whole batch."""
        return self.accelerator.gather(parts[None].to(self.accelerator.device)).cpu()

    def _sampling(self, n: int, step: int | None = None) -> SamplingConfig:
        """step: the optimizer step the batch is for (default: the current one; a batch started ahead names its
        own, so that it draws the noise a synchronous run draws for it)."""
        args = self.args
        # A fresh, resumable seed per (step, call within the step): a resumed run draws the same noise.
        step = self.state.global_step if step is None else step
        call = self._calls_at_step[1] if self._calls_at_step[0] == step else 0
        self._calls_at_step = (step, call + 1)
        seed = (self.rollout_seed * 1_000_003 + step * 1009 + call) % 2**62
        return SamplingConfig(
            n=n, temperature=args.temperature, max_new_tokens=args.max_completion_length, seed=seed,
            stop_token_ids=list(self.eos_token_ids),
        )

    def generate_groups(self, prompts: Sequence[Any], n: int) -> list[RolloutRecord]:
        """`n` completions for each prompt, prompt-major, from the engine at the current policy version."""
        start = time.perf_counter()
        if self._rollouts is not None:  # the engine is the rollout thread's: queue the request and wait for it
            records = self._rollouts.run_now(prompts, self._sampling(n), self.state.global_step, self._policy_state)
        else:
            self._sync_weights()
            records = self.engine.generate(list(prompts), self._sampling(n), self.depth)
        self._account(records, time.perf_counter() - start)
        return records

    def _account(self, records: Sequence[RolloutRecord], seconds: float) -> None:
        """Check each record's policy version (the current one, or at most `max_staleness` steps older), count
        the completions, log staleness and tokens/s (`seconds`: the time generation held up the step)."""
        version = self.state.global_step
        ages = [version - r.policy_version for r in records]
        if any(age < 0 or age > self.max_staleness for age in ages):
            raise RuntimeError(
                f"rollout records carry policy versions {sorted({r.policy_version for r in records})} at step "
                f"{version} (rollout.max_staleness={self.max_staleness})"
            )
        if self.max_staleness:
            self._metrics["train"]["rollout/staleness_mean"].append(sum(ages) / max(len(ages), 1))
            self._metrics["train"]["rollout/staleness_max"].append(float(max(ages, default=0)))
        self._phase("generate", seconds)
        # Every process's completions and tokens: the engine generated them all in `seconds`.
        count, tokens = self._gather(torch.tensor([len(records), sum(len(r.completion_ids) for r in records)],
                                                  dtype=torch.float64)).sum(0).tolist()
        self.completions_generated += int(count)
        self._metrics["train"]["rollout/tokens_per_s"].append(tokens / max(seconds, 1e-9))

    def _rollout_func(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        """TRL's `rollout_func`: prompts arrive repeated, each `num_generations` (`num_generations_eval` in
        evaluation) times in a row."""
        if self._stash is not None:
            records, self._stash = self._stash, None
        elif self._rollouts is not None and self.model.training:  # started ahead (get_batch_samples)
            start = time.perf_counter()
            records = self._rollouts.take(prompts[:: self.num_generations])
            self._account(records, time.perf_counter() - start)
        else:
            n = self.num_generations if self.model.training else self.num_generations_eval
            records = self.generate_groups(prompts[::n], n)
        if len(records) != len(prompts):
            raise RuntimeError(f"{len(records)} completions for {len(prompts)} prompt slots")
        self._records = records
        self._log_rollout_metrics(records)
        return {
            "prompt_ids": [r.prompt_ids for r in records],
            "completion_ids": [r.completion_ids for r in records],
            "logprobs": [r.logprobs for r in records],
            "exit_steps": [r.exit_steps for r in records],  # extra keys reach the reward functions (depth_penalty)
        }

    def _log_rollout_metrics(self, records: Sequence[RolloutRecord]) -> None:
        for name, value in exit_metrics(records, self.num_loops, self._gather).items():
            self._metrics["train"][name].append(value)
        truncated, count = self._gather(
            torch.tensor([sum(r.finish_reason == "length" for r in records), len(records)], dtype=torch.float64)
        ).sum(0).tolist()
        self._metrics["train"]["completions/truncated_frac"].append(truncated / max(count, 1.0))
        self._metrics["train"]["rollout/completions_total"].append(float(self.completions_generated))

    # -- asynchronous rollouts (max_staleness > 0) -----------------------------------------------------------

    def _check_async(self) -> None:
        """What asynchronous rollouts support today; each limit is a clear error, not a silent change."""
        args, limits = self.args, []
        if self.accelerator.num_processes > 1:
            limits.append(f"one training process (got {self.accelerator.num_processes})")
        if args.gradient_accumulation_steps != 1 or args.steps_per_generation != 1 or self.num_iterations != 1:
            limits.append("training.gradient_accumulation_steps, steps_per_generation and num_iterations of 1")
        if self.dynamic.enabled:
            limits.append("dynamic_sampling.enabled=false")
        if not self.loop.importance_sampling_correction:
            limits.append("loop.importance_sampling_correction=true (stale batches are off-policy)")
        if limits:
            raise UserError(f"rollout.max_staleness={self.max_staleness} needs " + "; ".join(limits))

    def _policy_state(self) -> dict[str, torch.Tensor] | None:
        return gathered_policy_state(self.accelerator, self.model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer takes this step's batch; with asynchronous rollouts, the rollouts of it and of the next
        `max_staleness` batches (not past max_steps) are started here, with this step's weights."""
        if self._rollouts is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._lookahead is None or self._lookahead.source is not epoch_iterator:
            self._lookahead = Lookahead(epoch_iterator)
        batches, items = super().get_batch_samples(self._lookahead, num_batches, device)
        step = self.state.global_step
        ahead = max(min(self.max_staleness, self.state.max_steps - step - 1), 0)
        upcoming = batches + self._lookahead.peek(ahead)  # one batch per optimizer step (checked)
        for offset, batch in enumerate(upcoming[len(self._rollouts) :], start=len(self._rollouts)):
            prompts = [row["prompt"] for row in batch][:: self.num_generations]
            self._rollouts.submit(prompts, self._sampling(self.num_generations, step + offset), step, self._policy_state)
        return batches, items

    # -- one generation batch: rollouts, rewards, trainer log-probs, parity --------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.dynamic.enabled and self.model.training:
            inputs = self._dynamic_sample(inputs)
        output = super()._generate_and_score_completions(inputs)
        records, self._records = self._records, []  # this batch's: from here on in `output`, which TRL buffers
        output |= self._rollout_tensors(records, output)
        if self.loop.exit_credit == "token":
            completion_steps = output["exit_steps"][:, output["prompt_ids"].shape[1] :]
            output["advantages"], baseline = token_exit_advantages(
                output["advantages"], completion_steps, output["completion_mask"], self.loop.exit_cost
            )
            self._metrics["train"]["depth/exit_baseline_loops"].append(baseline)
        self._check_parity(output)
        return output

    def _rollout_tensors(self, records: Sequence[RolloutRecord], output: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What the parity check and the update read of the batch's records, one row per completion, in the dict
        TRL hands from scoring to `_compute_loss` (split by rows with it): the exit steps to replay, whether the
        current weights made the row (`rollout_fresh`), and with `exit_action` the rollout's exit log-probs."""
        device = output["prompt_ids"].device
        prompt_width, completion_width = output["prompt_ids"].shape[1], output["completion_ids"].shape[1]
        step = self.state.global_step
        tensors = {
            "exit_steps": self._exit_steps(records, prompt_width, completion_width).to(device),
            "rollout_fresh": torch.tensor([r.policy_version == step for r in records], device=device),
        }
        if self.loop.exit_action:
            tensors["rollout_exit_logps"] = rollout_exit_logps(records, completion_width).to(device)
        return tensors

    def _exit_steps(self, records: Sequence[RolloutRecord], prompt_width: int, completion_width: int) -> torch.Tensor:
        full = self.loop.update_depth == "full"
        return replay_exit_steps(records, prompt_width, completion_width, self.num_loops, full)

    @torch.no_grad()
    def _check_parity(self, output: dict[str, Any]) -> None:
        """Trainer log-probs of the sampled tokens, before the update, against the rollout's."""
        start = time.perf_counter()
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        width = output["completion_ids"].shape[1]
        batch = self.args.per_device_train_batch_size
        old = output.get("old_per_token_logps")  # TRL computes them when generation and steps are misaligned
        last_loop = self.loop.loop_credit == "last"
        completion_mask = output["completion_mask"]
        # Replay parity holds for the records the current weights made; older ones (asynchronous rollouts) differ
        # by the updates since, which the importance weights correct: their gap is logged apart (offpolicy/*).
        fresh = output["rollout_fresh"][:, None]
        parity_mask = completion_mask * fresh
        metrics: dict[str, float] = {}
        with self.replaying(output["exit_steps"]):
            if self.loop.exit_action:  # token and exit parts apart, for their own parity (one forward)
                trainer_logps, exit_logps, _ = self._fused_parts(self.model, ids, mask, width, batch, False)
                rollout_exit = output["rollout_exit_logps"].to(exit_logps.device)
                metrics |= {
                    name.replace("parity/", "parity/exit_"): value
                    for name, value in parity_metrics(rollout_exit, exit_logps, parity_mask, self._gather).items()
                }
                if old is None:
                    output["old_per_token_logps"] = trainer_logps + exit_logps
            else:
                # With last-loop credit TRL's old log-probs are already the exit loop's: no second forward.
                trainer_logps = (
                    old if old is not None and last_loop else self._token_logps(self.model, ids, mask, width, batch)
                )
                if old is None:  # TRL skipped them: these are the pre-update log-probs
                    output["old_per_token_logps"] = (
                        trainer_logps if last_loop
                        else self._get_per_token_logps_and_entropies(self.model, ids, mask, width, batch)[0]
                    )
        rollout_logps = output["sampling_per_token_logps"]
        metrics = parity_metrics(rollout_logps, trainer_logps, parity_mask, self._gather) | metrics
        if self.max_staleness:
            stale = parity_metrics(rollout_logps, trainer_logps, completion_mask * ~fresh, self._gather)
            metrics |= {name.replace("parity/", "offpolicy/"): value for name, value in stale.items()}
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        worst = max(metrics["parity/max_abs"], metrics.get("parity/exit_max_abs", 0.0))
        if self.loop.max_parity_gap is not None and worst > self.loop.max_parity_gap:
            raise RuntimeError(
                f"step {self.state.global_step}: rollout/trainer max |dlogp| {worst:.3e} (tokens or exits) exceeds "
                f"loop.max_parity_gap={self.loop.max_parity_gap}"
            )
        if self.loop.importance_sampling_correction:
            args = self.args
            weights = importance_weights(
                trainer_logps, rollout_logps, completion_mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
            # A per-token factor on the advantages scales each loss type's per-token term (all are linear in A).
            output["advantages"] = output["advantages"].reshape(-1, 1) * weights
            kept = weights[completion_mask.bool()]
            self._metrics["train"]["sampling/importance_sampling_ratio/mean"].append(kept.mean().item())
            self._metrics["train"]["sampling/importance_sampling_ratio/min"].append(kept.min().item())
        self._phase("logprobs", time.perf_counter() - start)

    # -- the update forward: exit replay (and loop credit) -------------------------------------------------

    @contextlib.contextmanager
    def replaying(self, exit_steps: torch.Tensor) -> Iterator[None]:
        """Forwards inside run each row at `exit_steps` (B, P+C); chunks slice it by row."""
        self._replay = exit_steps
        try:
            yield
        finally:
            self._replay = None

    def _compute_loss(self, model, inputs):
        self._update_tokens = float(inputs["completion_mask"].sum())
        with self.replaying(inputs["exit_steps"]):
            return super()._compute_loss(model, inputs)

    def _replay_rows(self, start: int, end: int, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        if self._replay is None:  # TRL's own old-log-prob pass, right after our rollout_func
            self._replay = self._exit_steps(self._records, input_ids.shape[1] - logits_to_keep, logits_to_keep)
        return self._replay[start:end].to(input_ids.device)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        """TRL's per-token log-probs with each row's exit steps replayed; with loop credit, the credit-weighted
        sum over loops of each loop's log-prob of the sampled token (the ratio and the gradient both use it)."""
        if self.loop.loop_credit == "last":
            return self._fused_logps(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy)
        return self._loop_credit_logps(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy)

    def _token_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size) -> torch.Tensor:
        """The exit loop's log-prob of each completion token: what the rollout sampled from."""
        return self._fused_parts(model, input_ids, attention_mask, logits_to_keep, batch_size, False)[0]

    def _fused_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy):
        """TRL's fused-head log-probs at the replayed depths; with `exit_action`, plus the exit log-probs."""
        token, exit_, entropy = self._fused_parts(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy
        )
        return (token if exit_ is None else token + exit_), entropy, None

    def _fused_parts(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy):
        """-> ((B, C) token log-probs, (B, C) exit log-probs or None without `exit_action`, entropies or None)."""
        batch_size = batch_size or input_ids.size(0)
        logps, exit_logps, entropies = [], [], []
        detach_states = self.loop.exit_action and not self.loop.exit_grad_to_lm
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            steps = self._replay_rows(start, end, ids, logits_to_keep)
            capture = self._backbone_output() if self.loop.exit_action else contextlib.nullcontext([])
            with self.accelerator.autocast(), capture as backbone:
                if self._policy().config.exact_mode:
                    out = self._exact_logps(model, ids, mask, steps, logits_to_keep, detach_states)
                else:
                    out = model(
                        input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, exit_steps=steps,
                        output_loop_states=detach_states,
                    )
            logps.append(out.log_probs[:, -logits_to_keep:])
            if self.loop.exit_action:
                exit_logps.append(self._exit_logps(backbone[0], steps, logits_to_keep, detach_states))
            if compute_entropy:
                entropies.append(out.entropy[:, -logits_to_keep:])
        return (
            torch.cat(logps), torch.cat(exit_logps) if exit_logps else None,
            torch.cat(entropies) if compute_entropy else None,
        )

    def _exact_logps(self, model, ids, mask, steps, logits_to_keep: int, output_loop_states: bool) -> SimpleNamespace:
        """Exact mode: the completion tokens' log-probs from the model's own logits and the engine's
        `processed_logprobs` (TRL's fused head reduces over the vocabulary in its own tiled order, so it would
        differ from the rollout in the last bits). -> `.log_probs`, `.entropy`: (b, logits_to_keep) each."""
        logits = model(
            input_ids=ids, attention_mask=mask, exit_steps=steps, logits_to_keep=logits_to_keep + 1,
            output_loop_states=output_loop_states, use_cache=False,
        ).logits[:, :-1]  # (b, C, V): position p predicts token p + 1
        logp = processed_logprobs(logits, self.args.temperature)
        return SimpleNamespace(log_probs=token_logprobs(logp, ids[:, -logits_to_keep:]), entropy=entropy(logp))

    @contextlib.contextmanager
    def _backbone_output(self) -> Iterator[list]:
        """The backbone's output of the forward run inside (TRL's fused head keeps only `last_hidden_state`)."""
        captured: list = []
        handle = self._policy().model.register_forward_hook(lambda _module, _args, output: captured.append(output))
        try:
            yield captured
        finally:
            handle.remove()

    def _exit_logps(self, backbone_out, steps: torch.Tensor, width: int, detach_states: bool) -> torch.Tensor:
        """(b, C) exit log-probs of the completion tokens' predicting positions (see `exit_action_logps`)."""
        if detach_states:  # the exit term trains the gate only: re-read the gate on the detached loop states
            states = torch.stack(backbone_out.loop_hidden_states, dim=2)[:, -width - 1 :].detach()  # (b, C+1, L, D)
            gates = self._policy().model.early_exit_gate(states).squeeze(-1)  # (b, C+1, L)
        else:
            gates = backbone_out.gate_logits[:, -width - 1 :]
        return exit_action_logps(gates, steps[:, -width - 1 :], width, self.num_loops, self.depth.exit_temperature)

    def _loop_credit_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy):
        batch_size = batch_size or input_ids.size(0)
        lm_head = self._policy().get_output_embeddings()
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            steps = self._replay_rows(start, end, ids, logits_to_keep)
            with self.accelerator.autocast():
                # logits_to_keep + 1: the exit loop's logits at the completion's predictors (for the entropy)
                out = model(
                    input_ids=ids, attention_mask=mask, exit_steps=steps, output_loop_states=True,
                    use_cache=False, logits_to_keep=logits_to_keep + 1 if compute_entropy else 1,
                )
            targets = ids[:, -logits_to_keep:]
            # Position p predicts token p + 1: the completion's predictors are the positions before each token.
            per_loop = torch.stack([
                sampled_logprobs(lm_head(predictors(h, logits_to_keep)), targets, self.temperature)
                for h in out.loop_hidden_states
            ], dim=-1)  # (b, C, T)
            predictor_steps = predictors(steps, logits_to_keep)
            gates = predictors(out.gate_logits, logits_to_keep)
            weights = loop_credit_weights(
                self.loop.loop_credit, predictor_steps, self.num_loops, gates, self.loop.progressive_power
            )
            logps.append((per_loop * weights).sum(-1))
            if compute_entropy:
                entropies.append(entropy(processed_logprobs(out.logits[:, :-1], self.temperature)))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # -- dynamic sampling ----------------------------------------------------------------------------------

    def _dynamic_sample(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace groups whose rewards are all equal by groups of fresh prompts, up to `max_retries` rounds.

        The chosen groups' records are stashed, so `rollout_func` returns them instead of generating again.
        """
        G = self.num_generations
        wanted = len(inputs) // G
        candidates = [inputs[g * G] for g in range(wanted)]
        kept: list[tuple[dict, list[RolloutRecord]]] = []
        dropped: list[tuple[dict, list[RolloutRecord]]] = []
        zero_std_first_draw, refilled, rounds = 0.0, 0, 0
        while True:
            informative, groups = self._score_groups(candidates)
            if rounds == 0:
                zero_std_first_draw = 1.0 - sum(informative) / len(informative)
            for row, records, ok in zip(candidates, groups, informative, strict=True):
                take = ok and len(kept) < wanted
                (kept if take else dropped).append((row, records))
                refilled += int(take and rounds > 0)
            rounds += 1
            # Every process runs the same rounds of the same size (generation and rewards are collective): the
            # most groups any process still misses.
            missing = int(self._gather(torch.tensor([float(wanted - len(kept))])).max())
            if missing == 0 or rounds > self.dynamic.max_retries:
                break
            candidates = self._fresh_rows(math.ceil(missing * self.dynamic.oversample), rounds)
        unfilled = wanted - len(kept)
        chosen = kept + dropped[:unfilled]  # too few informative groups: keep some uninformative ones
        for name, value in {
            "zero_std_frac_first_draw": zero_std_first_draw, "dropped_groups": len(dropped) - unfilled,
            "refilled_groups": refilled, "unfilled_groups": unfilled, "rounds": rounds,
        }.items():
            self._metrics["train"][f"dynamic/{name}"].append(float(value))
        self._stash = [r for _, records in chosen for r in records]
        return [row for row, _ in chosen for _ in range(G)]

    def _score_groups(self, rows: list[dict[str, Any]]) -> tuple[list[bool], list[list[RolloutRecord]]]:
        """Generate a group per row and score it with the trainer's reward functions (weighted sum, as TRL)."""
        G = self.num_generations
        records = self.generate_groups([row["prompt"] for row in rows], G)
        # The extra keys rollout_func returns reach the reward functions; here too.
        slots = [row for row in rows for _ in range(G)]
        repeated = [row | {"exit_steps": r.exit_steps} for row, r in zip(slots, records, strict=True)]
        texts = self.processing_class.batch_decode([r.completion_ids for r in records], skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if _is_chat(rows[0]["prompt"]) else texts
        prompts = [row["prompt"] for row in repeated]
        start = time.perf_counter()
        per_func = self._calculate_rewards(repeated, prompts, completions, [r.completion_ids for r in records])
        # TRL gathers every process's rewards (equal counts: the rounds are the same size); keep this process's.
        per_func = per_func.view(self.accelerator.num_processes, len(records), -1)[self.accelerator.process_index]
        self._phase("reward", time.perf_counter() - start)
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1).view(len(rows), G)
        informative = (rewards.max(dim=1).values - rewards.min(dim=1).values > 1e-6).tolist()
        return informative, [records[g * G : (g + 1) * G] for g in range(len(rows))]

    def _fresh_rows(self, count: int, attempt: int) -> list[dict[str, Any]]:
        """Prompts drawn from the training set by a seed of (run seed, step, round): resumable."""
        process = self.accelerator.process_index  # each process draws its own prompts
        rng = random.Random(self.rollout_seed * 7919 + self.state.global_step * 101 + attempt + process * 1_000_003)
        data = self.train_dataset
        return [data[rng.randrange(len(data))] for _ in range(count)]

    # -- timing --------------------------------------------------------------------------------------------

    def _phase(self, name: str, seconds: float) -> None:
        self._phase_s[name] = self._phase_s.get(name, 0.0) + seconds

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        self._phase_s = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - start
        phases = {name: self._phase_s.get(name, 0.0) for name in ("generate", "reward", "logprobs")}
        phases["update"] = max(total - sum(phases.values()), 0.0)
        for name, seconds in phases.items():
            self._metrics["train"][f"time/{name}_s"].append(seconds)
        self._metrics["train"]["update/tokens_per_s"].append(self._update_tokens / max(phases["update"], 1e-9))
        return loss


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def gathered_policy_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The policy's full weights in the main process (the engine's owner), None in the others. Under FSDP every
    process must call it: accelerate gathers the shards into the full state dict on the main process. Under DDP
    the main process's replica is the policy: the others compute nothing."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if hasattr(accelerator.unwrap_model(model), "merge_adapter"):
            raise NotImplementedError("rollout weights of a LoRA model under FSDP: not supported (use DDP or full FT)")
        state = full_state_dict(accelerator.unwrap_model(model))
        return state if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return policy_state_dict(accelerator.unwrap_model(model))


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoopLM's weights as its checkpoint names them; a LoRA model's adapters are merged in (and out again)."""
    if not hasattr(model, "merge_adapter"):
        return {k: v.detach() for k, v in model.state_dict().items()}
    model.merge_adapter()
    try:
        base = model.get_base_model().state_dict()
        return {
            k.replace(".base_layer", "").replace(".modules_to_save.default", ""): v.detach().clone()
            for k, v in base.items()
            if "lora_" not in k and ".original_module." not in k
        }
    finally:
        model.unmerge_adapter()


__all__ = [
    "DynamicSamplingConfig",
    "LoopGRPOTrainer",
    "LoopRLConfig",
    "exit_action_logps",
    "exit_metrics",
    "gathered_policy_state",
    "importance_weights",
    "loop_credit_weights",
    "parity_metrics",
    "policy_state_dict",
    "replay_exit_steps",
    "rollout_exit_logps",
    "token_exit_advantages",
]
