"""The loop-aware KV cache: one K/V plane per (loop, layer), or one per layer when loops share it.

Written by hand because no library has it: transformers' caches know one plane per layer, vLLM's Ouro keeps
(loop, layer) planes but never exits early.

Modes (`LoopKVCache(config, mode=...)`):
    full      T x L planes: what the parallel training forward computes, so decoding is exact (the default,
              and the only mode a training forward can replay). A token that exits at loop e writes its
              loop-e K/V into the planes of loops e+1..T ("last exited"); the model does that selection.
    last      L planes holding each token's K/V of its last loop (4x less memory at T = 4).
    average   L planes holding the mean of each token's K/V over the T loops.
    first     L planes holding each token's loop-1 K/V.
In the shared modes a forward pass still attends, at loop t, to its own new tokens' loop-t K/V (so a prompt's
prefill is exact); only what is kept for later tokens is shared. Those modes are inference options whose
accuracy and rollout/training gap are measured, never hidden (see architecture.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_looplm import LoopLMConfig

KVMode = Literal["full", "last", "average", "first"]
KV_MODES: tuple[str, ...] = ("full", "last", "average", "first")


def keep_shared_kv(
    pending: dict[int, list[torch.Tensor]], index: int, key: torch.Tensor, value: torch.Tensor, loop: int,
    mode: str, num_loops: int,
) -> None:
    """The "first" and "average" modes' reduction over loops, kept in `pending[index]` until the step commits:
    loop 1's K/V, or the running mean over the `num_loops` loops. Other modes keep nothing here."""
    if mode == "first" and loop == 0:
        pending[index] = [key, value]
    elif mode == "average":
        if loop == 0:
            pending[index] = [key / num_loops, value / num_loops]
        else:
            acc = pending[index]
            acc[0], acc[1] = acc[0] + key / num_loops, acc[1] + value / num_loops


def plane_index(loop: int, layer: int, num_layers: int) -> int:
    """The plane of (loop, layer), both 0-based, in a "full" cache: loops outer, layers inner."""
    return loop * num_layers + layer


# "Last exited": a token that exits at loop e keeps its loop-e K/V at every deeper loop t > e (architecture.md). The
# forward keeps every token and selects; the decode step runs only the rows still running and scatters them back.
def keep_exited(new: torch.Tensor, last: torch.Tensor | None, active: torch.Tensor | None) -> torch.Tensor:
    """The forward's (B, Hkv, S, d) K or V at a loop: tokens not `active` ((B, S) bool; None: all) keep `last`."""
    return new if active is None else torch.where(active[:, None, :, None], new, last)


def keep_exited_rows(new: torch.Tensor, last: torch.Tensor | None, running: torch.Tensor | None) -> torch.Tensor:
    """The decode step's (b_run, Hkv, d) K or V of the `running` rows (indices into b; None: all), scattered
    into (b, Hkv, d) `last` so that the other rows keep the K/V of their exit loop."""
    return new if running is None else last.index_copy(0, running, new)


class GrowingKVLayer(CacheLayerMixin):
    """One K/V plane, (B, H, S, D), in a buffer that doubles when full.

    Appending writes in place and returns views, instead of `torch.cat`-ing the whole history at every step
    as transformers' DynamicLayer does: with T x L planes that copy dominates CPU decoding.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, initial_capacity: int = 128):
        super().__init__()
        self.initial_capacity = initial_capacity
        self.length = 0
        self._k: torch.Tensor | None = None  # (B, H, capacity, D)
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, s, d = key_states.shape
        capacity = max(self.initial_capacity, s)
        self._k = key_states.new_empty(b, h, capacity, d)
        self._v = value_states.new_empty(b, h, capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(max(end, 2 * self._k.shape[-2]))
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        if value is not None:
            raise AttributeError("GrowingKVLayer.keys is a view of its buffer; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("GrowingKVLayer.values is a view of its buffer; use update()")

    def _grow(self, capacity: int) -> None:
        k, v = self._k, self._v
        self._k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        self._v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        self._k[:, :, : self.length] = k[:, :, : self.length]
        self._v[:, :, : self.length] = v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of K/V actually held (the filled part of the buffer)."""
        if self._k is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only these batch rows (the rollout engine drops finished sequences this way)."""
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device) if self._k is not None else beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (a negative value removes that many), as transformers does."""
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max(0, max_length))

    def reset(self) -> None:
        self.length = 0

    def offload(self) -> None:
        raise NotImplementedError("GrowingKVLayer does not offload")

    def prefetch(self) -> None:
        raise NotImplementedError("GrowingKVLayer does not offload")


