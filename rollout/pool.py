"""The Ray actor pool: N rollout actors, each a `TorchEngine`, behind the same `generate` interface.

* Ray: `ray_address` ("auto", "host:port") joins a running (multi-node) cluster; without it (and without
  `RAY_ADDRESS`) the pool starts a private local Ray, even when a cluster already runs on this machine (a running
  one is named in the log, with the setting that joins it). The log says which it did.
* Each actor holds `threads_per_actor` CPUs and `gpus_per_actor` GPUs (a fraction shares a GPU, e.g. with a
  trainer process); with `placement` pack or spread they sit in one Ray placement group (a bundle per actor),
  packed onto few nodes or spread over many. Inside, the engine runs on the GPU Ray assigned (CUDA visible),
  else on CPU, in the policy's dtype; the pool logs each actor's node and device once.
* Weights go out once per policy version: `ray.put` once (as NumPy arrays, which actors on a node read
  zero-copy from the object store), every actor loads the same object; records carry that version.
* Prompts are split into contiguous chunks, queued; each actor is handed the next chunk as it frees up, so a
  fast actor (short completions, a quieter CPU) takes more chunks than a slow one. Results are concatenated
  in prompt order.
* An actor that dies (or hangs) mid-chunk is replaced (with the current weights) and its chunk queued again.
  A chunk is all-or-nothing, and its noise is keyed by global request index with the call's seed, so the
  regenerated chunk is the one that would have come back, whichever actor runs it: every requested completion
  is returned exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from looplm import LoopLMConfig, LoopLMForCausalLM

from .engine import (
    DepthConfig,
    ModelLimits,
    Prompt,
    RolloutEngine,
    RolloutRecord,
    SamplingConfig,
    prepare_request,
)
from .torch_engine import TorchEngine

logger = logging.getLogger(__name__)


@dataclass
class PoolConfig:
    num_actors: int = 2
    threads_per_actor: int = 1  # torch CPU threads (and Ray CPUs reserved) per actor
    ray_address: str | None = None  # None: a private local Ray (or RAY_ADDRESS); "auto" / "host:port": join a cluster
    num_cpus: int | None = None  # CPUs of a private local Ray (None: all); ignored when joining
    # GPUs Ray reserves for each actor: 1 for a GPU of its own, a fraction (0.5) to share one, e.g. with a trainer
    # process. The engine runs on the GPU Ray assigns; with 0 it runs on CPU threads.
    gpus_per_actor: float = 0.0
    # none: each actor placed on its own by Ray; pack / spread: one placement group, a bundle per actor (CPUs and
    # GPUs above), on as few nodes as fit (pack) or over as many nodes as possible (spread). Soft: a bundle whose
    # node is lost is placed again wherever it fits.
    placement: Literal["none", "pack", "spread"] = "none"
    placement_timeout_s: float = 120.0  # how long to wait for the cluster to place the actors before failing
    max_batch_size: int = 32  # rows decoded together inside one actor
    # Each actor decodes fixed-depth steps through torch.compile (looplm.decode.compile_decode): 1.4x at batch 1 on
    # CPU after a compile of tens of seconds per actor (a C++ compiler is needed). Worth it for long runs.
    compile_decode: bool = False
    max_replacements: int = 3  # dead or hung actors replaced within one generate call before giving up
    # A shard that has not come back after this many seconds means a hung actor (alive, not answering): it is
    # killed, replaced, and the shard redone. None: wait forever.
    actor_timeout_s: float | None = 600.0
    # Prompts per chunk handed to an actor. None: about 4 chunks per actor (load balance), but at least enough
    # prompts to fill one actor's batch (max_batch_size rows) so continuous batching keeps its rows busy.
    chunk_prompts: int | None = None

    def check(self) -> None:
        for name in ("num_actors", "threads_per_actor", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pool.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_replacements < 0:
            raise ValueError(f"pool.max_replacements must be >= 0, got {self.max_replacements}")
        if self.chunk_prompts is not None and self.chunk_prompts < 1:
            raise ValueError(f"pool.chunk_prompts must be >= 1 or null, got {self.chunk_prompts}")
        if self.actor_timeout_s is not None and self.actor_timeout_s <= 0:
            raise ValueError(f"pool.actor_timeout_s must be > 0 or null, got {self.actor_timeout_s}")
        if self.gpus_per_actor < 0 or (self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor)):
            raise ValueError(
                f"pool.gpus_per_actor must be a fraction in [0, 1] or a whole number, got {self.gpus_per_actor}"
            )
        if self.placement not in ("none", "pack", "spread"):
            raise ValueError(f"pool.placement must be none, pack or spread, got {self.placement!r}")

    def bundle(self) -> dict[str, float]:
        """The Ray resources one actor holds."""
        return {"CPU": float(self.threads_per_actor)} | ({"GPU": self.gpus_per_actor} if self.gpus_per_actor else {})


# ----------------------------------------------------------------------------------------------------------
# Weights as NumPy: Ray stores arrays out of band and actors map them without a copy; torch tensors would be
# pickled whole into every actor. bfloat16 has no NumPy dtype, so it travels as int16 bits.


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    packed = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        packed[name] = ((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), dtype)
    return packed


def unpack_state_dict(packed: Mapping[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    out = {}
    with warnings.catch_warnings():  # object-store arrays are read-only; load_state_dict copies them anyway
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (array, dtype) in packed.items():
            t = torch.from_numpy(array)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


class RolloutWorker:
    """One actor: a TorchEngine on `threads` CPU threads, or on the GPU Ray assigned it, built from a model folder
    or a shipped config."""

    def __init__(self, model: str | dict, tokenizer: Any, max_batch_size: int, threads: int, version: int,
                 compile_decode: bool = False):
        torch.set_num_threads(threads)
        self.device = actor_device()
        if isinstance(model, str):
            net = LoopLMForCausalLM.from_pretrained(model, dtype=torch.float32)
        else:
            model = dict(model)
            dtype = getattr(torch, model.pop("weights_dtype", "float32"))  # a bf16 policy decodes in bf16
            net = LoopLMForCausalLM(LoopLMConfig.from_dict(model)).to(dtype)  # weights follow via load_weights
        self.engine = TorchEngine(net.to(self.device), tokenizer=tokenizer, max_batch_size=max_batch_size,
                                  policy_version=version, compile_decode=compile_decode)

    def load_weights(self, packed: dict, version: int) -> int:
        self.engine.load_weights(unpack_state_dict(packed), version)
        return version

    def generate_shard(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, depth: DepthConfig, first_prompt: int
    ) -> list[RolloutRecord]:
        return self.engine.generate_ids(prompt_ids, sampling, depth, first_prompt)

    def ping(self) -> int:
        """The actor's process id (operators and tests signal a stuck or misbehaving actor by it)."""
        return os.getpid()

    def identity(self) -> ActorIdentity:
        """Where the actor runs: the pool SIGKILLs a hung actor itself only when it runs on the driver's node."""
        context = ray.get_runtime_context()
        return ActorIdentity(context.get_node_id(), os.getpid(), str(self.device), [str(g) for g in ray.get_gpu_ids()])


