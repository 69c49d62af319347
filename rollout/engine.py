"""The rollout interface shared by every engine (ours, vLLM) and the Ray pool.

* `SamplingConfig`, `DepthConfig`: what to generate and at which depth, checked before any work starts.
* `RolloutRecord`: one completion, the record of architecture.md.
* `processed_logprobs`: THE function that turns logits into the log-probs of the distribution actually
  sampled from (temperature, top-k, top-p, min-p). The engine samples from it and the parity check applies
  it to the training forward's logits, so both sides process identically.
* `sample_tokens`: Gumbel-max sampling with counter-based noise keyed by (seed, request, step, token), so a
  completion does not depend on batch composition, sharding or the number of actors.
* `exit_uniforms`: the sampled depth policy's per-token U(0, 1) exit thresholds, from the same hash with a
  distinct salt (independent of the token noise), keyed by (seed, request, step).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from looplm import logprobs
from looplm.exits import ExitRule
from looplm.tokenizer import apply_chat

# A prompt is token ids, a chat (list of {"role", "content"} messages, rendered by the tokenizer's template),
# or plain text (encoded without special tokens).
Prompt = Sequence[int] | Sequence[Mapping[str, str]] | str

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingConfig:
    """Sampling options, named as in vLLM's SamplingParams / TRL's GRPOConfig."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (log-probs then come from the temperature-1 distribution)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)  # included in the completion when hit
    stop_strings: list[str] = field(default_factory=list)  # checked on decoded text; needs a tokenizer
    ignore_eos: bool = False  # do not stop at the model's eos token(s)
    seed: int | None = None  # None: a fresh random seed per call
    return_distributions: bool = False  # also keep each step's whole processed log-prob vector (parity KL)

    def check(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field."""
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"sampling.top_k must be >= 1, or 0 / -1 for off, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"sampling.min_p must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for token in self.stop_token_ids:
            if not isinstance(token, int) or token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"sampling.stop_token_ids: unknown token id {token!r} (vocab size {vocab_size})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"sampling.stop_strings must be non-empty strings, got {self.stop_strings!r}")

    def with_seed(self) -> SamplingConfig:
        """A copy with a concrete seed, so shards (and a regenerated shard) draw the same noise."""
        seed = random.SystemRandom().randrange(2**62) if self.seed is None else self.seed
        return dataclasses.replace(self, seed=seed)


DEPTH_NAMES = {"num_loops": "depth.num_loops", "threshold": "depth.exit_threshold", "hidden_eps": "depth.hidden_eps",
               "temperature": "depth.exit_temperature"}


@dataclass
class DepthConfig:
    """How deep every decoded token runs.

    fixed:    every position runs `num_loops` loops (default: the model's T).
    adaptive: prompt positions run all loops; each decoded token exits at the first loop whose exit CDF
              reaches `exit_threshold` (Q-exit), recorded in `exit_steps`.
    hidden_diff: as adaptive, but a decoded token exits at the first loop t >= 2 where its state's relative
              change ||h_t - h_{t-1}|| / ||h_{t-1}|| is below `hidden_eps` (no gate involved).
    sampled:  as adaptive, but each decoded token's exit loop is drawn from the gate's exit distribution with
              lambda = sigmoid(g / exit_temperature) (Q-exit at a per-token threshold u ~ U(0, 1)); its
              log-probability is recorded in `exit_logprobs` (the exit as part of the RL action).
    kv_mode:  the decode-time K/V sharing of LoopKVCache; only "full" is replayed exactly by training.
    """

    policy: Literal["fixed", "adaptive", "hidden_diff", "sampled"] = "fixed"
    num_loops: int | None = None
    exit_threshold: float = 1.0
    kv_mode: Literal["full", "last", "average", "first"] = "full"
    hidden_eps: float = 0.0
    exit_temperature: float = 1.0  # sampled: the gate logits are divided by it

    def check(self) -> None:
        if self.policy not in ("fixed", "adaptive", "hidden_diff", "sampled"):
            raise ValueError(
                f"depth.policy must be 'fixed', 'adaptive', 'hidden_diff' or 'sampled', got {self.policy!r}"
            )
        # The numbers are an exit rule's: checked by it (one rule at a time), under this config's names.
        loops = 1 if self.num_loops is None else self.num_loops
        ExitRule(loops, threshold=self.exit_threshold, temperature=self.exit_temperature).check(names=DEPTH_NAMES)
        ExitRule(loops, hidden_eps=self.hidden_eps).check(names=DEPTH_NAMES)
        if self.kv_mode not in ("full", "last", "average", "first"):
            raise ValueError(f"depth.kv_mode must be one of full/last/average/first, got {self.kv_mode!r}")

    def label(self) -> str:
        loops = self.num_loops or "T"
        name = {
            "fixed": f"fixed(num_loops={loops})",
            "adaptive": f"adaptive(q={self.exit_threshold})",
            "hidden_diff": f"hidden_diff(eps={self.hidden_eps})",
            "sampled": f"sampled(tau={self.exit_temperature})",
        }[self.policy]
        return name if self.kv_mode == "full" else f"{name},kv={self.kv_mode}"

    def decode_kwargs(self, exit_uniforms: torch.Tensor | None = None) -> dict[str, Any]:
        """The model's on-the-fly exit arguments for decoded tokens under this policy (none for fixed depth).

        sampled: `exit_uniforms` (b,) are the step's per-row thresholds (see `exit_uniforms`).
        """
        if self.policy == "adaptive":
            return {"exit_threshold": self.exit_threshold}
        if self.policy == "hidden_diff":
            return {"exit_hidden_eps": self.hidden_eps}
        if self.policy == "sampled":
            if exit_uniforms is None:
                raise ValueError("depth.policy=sampled needs the step's exit uniforms")
            return {"exit_threshold": exit_uniforms[:, None], "exit_temperature": self.exit_temperature}
        return {}


@dataclass
class RolloutRecord:
    """One completion (architecture.md's rollout record), plus what a replay needs.

    `exit_steps[i]` is the depth at which completion token i's position ran when it was fed back (its K/V and
    the logits of token i + 1); the last token is never fed back and records `num_loops`. The training replay
    is `exit_steps = [num_loops] * len(prompt_ids) + exit_steps` on `prompt_ids + completion_ids`.
    `exit_logprobs[i]` is log p(exit_steps[i]) under the gate's exit distribution at that position, the
    probability of the depth decision that precedes token i + 1: so the joint action behind completion token
    j >= 1 is (exit_steps[j - 1], token j), log-prob `exit_logprobs[j - 1] + logprobs[j]`, and token 0 follows
    the prompt's fixed full depth. It is 0 where no exit was sampled: the last token (never fed back) and every
    token of a deterministic depth policy (fixed, adaptive, hidden_diff). Empty from engines that do not record it.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # of each sampled token under the processed sampling distribution
    exit_steps: list[int]
    policy_version: int
    finish_reason: FinishReason
    num_loops: int = 0  # the depth prompt positions ran at (replay's `num_loops`)
    # (len(completion_ids), vocab) processed log-probs, only with `return_distributions`; not serialised.
    distributions: torch.Tensor | None = field(default=None, repr=False)
    exit_logprobs: list[float] = field(default_factory=list)  # per completion token (see above)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "logprobs": self.logprobs,
            "exit_steps": self.exit_steps,
            "policy_version": self.policy_version,
            "finish_reason": self.finish_reason,
            "num_loops": self.num_loops,
            "exit_logprobs": self.exit_logprobs,
        }


def ran_exit_steps(record: RolloutRecord) -> list[int]:
    """The exit loops of the completion positions that ran: a completion's last token is never fed back."""
    return list(record.exit_steps[:-1])


def mean_loops_per_token(records: Sequence[RolloutRecord]) -> float:
    """Average depth of the decoded positions that ran (`ran_exit_steps`)."""
    ran = [step for r in records for step in ran_exit_steps(r)]
    return sum(ran) / max(len(ran), 1)


class RolloutEngine(abc.ABC):
    """Generates `sampling.n` completions per prompt; records come back prompt-major, in prompt order."""

    policy_version: int = 0

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, depth: DepthConfig | None = None
    ) -> list[RolloutRecord]: ...

    @abc.abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights; records generated afterwards carry `version`."""


# ----------------------------------------------------------------------------------------------------------
# Prompts


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Any = None) -> list[list[int]]:
    """Token ids of each prompt; chats go through the tokenizer's chat template (generation prompt on)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    return [_encode_one(p, tokenizer, i) for i, p in enumerate(prompts)]


