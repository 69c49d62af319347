"""Our PyTorch rollout engine: continuous batching of a LoopLM at fixed or adaptive depth, KV-cached.

The requests of a call (n per prompt, prompt-major) form a queue; up to `max_batch_size` of them decode
together, one per slot of a static `SlotKVCache`. A slot freed by a finished completion is refilled at the
next step: the next request's prompt is prefilled at full depth (prompts needed at once are prefilled
together, left-padded, masks from lengths) and copied into the slot; the n samples of a prompt share one
prefill. Each step samples every live slot from its last logits with `processed_logprobs` (the parity check's
function) and Gumbel noise keyed by (seed, global request index, the row's own step), so a completion does
not depend on its slot, its batch or the actor that ran it; then `decode_step` feeds the sampled tokens back,
computing the loops of each row only until it exits, and the depth each position ran at is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from looplm import LoopKVCache, LoopLMForCausalLM, decode
from looplm.cache import SlotKVCache
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
        compile_decode: bool = False,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        if compile_decode:  # fixed-depth steps with every slot fed run as one compiled graph (see compile_decode)
            decode.compile_decode(self.model)
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

        `first_prompt`: global index of prompt 0, so that a chunk draws the same noise as the whole call.
        """
        return _ContinuousBatch(self, prompt_ids, sampling, depth, first_prompt).run()

    def _hit_stop_string(self, state: _DecodeState, requests: torch.Tensor, steps: torch.Tensor, sampling: SamplingConfig):
        """(b,) bool: the decoded tail of each request ends a stop string. A per-row loop, only when strings are set."""
        hit = torch.zeros(len(requests), dtype=torch.bool, device=requests.device)
        if not sampling.stop_strings:
            return hit
        # A stop string is complete when its last token arrives (earlier steps would have stopped the row), and
        # it spans at most 4 byte-level tokens per character (UTF-8): decoding a tail that long is enough.
        window = 4 * max(len(s) for s in sampling.stop_strings) + 1
        for i, (r, t) in enumerate(zip(requests.tolist(), steps.tolist(), strict=True)):
            text = self.tokenizer.decode(state.tokens[r, max(0, t + 1 - window) : t + 1].tolist(), skip_special_tokens=False)
            hit[i] = any(s in text for s in sampling.stop_strings)
        return hit


