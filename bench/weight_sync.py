"""Weight sync to the rollout actors: bytes and seconds per sync, one object-store copy vs a copy per actor.

    python run.py bench "benchmarks=[weight_sync]"                       # 10M (fp32) and Ouro-1.4B's size (bf16)
    python run.py bench "benchmarks=[weight_sync]" weight_sync.sizes=[10m] weight_sync.actors=4

What a sync is: the trainer's state dict packed as NumPy arrays (`rollout.pool.pack_state_dict`), sent to every
actor, and copied into the actor's own weights (`unpack_state_dict` + `copy_`, what `load_state_dict` does).
- object store (the pool's way): `ray.put` once; every actor reads that one object (zero-copy on its node).
- per actor (the baseline): the packed dict passed to each actor's call, which Ray serialises once per call.
The receiving actors hold the weights only (no engine), so Ouro-1.4B's size fits this machine twice over; the
weights are random (uninitialised memory: the bytes, not their values, are what moves).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import torch

from bench.ouro_cpu import OURO_1_4B
from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.tiny import TINY_SIZES
from rollout.pool import pack_state_dict, unpack_state_dict

SIZES: dict[str, tuple[dict[str, Any], torch.dtype]] = {
    "10m": ({"total_ut_steps": 4, **TINY_SIZES["10m"]}, torch.float32),
    "ouro_1.4b": (OURO_1_4B, torch.bfloat16),
}


@dataclass
class WeightSyncBenchConfig:
    sizes: list[str] = field(default_factory=lambda: ["10m", "ouro_1.4b"])
    actors: int = 2
    repeats: int = 5  # syncs timed per way, interleaved, after one untimed each (the median is reported)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sizes) - set(SIZES))
        if unknown:
            raise ValueError(f"weight_sync.sizes: unknown {unknown}; known: {sorted(SIZES)}")
        if self.actors < 1 or self.repeats < 1:
            raise ValueError("weight_sync.actors and weight_sync.repeats must be >= 1")


class WeightsHolder:
    """An actor holding a model's weights, as a rollout actor's engine does (without the engine)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], str]]):
        torch.set_num_threads(1)
        self.weights = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in shapes.items()}

    def load(self, packed: dict) -> float:
        start = time.perf_counter()
        for name, tensor in unpack_state_dict(packed).items():
            self.weights[name].copy_(tensor)
        return time.perf_counter() - start


def random_state_dict(size: str) -> dict[str, torch.Tensor]:
    """The LoopLM's parameter names and shapes at `size`, in its dtype, with uninitialised values."""
    fields, dtype = SIZES[size]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LoopLMForCausalLM(LoopLMConfig(**fields)).state_dict().items()}
    return {k: torch.empty(shape, dtype=dtype) for k, shape in shapes.items()}


def run_weight_sync_bench(config: WeightSyncBenchConfig) -> dict[str, Any]:
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address="local", num_cpus=config.actors, include_dashboard=False, log_to_driver=False)
    try:
        results = {"config": asdict(config), "sizes": {size: _measure(size, config) for size in config.sizes}}
    finally:
        if owns_ray:
            ray.shutdown()
    print_markdown(results)
    return results


def _measure(size: str, config: WeightSyncBenchConfig) -> dict[str, Any]:
    state = random_state_dict(size)
    shapes = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    holders = [ray.remote(WeightsHolder).options(num_cpus=1).remote(shapes) for _ in range(config.actors)]
    try:
        ray.get([h.load.remote({}) for h in holders])  # started, weights allocated
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {
            "parameters": sum(v.numel() for v in state.values()), "dtype": str(next(iter(state.values())).dtype),
            "bytes_per_sync": nbytes, "actors": config.actors,
        } | _interleaved({"object_store": lambda: _sync_once(state, holders),
                          "per_actor": lambda: _sync_per_actor(state, holders)}, config.repeats, nbytes, config.actors)
    finally:
        for h in holders:
            ray.kill(h)


def _sync_once(state: dict[str, torch.Tensor], holders: list) -> dict[str, float]:
    start = time.perf_counter()
    ref = ray.put(pack_state_dict(state))
    put = time.perf_counter() - start
    copy = max(ray.get([h.load.remote(ref) for h in holders]))
    return {"put_s": put, "actor_copy_s": copy, "total_s": time.perf_counter() - start}


def _sync_per_actor(state: dict[str, torch.Tensor], holders: list) -> dict[str, float]:
    start = time.perf_counter()
    packed = pack_state_dict(state)
    copy = max(ray.get([h.load.remote(packed) for h in holders]))  # serialised into the store once per call
    return {"put_s": None, "actor_copy_s": copy, "total_s": time.perf_counter() - start}  # put inside the calls


def _interleaved(ways: dict[str, Any], repeats: int, nbytes: int, actors: int) -> dict[str, dict[str, float]]:
    """Each way once untimed (the object store's first touch of its memory costs seconds at 2.9 GB and would fall
    on whichever way runs first), then the ways in turn, `repeats` times: the median of each."""
    for sync in ways.values():
        sync()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, sync in ways.items():
            runs[name].append(sync())
    puts = {"object_store": nbytes, "per_actor": nbytes * actors}
    return {
        name: {key: _median([r[key] for r in rs]) for key in rs[0]} | {"bytes_put": puts[name]}
        for name, rs in runs.items()
    }


def _median(values: list[float | None]) -> float | None:
    return None if values[0] is None else sorted(values)[len(values) // 2]


def print_markdown(results: dict[str, Any]) -> None:
    actors = results["config"]["actors"]
    print(f"\n| size | dtype | MB per sync | way | bytes put | put s | slowest actor's copy s | sync s ({actors} actors) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for size, r in results["sizes"].items():
        for way in ("object_store", "per_actor"):
            w = r[way]
            put = "-" if w["put_s"] is None else f"{w['put_s']:.3f}"
            print(f"| {size} ({r['parameters'] / 1e6:.1f}M) | {r['dtype']} | {r['bytes_per_sync'] / 1e6:.0f} | {way} | "
                  f"{w['bytes_put'] / 1e6:.0f} MB | {put} | {w['actor_copy_s']:.3f} | {w['total_s']:.3f} |")
    for size, r in results["sizes"].items():
        print(f"{size}: per-actor copies / object store, sync time: "
              f"{r['per_actor']['total_s'] / r['object_store']['total_s']:.2f}x")


__all__ = ["WeightSyncBenchConfig", "run_weight_sync_bench"]
