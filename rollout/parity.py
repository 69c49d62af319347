"""Rollout/training parity: recompute every completion with the training forward and measure the gap.

The training side replays each record exactly as a trainer would: `input_ids = prompt + completion`,
`exit_steps = [num_loops] * len(prompt) + record.exit_steps`, one parallel forward without a cache, and the
same `processed_logprobs` the engine sampled from. Reported per token: |logp_rollout - logp_train| (max and
mean) and KL(p_rollout || p_train) between the two processed distributions: exact over the vocabulary when
the records carry their distributions (`SamplingConfig.return_distributions`), otherwise the k3 estimate
from the sampled tokens (r - 1 - log r, r = p_train / p_rollout), which is what RL frameworks log.

Sampled depth (`DepthConfig(policy="sampled")`): the exit decision is part of the action, so its log-prob is
checked too: `check_exit_parity` recomputes log p(exit_steps[i]) from the replay's gate logits at each
completion position and compares it with the record's `exit_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from looplm import LoopLMForCausalLM
from looplm.logprobs import position_exit_logprobs, token_logprobs

from .engine import RolloutRecord, SamplingConfig, processed_logprobs


@dataclass
class ParityStats:
    tokens: int
    max_abs_gap: float  # over every token both sides can sample
    mean_abs_gap: float
    mean_kl: float  # over the positions where it is finite
    kl: str  # "exact" (full distributions) or "k3" (sampled-token estimate)
    filtered_tokens: int  # sampled tokens the replay's processing filtered out (gap = inf); not in the gaps
    support_changes: int  # positions where top-k / top-p / min-p kept a different set (needs distributions)
    max_abs_gap_same_support: float  # max gap over the positions whose kept sets agree

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenGaps:
    """Per-token |dlogp|, KL and support change of a set of completions, (N,) each; `cat` them to pool policies.

    Truncation (top-k, top-p, min-p) is discontinuous: a logit difference of 1e-7 can move a boundary token in
    or out of the kept set, and renormalising then shifts every log-prob by about that token's probability.
    Such positions are counted apart, so a gap there is told from a gap in the model.
    """

    abs_gap: torch.Tensor
    kl: torch.Tensor
    support_changed: torch.Tensor  # bool
    exact_kl: bool

    @staticmethod
    def cat(parts: Sequence[TokenGaps]) -> TokenGaps:
        return TokenGaps(
            torch.cat([p.abs_gap for p in parts]),
            torch.cat([p.kl for p in parts]),
            torch.cat([p.support_changed for p in parts]),
            all(p.exact_kl for p in parts),
        )

    def stats(self) -> ParityStats:
        if self.abs_gap.numel() == 0:
            raise ValueError("no completion tokens to compare")
        finite = torch.isfinite(self.abs_gap)
        gap, kl = self.abs_gap[finite], self.kl[torch.isfinite(self.kl)]
        same = self.abs_gap[finite & ~self.support_changed]
        return ParityStats(
            tokens=self.abs_gap.numel(),
            max_abs_gap=_max(gap),
            mean_abs_gap=gap.mean().item() if gap.numel() else float("inf"),
            mean_kl=kl.mean().item() if kl.numel() else float("inf"),
            kl="exact" if self.exact_kl else "k3",
            filtered_tokens=int((~finite).sum()),
            support_changes=int(self.support_changed.sum()),
            max_abs_gap_same_support=_max(same),
        )


def _max(values: torch.Tensor) -> float:
    return values.max().item() if values.numel() else float("inf")


@torch.inference_mode()
def replay_logprobs(
    model: LoopLMForCausalLM, records: Sequence[RolloutRecord], sampling: SamplingConfig, batch_size: int = 8
) -> list[torch.Tensor]:
    """The training forward's processed log-probs, (len(completion), V) per record, on the CPU."""
    out: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        out += _replay_batch(model, records[start : start + batch_size], sampling)
    return out


def _replay_batch(model: LoopLMForCausalLM, records: Sequence[RolloutRecord], sampling: SamplingConfig):
    logits = _replay_forward(model, records).logits
    # Completion token j is predicted at position p + j - 1.
    return [
        processed_logprobs(logits[i, len(r.prompt_ids) - 1 : len(r.prompt_ids) + len(r.completion_ids) - 1], sampling).cpu()
        for i, r in enumerate(records)
    ]