class LoopKVCache(Cache):
    """K/V of every (loop, layer), for incremental decoding of a LoopLM (see the module docstring).

    The model calls `update_loop(k, v, loop, layer)` once per (loop, layer) of a forward, for every loop up to
    its `num_loops` (loops skipped because every token exited are filled with the exited K/V), then `commit()`.
    """

    def __init__(self, config: LoopLMConfig, mode: KVMode = "full", initial_capacity: int = 128):
        if mode not in KV_MODES:
            raise ValueError(f"unknown KV cache mode {mode!r}; expected one of {KV_MODES}")
        self.mode = mode
        self.num_layers = config.num_hidden_layers
        self.num_loops: int | None = None  # fixed by the first forward
        self.initial_capacity = initial_capacity
        self._pending: dict[int, list[torch.Tensor]] = {}  # shared modes: layer -> [k, v] of the current step
        super().__init__(layers=[])

    def _plane(self, index: int) -> GrowingKVLayer:
        while len(self.layers) <= index:
            self.layers.append(GrowingKVLayer(self.initial_capacity))
        return self.layers[index]

    def start_forward(self, num_loops: int) -> None:
        if self.num_loops is None:
            self.num_loops = num_loops
        elif num_loops != self.num_loops:
            raise ValueError(
                f"this LoopKVCache holds K/V for {self.num_loops} loops; a forward with num_loops={num_loops} "
                "cannot reuse it (start a new cache)"
            )

    def update_loop(
        self, key: torch.Tensor, value: torch.Tensor, loop: int, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's (B, H, q, D) K/V for `loop` (0-based) and `layer`; return all K/V to attend to."""
        if self.mode == "full":
            return self._plane(plane_index(loop, layer, self.num_layers)).update(key, value)
        self._accumulate(key, value, loop, layer)
        plane = self._plane(layer)
        if plane.length == 0:
            return key, value
        return torch.cat([plane.keys, key], dim=-2), torch.cat([plane.values, value], dim=-2)

    def fill_exited(self, last_kv: list, start: int) -> None:
        """Every token exited before loop `start`: the deeper loops' planes get each token's exited K/V (per layer
        in `last_kv`), uncomputed."""
        for loop in range(start, self.num_loops):
            for layer, (k, v) in enumerate(last_kv):
                self.update_loop(k, v, loop, layer)

    def _accumulate(self, key: torch.Tensor, value: torch.Tensor, loop: int, layer: int) -> None:
        if self.mode == "last":
            self._pending[layer] = [key, value]
        else:
            keep_shared_kv(self._pending, layer, key, value, loop, self.mode, self.num_loops)

    def commit(self) -> None:
        """End of a forward: shared modes append the reduced K/V of the new tokens."""
        for layer, (key, value) in sorted(self._pending.items()):
            self._plane(layer).update(key, value)
        self._pending.clear()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if len(self.layers) > layer_idx else 0

    def nbytes(self) -> int:
        """Bytes of K/V held now, over all planes."""
        return sum(plane.nbytes() for plane in self.layers)

    @staticmethod
    def bytes_per_token(
        config: LoopLMConfig, mode: KVMode = "full", num_loops: int | None = None, dtype=torch.float32
    ) -> int:
        """K/V bytes one token costs in this mode: planes x 2 (K and V) x kv_heads x head_dim x element size."""
        planes = (num_loops or config.total_ut_steps) if mode == "full" else 1
        element = torch.empty((), dtype=dtype).element_size()
        return planes * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element


class SlotKVCache:
    """Static K/V of `slots` sequences decoded one token per step, each at its own length (continuous batching).

    Buffers are preallocated, (planes, slots, Hkv, capacity, d); slot s holds its positions 0..lengths[s]-1 with
    no padding, so a finished sequence's slot is refilled by copying a new prompt's prefill into it. Planes are
    as in `LoopKVCache` (T x L in "full" mode, indexed loop * L + layer; L in the shared modes). The decode step
    (`looplm.decode`) calls `store` for every (loop, layer) in order and `commit` once at the end.
    In the shared modes every loop writes the plane (a token attends to its own current-loop K/V, as in
    `LoopKVCache`) and `commit` leaves what that mode keeps: the last loop's, loop 1's or the mean over loops.
    """

    def __init__(
        self, config: LoopLMConfig, slots: int, num_loops: int, mode: KVMode = "full", capacity: int = 128,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ):
        if mode not in KV_MODES:
            raise ValueError(f"unknown KV cache mode {mode!r}; expected one of {KV_MODES}")
        self.mode, self.num_loops, self.num_layers = mode, num_loops, config.num_hidden_layers
        planes = num_loops * self.num_layers if mode == "full" else self.num_layers
        shape = (planes, slots, config.num_key_value_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,) positions held
        self._pending: dict[int, list[torch.Tensor]] = {}  # shared modes: plane -> [k, v] to keep at commit

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (doubling, so growth copies rarely)."""
        if length <= self.capacity:
            return
        old_k, old_v, held = self.k, self.v, self.capacity
        shape = (*old_k.shape[:3], max(length, 2 * held), old_k.shape[4])
        self.k, self.v = old_k.new_zeros(shape), old_v.new_zeros(shape)
        self.k[:, :, :, :held], self.v[:, :, :, :held] = old_k, old_v

    def load_prefill(self, slot: int, prefill: LoopKVCache, row: int, length: int) -> None:
        """Copy row `row` of a prefill cache (left-padded: its last `length` positions are the prompt) into `slot`."""
        if len(prefill.layers) != self.k.shape[0]:
            raise ValueError(f"prefill cache has {len(prefill.layers)} planes, this cache {self.k.shape[0]}")
        self.reserve(length)
        for p, plane in enumerate(prefill.layers):
            self.k[p, slot, :, :length] = plane.keys[row, :, -length:]
            self.v[p, slot, :, :length] = plane.values[row, :, -length:]
        self.lengths[slot] = length

    def select(self, slots: torch.Tensor) -> None:
        """Keep only these slots, renumbered 0..len(slots)-1 in this order (one copy of the cache)."""
        self.k, self.v, self.lengths = self.k[:, slots], self.v[:, slots], self.lengths[slots]

    def plane(self, loop: int, layer: int) -> int:
        return plane_index(loop, layer, self.num_layers) if self.mode == "full" else layer

    def write_index(self, slots: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        """(b * Hkv,) rows, in a plane seen as (slots * Hkv * capacity, d), of each slot's next position (its
        length, or `position`) per K/V head: where `store` writes. Valid until the capacity changes."""
        pos = self.lengths[slots] if position is None else position
        heads = torch.arange(self.k.shape[2], device=slots.device)
        return ((slots[:, None] * self.k.shape[2] + heads) * self.capacity + pos[:, None]).reshape(-1)

    def store(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> int:
        """Write (b, Hkv, d) K/V of the new token of each of b slots at `index` (`write_index` of those slots);
        -> the plane to attend to. One index_copy_ per tensor: indexing by (slot, :, position) costs 5-10x more."""
        p = self.plane(loop, layer)
        self._write(self.k[p], self.v[p], index, k, v)
        keep_shared_kv(self._pending, p, k, v, loop, self.mode, self.num_loops)  # "last": the plane holds it
        return p

    def store_exited(self, loop: int, last_kv: list, index: torch.Tensor) -> None:
        """Every row exited before `loop`: its planes get each row's exited K/V (per layer in `last_kv`), uncomputed."""
        for layer, kv in enumerate(last_kv):
            self.store(loop, layer, *kv, index)

    def store_planes(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> None:
        """Write (planes, b, Hkv, d) K/V of every plane at once, at `index` (`write_index`)."""
        per_plane = self.k[0].numel() // self.k.shape[-1]  # rows of a plane seen as (slots * Hkv * capacity, d)
        rows = (torch.arange(self.k.shape[0], device=index.device)[:, None] * per_plane + index).reshape(-1)
        self._write(self.k, self.v, rows, k, v)

    def commit(self, slots: torch.Tensor) -> None:
        """End of a decode step: the shared modes keep their reduced K/V; the slots' lengths advance by one."""
        index = self.write_index(slots) if self._pending else None
        for p, (k, v) in self._pending.items():
            self._write(self.k[p], self.v[p], index, k, v)
        self._pending.clear()
        self.lengths[slots] += 1

    @staticmethod
    def _write(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V rows (..., d) into contiguous cache tensors seen as (rows, d)."""
        d = keys.shape[-1]
        keys.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
        values.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


__all__ = ["GrowingKVLayer", "KV_MODES", "KVMode", "LoopKVCache", "SlotKVCache", "keep_exited", "keep_exited_rows",
           "plane_index"]