def _encode_one(prompt: Prompt, tokenizer: Any, index: int) -> list[int]:
    if isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], Mapping)):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text or chat messages: the engine needs a tokenizer")
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = apply_chat(tokenizer, list(prompt))  # the template's generation prompt (opens <think>)
    else:
        ids = prompt
    ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    return ids


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    """Every prompt must leave room for at least one new token and hold only known ids."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= context:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens: longer than the context allows ({context} positions, one at "
                "least for the completion)"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against, read from the model config."""

    vocab_size: int
    context: int  # max positions, prompt + completion
    num_loops: int  # T
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> ModelLimits:
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(config.vocab_size, config.max_position_embeddings, config.total_ut_steps, eos)


def prepare_request(
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    depth: DepthConfig,
    limits: ModelLimits,
    tokenizer: Any = None,
) -> tuple[list[list[int]], SamplingConfig, DepthConfig]:
    """Check everything before any work starts; -> (prompt ids, resolved sampling, resolved depth).

    Resolved: a concrete seed, the model's eos ids added to the stop ids (unless `ignore_eos`), and
    `num_loops` filled in with the model's T.
    """
    sampling.check(limits.vocab_size)
    depth.check()
    if sampling.stop_strings and tokenizer is None:
        raise ValueError("sampling.stop_strings needs a tokenizer to decode completions; none was given")
    prompt_ids = encode_prompts(prompts, tokenizer)
    check_prompt_ids(prompt_ids, limits.vocab_size, limits.context)
    stops = list(dict.fromkeys(sampling.stop_token_ids + ([] if sampling.ignore_eos else list(limits.eos_token_ids))))
    sampling = dataclasses.replace(sampling.with_seed(), stop_token_ids=stops)
    depth = dataclasses.replace(depth, num_loops=depth.num_loops or limits.num_loops)
    return prompt_ids, sampling, depth