@dataclass(frozen=True)
class ActorIdentity:
    node_id: str
    pid: int
    device: str  # where its engine runs: "cpu", "cuda:0", ...
    gpu_ids: list[str]  # the GPUs Ray assigned it (declared ones too, on a machine without CUDA)


def actor_device() -> torch.device:
    """The GPU Ray assigned this actor when CUDA can see it (Ray sets CUDA_VISIBLE_DEVICES), else the CPU: a GPU
    declared to Ray on a machine without CUDA (a test cluster) leaves the engine on CPU threads."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class RolloutPool(RolloutEngine):
    """`generate` over N Ray actors; drop-in for a `TorchEngine` (same arguments, same records, same order).

    model: a model folder (each actor loads it) or an in-memory LoopLM (its config and weights are shipped).
    """

    def __init__(
        self,
        model: str | Path | LoopLMForCausalLM,
        config: PoolConfig | None = None,
        tokenizer: Any = None,
        depth: DepthConfig | None = None,
        policy_version: int = 0,
    ):
        self.config = config or PoolConfig()
        self.config.check()
        self.depth = depth or DepthConfig()
        self.depth.check()
        self.tokenizer = tokenizer
        self._owns_ray = connect_ray(self.config)
        self._placement: PlacementGroup | None = None
        self.actors: list = []
        try:
            self._start(model, policy_version)
        except BaseException:
            self.close()  # a pool that failed to start leaves no actors, placement group or Ray behind
            raise

    def _start(self, model: str | Path | LoopLMForCausalLM, policy_version: int) -> None:
        self._placement = self._place_bundles()
        self._remote = ray.remote(RolloutWorker)
        self._weights: ray.ObjectRef | None = None
        if isinstance(model, LoopLMForCausalLM):
            self.limits = ModelLimits.from_config(model.config)
            self._source: str | dict = model.config.to_dict() | {"weights_dtype": str(model.dtype).removeprefix("torch.")}
            self._weights = ray.put(pack_state_dict(model.state_dict()))
        else:
            self._source = str(model)
            self.limits = ModelLimits.from_config(LoopLMConfig.from_pretrained(self._source))
        self.policy_version = policy_version
        self.actors = [self._new_actor(i) for i in range(self.config.num_actors)]
        ray.get([a.ping.remote() for a in self.actors])  # fail here, not in the first generate
        # Asked of every actor as it starts, so that a hung one can be killed even though it answers nothing, and a
        # replacement gets work only once it answers (its start-up is not counted against a chunk's timeout).
        self._identities = [a.identity.remote() for a in self.actors]
        self.replacements = 0  # actors replaced over the pool's life
        self._log_placement()

    def _place_bundles(self) -> PlacementGroup | None:
        """A placement group of one bundle per actor (placement pack / spread), ready before any actor starts."""
        cfg = self.config
        if cfg.placement == "none":
            return None
        group = placement_group([cfg.bundle()] * cfg.num_actors, strategy=cfg.placement.upper())
        try:
            ray.get(group.ready(), timeout=cfg.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise PlacementError(
                f"rollout.pool: the Ray cluster could not place {cfg.num_actors} actors of {cfg.bundle()} "
                f"(placement {cfg.placement}) in {cfg.placement_timeout_s:g} s; it has {ray.cluster_resources()}"
            ) from None
        return group

    def _resources(self, index: int) -> dict[str, Any]:
        """Ray options of actor `index`: its CPUs and GPUs, in its bundle of the placement group if there is one."""
        options: dict[str, Any] = {
            "num_cpus": self.config.threads_per_actor, "num_gpus": self.config.gpus_per_actor, "max_restarts": 0,
        }
        if self._placement is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._placement, placement_group_bundle_index=index
            )
        return options

    def _log_placement(self) -> None:
        where = ray.get(self._identities)
        nodes = sorted({w.node_id for w in where})
        devices = ", ".join(f"{w.device}" + (f" (GPU {','.join(w.gpu_ids)})" if w.gpu_ids else "") for w in where)
        logger.info(
            "rollout pool: %d actors on %d node(s), placement %s; engines on %s", len(where), len(nodes),
            self.config.placement, devices,
        )

    def placement(self) -> list[ActorIdentity]:
        """Where each actor runs now (node, pid, device, GPUs), in actor order."""
        return ray.get([a.identity.remote() for a in self.actors])

    def _new_actor(self, index: int):
        cfg = self.config
        actor = self._remote.options(**self._resources(index)).remote(
            self._source, self.tokenizer, cfg.max_batch_size, cfg.threads_per_actor, self.policy_version,
            cfg.compile_decode,
        )
        if self._weights is not None:
            actor.load_weights.remote(self._weights, self.policy_version)  # ordered before any later call
        return actor

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Put the weights once; every actor loads that one object. A replacement actor loads it too."""
        self._weights = ray.put(pack_state_dict(state_dict))
        self.policy_version = version
        loads = [a.load_weights.remote(self._weights, version) for a in self.actors]
        for i, load in enumerate(loads):
            try:
                ray.get(load)
            except RayActorError:
                self._replace(i)  # the replacement loads these weights before anything else

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, depth: DepthConfig | None = None
    ) -> list[RolloutRecord]:
        prompt_ids, sampling, depth = prepare_request(
            prompts, sampling, depth or self.depth, self.limits, self.tokenizer
        )
        chunks = _chunks(len(prompt_ids), self._chunk_prompts(len(prompt_ids), sampling.n))
        queue = deque(range(len(chunks)))
        pending: dict[ray.ObjectRef, tuple[int, int, float]] = {}  # -> (actor, chunk, started)
        # An actor gets work once it answers, so that a replacement's start-up (seconds; longer while its lost node's
        # bundle waits for room) is not counted against a chunk's timeout: identity ref of each starting actor -> index.
        answered, _ = ray.wait(self._identities, num_returns=len(self._identities), timeout=0)
        starting = {ref: i for i, ref in enumerate(self._identities) if ref not in answered}
        idle = deque(i for i in range(len(self.actors)) if self._identities[i] in answered)
        results: dict[int, list[RolloutRecord]] = {}
        replaced = 0
        while queue or pending:
            while queue and idle:  # hand out work as actors free up
                actor, chunk = idle.popleft(), queue.popleft()
                pending[self._submit(actor, chunks[chunk], prompt_ids, sampling, depth)] = (actor, chunk, time.monotonic())
            ready, _ = ray.wait(list(pending) + list(starting), num_returns=1, timeout=self._wait_s(pending))
            failed: list[tuple[int, int, str]] = []
            if ready and ready[0] in starting:
                idle.append(starting.pop(ready[0]))
            elif ready:
                actor, chunk, _ = pending.pop(ready[0])
                try:
                    results[chunk] = ray.get(ready[0])
                    idle.append(actor)
                except RayActorError as err:
                    failed.append((actor, chunk, f"died: {err}"))
            else:  # nothing came back in time: every chunk past its deadline belongs to a hung actor
                for ref, (actor, chunk, started) in list(pending.items()):
                    if time.monotonic() - started >= self.config.actor_timeout_s:
                        del pending[ref]
                        failed.append((actor, chunk, f"no answer in {self.config.actor_timeout_s:g} s"))
            for actor, chunk, why in failed:
                replaced += 1
                if replaced > self.config.max_replacements:
                    raise RuntimeError(
                        f"rollout actors failed {replaced} times in one call (pool.max_replacements="
                        f"{self.config.max_replacements}); last: actor {actor} {why}"
                    )
                logger.warning("rollout actor %d %s: replacing it and redoing its chunk %d", actor, why, chunk)
                self._replace(actor)
                queue.appendleft(chunk)
                starting[self._identities[actor]] = actor
        records = [r for i in range(len(chunks)) for r in results[i]]
        expected = len(prompt_ids) * sampling.n
        if len(records) != expected:  # a chunk is all-or-nothing; this would be a bug, never a silent loss
            raise RuntimeError(f"pool returned {len(records)} completions, expected {expected}")
        return records

    def _chunk_prompts(self, prompts: int, n: int) -> int:
        if self.config.chunk_prompts is not None:
            return self.config.chunk_prompts
        fill_batch = -(-self.config.max_batch_size // n)
        return max(fill_batch, -(-prompts // (4 * len(self.actors))))

    def _submit(self, i: int, chunk: tuple[int, int], prompt_ids, sampling, depth):
        start, end = chunk
        return self.actors[i].generate_shard.remote(prompt_ids[start:end], sampling, depth, start)

    def _wait_s(self, pending: dict) -> float | None:
        """Seconds until the oldest pending chunk reaches the actor timeout (None: no timeout, or no chunk out)."""
        if self.config.actor_timeout_s is None or not pending:
            return None
        oldest = min(started for *_, started in pending.values())
        return max(self.config.actor_timeout_s - (time.monotonic() - oldest), 0.0)

    def _replace(self, i: int) -> None:
        """Kill actor i for sure (a stopped or hung process answers no kill request, so SIGKILL its pid when it is
        on this node), then start a replacement that loads the current weights before anything else."""
        pid = self._local_pid(i)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):  # already gone is fine
            ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new_actor(i)
        self._identities[i] = self.actors[i].identity.remote()
        self.replacements += 1

    def _local_pid(self, i: int) -> int | None:
        """Actor i's pid if it reported one and runs on this node (never signal a pid from another machine)."""
        ready, _ = ray.wait([self._identities[i]], timeout=0)
        if not ready:
            return None
        try:
            where: ActorIdentity = ray.get(ready[0])
        except Exception:  # noqa: BLE001 - the actor died before answering: nothing to kill
            return None
        return where.pid if where.node_id == ray.get_runtime_context().get_node_id() else None

    def close(self) -> None:
        """Kill the actors, free their placement group (and stop Ray if this pool started it)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._placement is not None:
            remove_placement_group(self._placement)
            self._placement = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlacementError(RuntimeError):
    """The cluster cannot hold the pool's actors as configured (too few CPUs or GPUs, or nodes)."""


def connect_ray(config: PoolConfig) -> bool:
    """Join the cluster `ray_address` (or RAY_ADDRESS) names, or start a private local Ray; log which.
    -> whether this call started Ray (and so the pool stops it). A Ray already initialised in this process is
    used as it is."""
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False)
        logger.info("rollout pool: joined the Ray cluster at %s (%s)", address, _resources_text())
        return True
    running = _running_cluster()
    # "local" starts a new instance even where `ray start` left one running (a bare ray.init() would join it).
    context = ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False)
    running = running if running != context.address_info.get("gcs_address") else None
    hint = f"; a Ray cluster also runs on this machine ({running}): rollout.pool.ray_address=auto joins it" if running else ""
    logger.info("rollout pool: started a private local Ray (%s)%s", _resources_text(), hint)
    return True


def _resources_text() -> str:
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _running_cluster() -> str | None:
    """The address of a cluster `ray start` left on this machine (Ray's own record of it), if any."""
    from ray._private.utils import read_ray_address  # noqa: PLC0415 - private, and only for this log line

    with contextlib.suppress(Exception):
        return read_ray_address()
    return None


def _chunks(count: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `size` (the last may be shorter); no empty chunk."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


__all__ = [
    "ActorIdentity", "PlacementError", "PoolConfig", "RolloutPool", "RolloutWorker", "connect_ray", "pack_state_dict",
    "unpack_state_dict",
]
