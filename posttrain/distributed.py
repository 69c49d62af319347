"""What running as several training processes needs: one rollout engine for all of them (`SharedEngine`), the
full weights of a sharded model (`full_state_dict`), and a check that the launch and the training agree on the
number of processes (`check_launch`).

Under `torchrun` or `accelerate launch` with N processes, TRL calls `rollout_func` in every process with that
process's part of the global batch. One engine serves them all (for the Ray pool: one pool per job, not one per
process): the main process owns it, and `SharedEngine.generate`

1. gathers every process's prompts to the main process, in rank order (TRL's sampler deals a global batch to
   the processes in that order, so this is the 1-process batch);
2. generates them there as one request: the sampling noise is keyed by global request index, so the
   completions are those a 1-process run of the same global batch gets;
3. hands each process back its own records.

Weights reach the engine from the main process only, once per optimizer step (`load_weights`). With one
process it is the engine itself, with no communication. Collectives are torch.distributed's object
collectives, which work on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from configs import UserError
from rollout.engine import DepthConfig, Prompt, RolloutEngine, RolloutRecord, SamplingConfig


class SharedEngine(RolloutEngine):
    """`engine` in the main process (rank 0), None in the others; every process calls `generate` and
    `load_weights` the same number of times (they are collective)."""

    def __init__(self, engine: RolloutEngine | None, rank: int = 0, world_size: int = 1):
        if (engine is None) != (rank != 0):
            raise ValueError(f"the main process (rank 0) owns the engine, the others none; rank {rank} got {engine}")
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError(f"{world_size} training processes but no torch.distributed process group")
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.policy_version = engine.policy_version if engine is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, depth: DepthConfig | None = None
    ) -> list[RolloutRecord]:
        if self.world_size == 1:
            return self.engine.generate(prompts, sampling, depth)
        per_process: list[list[Prompt]] | None = [[] for _ in range(self.world_size)] if self.is_main else None
        dist.gather_object(list(prompts), per_process, dst=0)
        parts: list[list[RolloutRecord]] | None = None
        if self.is_main:
            everyone = [p for part in per_process for p in part]
            records = self.engine.generate(everyone, sampling, depth) if everyone else []
            parts, start = [], 0
            for part in per_process:  # each process's prompts, each with its sampling.n completions
                end = start + len(part) * sampling.n
                parts.append(records[start:end])
                start = end
        mine: list[list[RolloutRecord] | None] = [None]
        dist.scatter_object_list(mine, parts, src=0)
        return mine[0]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | None, version: int) -> None:
        """The main process loads `state_dict` into the engine (the others pass None: their weights are the same
        replica, or shards already gathered to the main process); every process records the version."""
        if self.is_main:
            if state_dict is None:
                raise ValueError("the main process must pass the policy's state dict")
            self.engine.load_weights(state_dict, version)
        self.policy_version = version

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded (FSDP, FSDP2) or replicated model's full weights, on the CPU of rank 0 (empty on the others).
    Collective: every process calls it. torch's own gathering, which accelerate's `get_state_dict` also uses."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach() for k, v in get_model_state_dict(model, options=options).items()}


def check_launch(world_size: int, use_cpu: bool) -> None:
    """A launcher that started several processes which the training arguments see as one would run the whole
    recipe once per process (each its own pool, its own outputs): on a machine without CUDA that is the case
    unless training.use_cpu is set."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size == 1:
        hint = "" if use_cpu or torch.cuda.is_available() else ": on CPU set training.use_cpu=true"
        raise UserError(f"{launched} processes were launched but training sees one (no process group){hint}")


__all__ = ["SharedEngine", "check_launch", "full_state_dict"]
