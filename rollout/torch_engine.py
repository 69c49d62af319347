"""Our PyTorch rollout engine: batched, KV-cached decoding of a LoopLM at fixed or adaptive depth.

One batch: left-padded prefill of the batch's distinct prompts at full depth (masks from lengths), the cache
rows gathered once per completion (n samples of a prompt share its prefill), then one token per step for
every unfinished row. Finished rows are dropped from the cache (`batch_select_indices`) once they make up a
quarter of the batch, so they stop costing compute without a whole-cache copy per finished row. Each step
computes logits for the last position only, processes them with the same `processed_logprobs` the parity
check uses, samples, and records the sampled token's log-prob and the depth its position ran at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from looplm import LoopKVCache, LoopLMForCausalLM
from looplm.exit_gate import exit_log_prob

from .engine import (
    DepthConfig,
    ModelLimits,
    Prompt,
    RolloutEngine,
    RolloutRecord,
    SamplingConfig,
    exit_uniforms,
    prepare_request,
    processed_logprobs,
    request_keys,
    sample_tokens,
)


class TorchEngine(RolloutEngine):
    """Rollouts from an in-memory LoopLM (CPU, or GPU where the model lives on one)."""

    def __init__(
        self,
        model: LoopLMForCausalLM,
        tokenizer: Any = None,
        depth: DepthConfig | None = None,
        max_batch_size: int = 32,
        policy_version: int = 0,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.depth = depth or DepthConfig()
        self.depth.check()
        self.max_batch_size = max_batch_size
        self.policy_version = policy_version
        self.limits = ModelLimits.from_config(model.config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, tokenizer: Any = None, dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs
    ) -> TorchEngine:
        model = LoopLMForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return cls(model, tokenizer=tokenizer, **kwargs)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)
        self.policy_version = version

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, depth: DepthConfig | None = None
    ) -> list[RolloutRecord]:
        prompt_ids, sampling, depth = prepare_request(
            prompts, sampling, depth or self.depth, self.limits, self.tokenizer
        )
        return self.generate_ids(prompt_ids, sampling, depth)

    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        depth: DepthConfig,
        first_prompt: int = 0,
    ) -> list[RolloutRecord]:
        """Already checked and resolved request (see `prepare_request`).

        `first_prompt`: global index of prompt 0, so that a shard draws the same noise as the whole call.
        """
        n = sampling.n
        requests = [(p, j) for p in range(len(prompt_ids)) for j in range(n)]
        # Longest prompts first so batches hold similar lengths; stable, so a prompt's samples stay together.
        order = sorted(range(len(requests)), key=lambda r: -len(prompt_ids[requests[r][0]]))
        records: list[RolloutRecord | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            prompts = [requests[r][0] for r in chunk]
            request_ids = [(first_prompt + p) * n + j for p, j in (requests[r] for r in chunk)]
            batch = self._generate_batch([prompt_ids[p] for p in prompts], request_ids, sampling, depth)
            for r, record in zip(chunk, batch, strict=True):
                records[r] = record
        return [r for r in records if r is not None]

    def _generate_batch(
        self, prompts: list[list[int]], request_ids: list[int], sampling: SamplingConfig, depth: DepthConfig
    ) -> list[RolloutRecord]:
        """Decode one batch of rows (`prompts[i]` is row i's prompt; equal prompts are prefilled once)."""
        device = self.model.device
        distinct = list(dict.fromkeys(map(tuple, prompts)))
        prompt_of_row = torch.tensor([distinct.index(tuple(p)) for p in prompts], device=device)
        num_loops = depth.num_loops
        cache = LoopKVCache(self.model.config, mode=depth.kv_mode)

        ids, mask = _left_pad([list(p) for p in distinct], device)  # (U, P)
        prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        budget = (self.limits.context - prompt_len).clamp(max=sampling.max_new_tokens)  # (B,) new tokens allowed
        max_steps, width = int(budget.max()), ids.shape[1]
        out = self.model(ids, attention_mask=mask, past_key_values=cache, num_loops=num_loops, logits_to_keep=1)
        cache.batch_select_indices(prompt_of_row)  # one cache row per completion
        logits = out.logits[prompt_of_row, -1]  # (B, V)
        # Attention mask over prompt + every step, built once; columns past the prompt are real tokens.
        full_mask = torch.cat([mask[prompt_of_row], mask.new_ones(len(prompts), max_steps)], dim=1)

        state = _DecodeState(len(prompts), max_steps, num_loops, device)
        keys = request_keys(sampling.seed, torch.tensor(request_ids)).to(device)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        rows = torch.arange(len(prompts), device=device)  # batch row of each cache row
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # per cache row
        for t in range(max_steps):
            logp = processed_logprobs(logits, sampling)  # (b, V)
            token = sample_tokens(logp, keys[rows], t, greedy=sampling.temperature == 0)
            idx = (~done).nonzero()[:, 0]  # cache rows still decoding (finished ones may linger, see below)
            live, live_token = rows[idx], token[idx]
            state.record(live, t, live_token, logp[idx], sampling.return_distributions)
            stopped = torch.isin(live_token, stop_ids) | self._hit_stop_string(state, live, t, sampling)
            state.stopped[live] = stopped
            done[idx] = stopped | (budget[live] <= t + 1)
            if bool(done.all()):
                break
            if _worth_compacting(done):
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, token, full_mask, done = rows[keep], token[keep], full_mask[keep], done[keep]
            sampled = depth.policy == "sampled"  # u keyed by (seed, request, step): batch- and actor-independent
            out = self.model(
                token[:, None], attention_mask=full_mask[:, : width + t + 1], past_key_values=cache,
                num_loops=num_loops, logits_to_keep=1,
                **depth.decode_kwargs(exit_uniforms(keys[rows], t) if sampled else None),
            )
            state.exit_steps[rows[~done], t] = out.exit_steps[~done, 0]  # the depth token t's position ran at
            if sampled:  # (b,) log p(e) of the depth just sampled for token t's position
                state.exit_logprobs[rows[~done], t] = exit_log_prob(
                    out.gate_logits[~done, 0], out.exit_steps[~done, 0], num_loops, depth.exit_temperature
                )
            logits = out.logits[:, -1]
        return state.records(prompts, num_loops, self.policy_version)

    def _hit_stop_string(self, state: _DecodeState, alive: torch.Tensor, t: int, sampling: SamplingConfig):
        """(b,) bool: the decoded tail of each row ends a stop string. A per-row loop, only when strings are set."""
        hit = torch.zeros(len(alive), dtype=torch.bool, device=alive.device)
        if not sampling.stop_strings:
            return hit
        # A stop string is complete when its last token arrives (earlier steps would have stopped the row), and
        # it spans at most 4 byte-level tokens per character (UTF-8): decoding a tail that long is enough.
        window = 4 * max(len(s) for s in sampling.stop_strings) + 1
        tails = state.tokens[alive, max(0, t + 1 - window) : t + 1].tolist()
        for i, tail in enumerate(tails):
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            hit[i] = any(s in text for s in sampling.stop_strings)
        return hit


class _DecodeState:
    """Per-row outputs of one batch, preallocated: (B, max_steps) tokens, log-probs and exit steps."""

    def __init__(self, rows: int, max_steps: int, num_loops: int, device):
        self.tokens = torch.zeros(rows, max_steps, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(rows, max_steps, dtype=torch.float32, device=device)
        # The last token is never fed back: it keeps num_loops (the record convention).
        self.exit_steps = torch.full((rows, max_steps), num_loops, dtype=torch.long, device=device)
        self.exit_logprobs = torch.zeros(rows, max_steps, dtype=torch.float32, device=device)  # 0: no sampled exit
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.distributions: list[tuple[torch.Tensor, torch.Tensor]] = []  # (alive rows, (b, V) log-probs)

    def record(self, alive: torch.Tensor, t: int, token: torch.Tensor, logp: torch.Tensor, keep_dist: bool) -> None:
        self.tokens[alive, t] = token
        self.logprobs[alive, t] = logp.gather(-1, token[:, None])[:, 0]
        self.lengths[alive] = t + 1
        if keep_dist:
            self.distributions.append((alive, logp))

    def records(self, prompts: list[list[int]], num_loops: int, version: int) -> list[RolloutRecord]:
        lengths = self.lengths.tolist()
        tokens, logprobs, exits = self.tokens.tolist(), self.logprobs.tolist(), self.exit_steps.tolist()
        exit_logprobs = self.exit_logprobs.tolist()
        dists = self._distributions_per_row(len(prompts)) if self.distributions else None
        return [
            RolloutRecord(
                prompt_ids=list(prompt),
                completion_ids=tokens[i][: lengths[i]],
                logprobs=logprobs[i][: lengths[i]],
                exit_steps=exits[i][: lengths[i]],
                policy_version=version,
                finish_reason="stop" if bool(self.stopped[i]) else "length",
                num_loops=num_loops,
                distributions=None if dists is None else dists[i],
                exit_logprobs=exit_logprobs[i][: lengths[i]],
            )
            for i, prompt in enumerate(prompts)
        ]

    def _distributions_per_row(self, rows: int) -> list[torch.Tensor]:
        per_row: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        for alive, logp in self.distributions:
            for row, dist in zip(alive.tolist(), logp.cpu(), strict=True):
                per_row[row].append(dist)
        return [torch.stack(d) for d in per_row]


def _worth_compacting(done: torch.Tensor) -> bool:
    """Drop finished rows once they are a quarter of the batch: every drop copies the whole cache, so
    dropping one row at a time costs more memory traffic than a few wasted row-steps."""
    return int(done.sum()) * 4 >= len(done)


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, attention mask), both (N, longest). Pads are id 0, hidden by the mask (built from lengths)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p) :] = 1
    return ids, mask


__all__ = ["TorchEngine"]
