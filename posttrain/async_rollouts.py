"""Asynchronous rollouts: the engine generates the next batches while the trainer updates on the current one.

With `rollout.max_staleness = k > 0` the trainer starts the rollouts of the next k batches as soon as it knows
them (it peeks at its data loader), with the weights of the current step. A batch is then used up to k
optimizer steps after the weights that generated it: each record keeps its `policy_version`, its log-probs are
the behaviour policy's, and the importance-sampling correction (p_current / p_behaviour, clipped as TRL's
`vllm_importance_sampling_*` options say) makes the update unbiased. k = 0 is the synchronous loop.

All engine calls go through one worker thread, in submission order, so the engine (the Ray pool) is never
used by two threads at once; weights are snapshot when a batch is submitted, since the optimizer changes the
live tensors in place while the batch is generated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rollout.engine import DepthConfig, Prompt, RolloutEngine, RolloutRecord, SamplingConfig


class Lookahead:
    """An iterator that can be peeked at: `next` serves peeked items first, in order."""

    def __init__(self, source: Iterator):
        self.source = source
        self.peeked: deque = deque()

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        return self.peeked.popleft() if self.peeked else next(self.source)

    def peek(self, count: int) -> list:
        """Up to `count` next items, without taking them (fewer at the end of the source)."""
        while len(self.peeked) < count:
            try:
                self.peeked.append(next(self.source))
            except StopIteration:
                break
        return list(self.peeked)[:count]


class RolloutQueue:
    """Rollout requests run in order on one worker thread; `take` returns the oldest one's records."""

    def __init__(self, engine: RolloutEngine, depth: DepthConfig):
        self.engine, self.depth = engine, depth
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self._pending: deque[tuple[list[Prompt], Future]] = deque()
        self._version: int | None = None  # the weights version last sent to the engine

    def __len__(self) -> int:
        return len(self._pending)

    def submit(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, version: int,
        weights: Callable[[], Mapping[str, torch.Tensor] | None],
    ) -> None:
        """Start generating `prompts` with the weights of `version` (`weights()` is read only when the version is
        new); `take` returns the records, oldest request first."""
        self._pending.append((list(prompts), self._start(prompts, sampling, version, weights)))

    def run_now(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, version: int,
        weights: Callable[[], Mapping[str, torch.Tensor] | None],
    ) -> list[RolloutRecord]:
        """Generate `prompts` after the requests already queued, and wait for them (an evaluation, a refill)."""
        return self._start(prompts, sampling, version, weights).result()

    def _start(self, prompts, sampling, version, weights) -> Future:
        snapshot = None
        if version != self._version:
            state = weights()
            snapshot = None if state is None else {k: v.detach().clone() for k, v in state.items()}
            self._version = version
        return self._worker.submit(self._run, list(prompts), sampling, version, snapshot)

    def _run(self, prompts: list[Prompt], sampling: SamplingConfig, version: int, snapshot) -> list[RolloutRecord]:
        if snapshot is not None:
            self.engine.load_weights(snapshot, version)
        return self.engine.generate(prompts, sampling, self.depth)

    def take(self, prompts: Sequence[Prompt]) -> list[RolloutRecord]:
        """The records of the oldest request, which must be for `prompts` (waits for it)."""
        if not self._pending:
            raise RuntimeError("no rollout was started for this batch")
        expected, job = self._pending.popleft()
        if expected != list(prompts):
            raise RuntimeError("the batch differs from the one whose rollouts were started ahead (a bug)")
        return job.result()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


__all__ = ["Lookahead", "RolloutQueue"]