def _replay_forward(model: LoopLMForCausalLM, records: Sequence[RolloutRecord]):
    """One parallel forward of `prompt + completion` per record at the recorded exit steps (right-padded)."""
    num_loops = {r.num_loops for r in records}
    if len(num_loops) != 1:
        raise ValueError(f"records of one replay batch must share num_loops, got {sorted(num_loops)}")
    (loops,) = num_loops
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in records)
    device = model.device
    ids = torch.zeros(len(records), width, dtype=torch.long)
    mask = torch.zeros(len(records), width, dtype=torch.long)  # right padding: masks come from lengths
    steps = torch.full((len(records), width), loops, dtype=torch.long)
    for i, r in enumerate(records):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        mask[i, : p + c] = 1
        steps[i, p : p + c] = torch.tensor(r.exit_steps)
    return model(
        ids.to(device), attention_mask=mask.to(device), exit_steps=steps.to(device), num_loops=loops, use_cache=False
    )


@torch.inference_mode()
def replay_exit_logprobs(
    model: LoopLMForCausalLM, records: Sequence[RolloutRecord], temperature: float = 1.0, batch_size: int = 8
) -> list[torch.Tensor]:
    """The training forward's log p(exit_steps[i]) per completion position, (len(completion),) per record, from
    its gate logits at `temperature`; the last token's is 0 (never fed back: no exit decision)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        replay = _replay_forward(model, chunk)
        for i, r in enumerate(chunk):
            p, c = len(r.prompt_ids), len(r.completion_ids)
            out.append(position_exit_logprobs(
                replay.gate_logits[i, p : p + c], replay.exit_steps[i, p : p + c], r.num_loops, temperature
            ).cpu())
    return out


def check_exit_parity(
    model: LoopLMForCausalLM, records: Sequence[RolloutRecord], temperature: float = 1.0, batch_size: int = 8
) -> torch.Tensor:
    """(N,) |exit_logprob_rollout - exit_logprob_train| over every completion token of `records` (sampled
    depth; the last token of each is 0 on both sides)."""
    replayed = replay_exit_logprobs(model, records, temperature, batch_size)
    missing = [i for i, r in enumerate(records) if len(r.exit_logprobs) != len(r.completion_ids)]
    if missing:
        raise ValueError(f"records {missing[:5]} carry no exit_logprobs (generated by an engine that does not record them)")
    return torch.cat([
        (torch.tensor(r.exit_logprobs, dtype=torch.float32) - train).abs() for r, train in zip(records, replayed, strict=True)
    ])


def token_gaps(records: Sequence[RolloutRecord], replayed: Sequence[torch.Tensor]) -> TokenGaps:
    """Compare each record's log-probs (and distributions, when kept) with the replay's."""
    gaps, kls, changed = [], [], []
    exact = all(r.distributions is not None for r in records)
    for r, train in zip(records, replayed, strict=True):
        rollout_lp = torch.tensor(r.logprobs, dtype=torch.float32)
        train_lp = token_logprobs(train, torch.tensor(r.completion_ids))
        gaps.append((rollout_lp - train_lp).abs())
        if exact:
            kls.append(_exact_kl(r.distributions, train))
            changed.append((torch.isfinite(r.distributions) != torch.isfinite(train)).any(-1))
        else:  # without distributions only a filtered sampled token shows a changed support
            kls.append(k3_kl(rollout_lp, train_lp))
            changed.append(~torch.isfinite(train_lp))
    return TokenGaps(torch.cat(gaps), torch.cat(kls), torch.cat(changed), exact)


def _exact_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """(N, V) x 2 -> (N,) KL(p || q); inf where p puts mass on a token q filtered out."""
    p_logp, q_logp = p_logp.double(), q_logp.double()
    p = p_logp.exp()
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p))
    return terms.sum(-1).float()


def k3_kl(rollout_lp: torch.Tensor, train_lp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(p_rollout || p_train) from the sampled tokens' log-probs: r - 1 - log r,
    r = p_train / p_rollout (what RL frameworks log when only sampled log-probs are at hand)."""
    log_ratio = (train_lp - rollout_lp).double()
    return (log_ratio.exp() - 1 - log_ratio).float()


def check_parity(
    model: LoopLMForCausalLM, records: Sequence[RolloutRecord], sampling: SamplingConfig, batch_size: int = 8
) -> TokenGaps:
    """Replay `records` (generated with `sampling`) through `model` and return the per-token gaps."""
    return token_gaps(records, replay_logprobs(model, records, sampling, batch_size))


__all__ = [
    "ParityStats",
    "TokenGaps",
    "check_exit_parity",
    "check_parity",
    "k3_kl",
    "replay_exit_logprobs",
    "replay_logprobs",
    "token_gaps",
]