class _ContinuousBatch:
    """One `generate_ids` call: a queue of requests decoded through the slots of one SlotKVCache.

    Request r (0..N-1) is sample r % n of prompt r // n; its noise key uses its global index
    first_prompt * n + r. Per slot: the request it holds (-1: free), that request's next step, its last logits.
    """

    def __init__(self, engine: TorchEngine, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 depth: DepthConfig, first_prompt: int):
        self.engine, self.model, self.sampling, self.depth = engine, engine.model, sampling, depth
        self.prompt_ids, self.n = prompt_ids, sampling.n
        device = self.device = self.model.device
        count = len(prompt_ids) * self.n
        prompt_len = torch.tensor([len(p) for p in prompt_ids], device=device).repeat_interleave(self.n)  # (N,)
        self.budget = (engine.limits.context - prompt_len).clamp(max=sampling.max_new_tokens)  # (N,) new tokens
        self.state = _DecodeState(count, int(self.budget.max()), depth.num_loops, device)
        self.keys = request_keys(sampling.seed, torch.arange(count) + first_prompt * self.n).to(device)
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)
        slots = min(engine.max_batch_size, count)
        longest = int(prompt_len.max())
        self.cache = SlotKVCache(
            self.model.config, slots, depth.num_loops, depth.kv_mode, capacity=longest + min(128, int(self.budget.max())),
            dtype=self.model.dtype, device=device,
        )
        self.slot_request = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.slot_step = torch.zeros(slots, dtype=torch.long, device=device)
        self.logits = torch.zeros(slots, self.model.config.vocab_size, dtype=self.model.dtype, device=device)
        self.next_request = 0
        self.prefills: dict[int, tuple[LoopKVCache, int, torch.Tensor]] = {}  # prompt -> (cache, row, logits)

    def run(self) -> list[RolloutRecord]:
        greedy = self.sampling.temperature == 0
        while True:
            self._refill()
            live = (self.slot_request >= 0).nonzero()[:, 0]  # (b,) slots holding a request
            if len(live) == 0:
                break
            requests, steps = self.slot_request[live], self.slot_step[live]
            logp = processed_logprobs(self.logits[live], self.sampling)  # (b, V)
            token = sample_tokens(logp, self.keys[requests], steps, greedy=greedy)
            self.state.record(requests, steps, token, logp, self.sampling.return_distributions)
            stopped = torch.isin(token, self.stop_ids) | self.engine._hit_stop_string(
                self.state, requests, steps, self.sampling
            )
            self.state.stopped[requests] = stopped
            done = stopped | (self.budget[requests] <= steps + 1)
            self.slot_request[live[done]] = -1
            fed = ~done
            if bool(fed.any()):
                self._feed(live[fed], token[fed], requests[fed], steps[fed])
            self._maybe_compact()
        prompts = [self.prompt_ids[r // self.n] for r in range(len(self.budget))]
        return self.state.records(prompts, self.depth.num_loops, self.engine.policy_version)

    def _feed(self, slots: torch.Tensor, token: torch.Tensor, requests: torch.Tensor, steps: torch.Tensor) -> None:
        """Decode the sampled tokens of these slots: their next logits, and the depth each position ran at."""
        sampled = self.depth.policy == "sampled"  # u keyed by (seed, request, step): slot- and actor-independent
        uniforms = exit_uniforms(self.keys[requests], steps) if sampled else None
        out = self.model.decode_step(token, slots, self.cache, **self.depth.decode_kwargs(uniforms))
        self.state.exit_steps[requests, steps] = out.exit_steps  # the depth token t's position ran at
        if sampled:  # (b,) log p(e) of the depth just sampled for token t's position
            self.state.exit_logprobs[requests, steps] = exit_log_prob(
                out.gate_logits, out.exit_steps, self.depth.num_loops, self.depth.exit_temperature
            )
        self.logits[slots] = out.logits
        self.slot_step[slots] = steps + 1

    def _refill(self) -> None:
        """Give every free slot the next queued request, prefilling the prompts not prefilled yet."""
        free = (self.slot_request < 0).nonzero()[:, 0].tolist()
        take = list(range(self.next_request, min(self.next_request + len(free), len(self.budget))))
        if not take:
            return
        self._prefill(list(dict.fromkeys(r // self.n for r in take if r // self.n not in self.prefills)))
        for slot, r in zip(free, take, strict=False):
            prompt = r // self.n
            cache, row, logits = self.prefills[prompt]
            self.cache.load_prefill(slot, cache, row, len(self.prompt_ids[prompt]))
            self.logits[slot], self.slot_step[slot], self.slot_request[slot] = logits, 0, r
            if r % self.n == self.n - 1:  # the prompt's last sample: its prefill is no longer needed
                del self.prefills[prompt]
        self.next_request = take[-1] + 1

    def _prefill(self, prompts: list[int]) -> None:
        """Full-depth prefill of these prompts (left-padded, in groups of similar length so that padding costs at
        most `_PREFILL_PADDING` of the real tokens); kept until their samples have slots."""
        for group in _length_groups(prompts, [len(self.prompt_ids[p]) for p in prompts]):
            cache = LoopKVCache(self.model.config, mode=self.depth.kv_mode)
            ids, mask = _left_pad([self.prompt_ids[p] for p in group], self.device)  # (U, P)
            out = self.model(ids, attention_mask=mask, cache=cache, num_loops=self.depth.num_loops,
                             logits_to_keep=1)
            for row, p in enumerate(group):
                self.prefills[p] = (cache, row, out.logits[row, -1])

    def _maybe_compact(self) -> None:
        """Once the queue is empty and at most half the slots are live, drop the free slots (one copy): the draining
        tail's rows are contiguous again, so attention batches them instead of a call per row or reading the free
        slots between them, and the compiled step, which feeds every slot, can run."""
        live = (self.slot_request >= 0).nonzero()[:, 0]
        if self.next_request < len(self.budget) or len(live) == 0 or 2 * len(live) > len(self.slot_request):
            return
        self.cache.select(live)
        self.slot_request, self.slot_step, self.logits = self.slot_request[live], self.slot_step[live], self.logits[live]


class _DecodeState:
    """Per-request outputs of one call, preallocated: (N, max_steps) tokens, log-probs and exit steps; `record`
    takes each row's request and its own step."""

    def __init__(self, rows: int, max_steps: int, num_loops: int, device):
        self.tokens = torch.zeros(rows, max_steps, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(rows, max_steps, dtype=torch.float32, device=device)
        # The last token is never fed back: it keeps num_loops (the record convention).
        self.exit_steps = torch.full((rows, max_steps), num_loops, dtype=torch.long, device=device)
        self.exit_logprobs = torch.zeros(rows, max_steps, dtype=torch.float32, device=device)  # 0: no sampled exit
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.distributions: list[tuple[torch.Tensor, torch.Tensor]] = []  # (alive rows, (b, V) log-probs)

    def record(self, alive: torch.Tensor, t: torch.Tensor, token: torch.Tensor, logp: torch.Tensor, keep_dist: bool) -> None:
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


# Prefill groups: padded tokens at most this fraction of the group's real tokens. Prefill is a large part of a
# short rollout's compute (a prompt runs every loop), and left-padding 16..64-token prompts together wastes 37%.
_PREFILL_PADDING = 0.1


def _length_groups(items: list[int], lengths: list[int]) -> list[list[int]]:
    """Items in order of length, cut into groups whose padding to the group's longest stays within budget."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= (1 + _PREFILL_PADDING) * (real + lengths[i]):
            groups[-1].append(items[i])
            real += lengths[i]
        else:
            groups.append([items[i]])
            real = lengths[i]
    return groups


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