# ----------------------------------------------------------------------------------------------------------
# Sampling math: one function for the engine and the parity check.


def processed_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 log-probs of the distribution `sampling` samples from (filtered tokens
    -inf): `looplm.logprobs.processed_logprobs` with this config's numbers."""
    return logprobs.processed_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style xor-shift-multiply) on int64 tensors. Operands stay below 2^32 and
    multipliers below 2^31, so no product overflows int64: the same bits on every device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _MASK32
    return x ^ (x >> 16)


def request_keys(seed: int, request_ids: torch.Tensor) -> torch.Tensor:
    """(B,) int64 stream keys for requests (global prompt index * n + sample index) under `seed`."""
    s = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.long)
    return _mix32(_mix32(request_ids.long() ^ _mix32(s[0])) + s[1] * 0x9E37 + 0x632BE5AB)


def gumbel_noise(keys: torch.Tensor, step: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 Gumbel noise, a pure function of (key, step, token): no generator state to share.

    `step`: the decode step of every row, or a (B,) tensor of per-row steps (rows of a continuous batch).
    The (B, V) part of the hash runs on int32 (`_mix32_int32`), the per-row part on int64 (`_mix32`): the same
    bits as `_mix32` on int64 throughout, at half the memory traffic over the vocabulary (2.2x faster at B = 32).
    """
    steps = torch.as_tensor(step, dtype=torch.long, device=keys.device).reshape(-1, 1)  # (1, 1) or (B, 1)
    row = _mix32(keys[:, None].to(keys.device) + _mix32(steps * 0x9E3779B1 + 0x7F4A7C15))  # (B, 1)
    h = _mix32_int32(_as_int32(row) ^ _token_hash(vocab_size, keys.device)[None, :])  # (B, V)
    u = ((h >> 8) & 0xFFFFFF).float().add_(0.5).div_(float(1 << 24))  # (0, 1), 24 bits: exact in float32
    return u.log_().neg_().log_().neg_()


@functools.lru_cache(maxsize=8)
def _token_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(V,) int32: the tokens' part of the noise hash, the same at every step (cached: 15% of a batch-1 draw)."""
    tokens = torch.arange(vocab_size, dtype=torch.long, device=device)
    return _as_int32(tokens * 0x85EBCA6B & _MASK32)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 tensors holding the same 32 bits (two's complement)."""
    return (x - ((x >> 31) << 32)).int()


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on int32 tensors holding the 32 bits: products wrap mod 2^32 (two's complement, on CPU and CUDA)
    and the logical right shifts are arithmetic shifts masked to the bits a 32-bit shift keeps."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x735A2D97
    return x ^ ((x >> 16) & 0xFFFF)


# Salt of the exit thresholds' stream: any constant that differs from the token noise's step salt.
_EXIT_SALT = 0x5BD1E995


def exit_uniforms(keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """(B,) float32 in (0, 1): each request's exit threshold at decode step `step` (one for all rows, or (B,)
    per-row steps), a pure function of (key, step) like `gumbel_noise`, salted apart from it so the depth and
    the token draws are independent."""
    steps = torch.as_tensor(step, dtype=torch.long, device=keys.device)
    h = _mix32(keys.long() ^ _EXIT_SALT)
    h = _mix32(h + _mix32(steps * 0x9E3779B1 + 0x2545F491))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def sample_tokens(logprobs: torch.Tensor, keys: torch.Tensor, step: int | torch.Tensor, greedy: bool) -> torch.Tensor:
    """(B, V) processed log-probs -> (B,) sampled ids. Gumbel-max draws exactly from softmax(logprobs)."""
    if greedy:
        return logprobs.argmax(-1)
    noise = gumbel_noise(keys.to(logprobs.device), step, logprobs.shape[-1])
    return noise.add_(logprobs).max(-1).indices  # max's first index, as argmax's: 1.7x faster on CPU


__all__ = [
    "DepthConfig",
    "FinishReason",
    "ModelLimits",
    "Prompt",
    "RolloutEngine",
    "RolloutRecord",
    "SamplingConfig",
    "check_prompt_ids",
    "encode_prompts",
    "exit_uniforms",
    "gumbel_noise",
    "mean_loops_per_token",
    "ran_exit_steps",
    "prepare_request",
    "processed_logprobs",
    "request_keys",
    "sample_tokens",
]
