"""LoopLM: an Ouro-style looped decoder, weight-compatible with the Ouro checkpoints.

The whole stack of L layers is applied T times ("loops") with shared weights; after every loop the final
norm is applied and its output both feeds the next loop and goes to the exit gate. Positions are the same in
every loop. Parameter names follow Ouro's checkpoint keys, so loading is a checked key-by-key copy.

Per-token depth ("exit steps", 1..T) is handled inside the backbone, so that TRL's fused lm-head path, which
calls `model.base_model(...)` and reads `.last_hidden_state`, sees each token's state at its exit loop:
  * a token that exits at loop e takes its output from its state after loop e;
  * for every deeper loop t > e its K/V at each layer is its loop-e K/V ("last exited"), exactly what the
    rollout engine's cache holds, so a parallel forward replays an adaptive-depth rollout.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .batch_invariant import exact_mode_aware
from .cache import LoopKVCache, SlotKVCache
from .configuration_looplm import LoopLMConfig
from .exits import ExitRule, ExitTracker, RunningExits

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward kwargs, outputs, generate()'s
# model_kwargs). The model speaks the new name; a caller's `past_key_values=` still works, with a FutureWarning
# (transformers' `deprecate_kwarg`, as on its own models). generate() on 5.23 keeps the cache under the old
# key, which the three generation hooks below translate.
GENERATE_CACHE_KEY = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"

# ----------------------------------------------------------------------------------------------------------
# Building blocks


class LoopLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (the decode fast path calls it too: the same op order keeps it close to training)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class LoopLMRotaryEmbedding(nn.Module):
    # No buffer: transformers 5 builds models on the meta device and leaves non-persistent buffers
    # uninitialised on load, and recomputing d/2 frequencies per forward costs nothing.
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.dim, self.theta = config.head_dim, float(config.rope_parameters["rope_theta"])

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=position_ids.device).float() / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, d): broadcasts over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LoopLMAttention(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, h, rope, mask, is_causal, active, last_kv, cache, loop, layer_idx):
        B, S, _ = h.shape
        q = self.q_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = self.k_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, d)
        v = self.v_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if active is not None:  # "last exited": tokens past their exit loop keep that loop's K/V
            keep = active[:, None, :, None]
            k, v = torch.where(keep, k, last_kv[0]), torch.where(keep, v, last_kv[1])
        new_kv = (k, v)
        if cache is not None:
            k, v = cache.update_loop(k, v, loop, layer_idx)  # (B, Hkv, past + S, d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), new_kv


class LoopLMMLP(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopLMDecoderLayer(GradientCheckpointingLayer):
    """Ouro's "sandwich" layer: every sub-block is normed both before and after."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.self_attn = LoopLMAttention(config)
        self.mlp = LoopLMMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = LoopLMRMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = LoopLMRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = LoopLMRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = LoopLMRMSNorm(config.hidden_size, eps)

    def forward(self, h, rope, mask, is_causal, active, last_kv, loop, layer_idx, cache=None):
        attn, new_kv = self.self_attn(
            self.input_layernorm(h), rope, mask, is_causal, active, last_kv, cache, loop, layer_idx
        )
        h = h + self.input_layernorm_2(attn)
        h = h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
        return h, new_kv


# ----------------------------------------------------------------------------------------------------------
# Positions and masks: always from lengths (the attention mask), never from comparing ids with the pad id.


def position_ids_from_mask(attention_mask: torch.Tensor | None, past_len: int, q: int, device) -> torch.Tensor:
    """(B, q) positions: real tokens count from 0 whatever the left padding, as in the rollout engine."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]


def build_attention_mask(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor, q: int, past_len: int
) -> tuple[torch.Tensor | None, bool]:
    """-> (boolean mask (B, 1, q, past + q) or None, is_causal) for SDPA.

    Handles padding (a 2-D 0/1 mask over past + q positions) and packed rows (no mask, positions that restart
    at 0, as TRL's padding-free SFT passes them): tokens then attend within their own sequence only.
    """
    device = position_ids.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    packed = attention_mask is None and past_len == 0 and q > 1 and bool((position_ids[:, 1:] == 0).any())
    if not padded and not packed and (past_len == 0 or q == 1):  # a chunk after a cache needs the offset mask
        return None, past_len == 0 and q > 1
    rows = torch.arange(past_len, past_len + q, device=device)[:, None]
    cols = torch.arange(past_len + q, device=device)[None, :]
    mask = (cols <= rows)[None, None]  # (1, 1, q, kv)
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if packed:
        segment = (position_ids == 0).cumsum(-1)  # (B, q)
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    # A query that may see nothing (a pad position) would make SDPA return NaN: let it see itself.
    return mask | (cols == rows)[None, None], False


# ----------------------------------------------------------------------------------------------------------
# Decode fast path: one token per sequence, the same math as the forward above, fewer and fused ops.


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fast: bool) -> torch.Tensor:
    """RMSNorm in the decode step, with a weight from `DecodeLayerWeights.norm_weight`.

    Not `fast` (exact mode, or weights not in fp32): `rms_norm` itself, the training forward's ops. Otherwise
    the same function in five ops instead of nine (a norm costs its ops' dispatch at decode sizes, and a token
    runs 17 a loop), equal to fp32 rounding: x * rsqrt(mean(x^2) + eps) * w = x * rsqrt(|x|^2 + D eps) * (sqrt(D) w),
    with sqrt(D) w stored.
    """
    if not fast:
        return rms_norm(x, weight, eps)
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(x.shape[-1] * eps).rsqrt_()  # (b, 1)
    return (x * r).mul_(weight)


@dataclass
class DecodeLayerWeights:
    """One layer's weights for the decode step: fused projections, built from the checkpoint-named ones.

    Exact mode keeps nn.Linear's (out, in) matrices for F.linear (its batch-invariant matmul must see the
    training forward's operands, bit for bit) and the norm weights as they are. Otherwise each matrix is stored
    (in, out), contiguous, for `torch.mm`: a few rows times a contiguous (in, out) matrix is 1.3-1.7x faster on
    this CPU at 1-32 rows when the weights are in cache (measured), and one dispatch instead of F.linear's four;
    fp32 norm weights hold sqrt(D) w for `decode_rms_norm`'s fast form. Both equal nn.Linear and rms_norm to
    fp32 rounding.
    """

    # (out, in) in exact mode, (in, out) otherwise
    qkv: torch.Tensor  # (H*d + 2*Hkv*d, D): q_proj, k_proj, v_proj stacked
    o: torch.Tensor  # (D, H*d)
    gate_up: torch.Tensor  # (2F, D): gate_proj, up_proj stacked
    down: torch.Tensor  # (D, F)
    norms: tuple[torch.Tensor, ...]  # input, input_2, post_attention, post_attention_2 RMSNorm weights
    eps: float
    heads: tuple[int, int, int]  # (H, Hkv, d)
    exact: bool
    fast_norm: bool  # `decode_rms_norm`'s fast form: fp32 weights outside exact mode

    @staticmethod
    def sources(layer: LoopLMDecoderLayer) -> tuple[nn.Module, ...]:
        """The modules whose weights `of` reads, in its order (the decode cache's key checks their weights)."""
        a, m = layer.self_attn, layer.mlp
        return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj, layer.input_layernorm,
                layer.input_layernorm_2, layer.post_attention_layernorm, layer.post_attention_layernorm_2)

    @classmethod
    def of(cls, layer: LoopLMDecoderLayer, exact: bool) -> DecodeLayerWeights:
        q, k, v, o, gate, up, down, *norms = cls.sources(layer)

        def matrix(*linears: nn.Linear) -> torch.Tensor:
            w = torch.cat([lin.weight for lin in linears]).detach()
            return w if exact else w.t().contiguous()

        # In bf16, sqrt(D) w would be rounded once more, and rms_norm's fp32 detour matters: keep its ops there.
        fast_norm = not exact and norms[0].weight.dtype == torch.float32
        return cls(
            qkv=matrix(q, k, v), o=matrix(o), gate_up=matrix(gate, up), down=matrix(down),
            norms=tuple(cls.norm_weight(n, fast_norm) for n in norms), eps=norms[0].eps,
            heads=(layer.self_attn.num_heads, layer.self_attn.num_kv_heads, layer.self_attn.head_dim), exact=exact,
            fast_norm=fast_norm,
        )

    @staticmethod
    def norm_weight(norm: LoopLMRMSNorm, fast: bool) -> torch.Tensor:
        w = norm.weight.detach()
        return w * w.shape[-1] ** 0.5 if fast else w

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(b, in) -> (b, out) with one of this layer's matrices."""
        return F.linear(x, weight) if self.exact else torch.mm(x, weight)

    def norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return decode_rms_norm(x, self.norms[i], self.eps, self.fast_norm)


@dataclass
class DecodeStepOutput:
    hidden: torch.Tensor  # (b, D) each row's normed state at its exit loop
    exit_steps: torch.Tensor  # (b,) in 1..num_loops
    gate_logits: torch.Tensor  # (b, num_loops) per loop run; NaN for loops a row did not run
    logits: torch.Tensor | None = None  # (b, V), from LoopLMForCausalLM.decode_step


class _AttentionCall(NamedTuple):
    """One SDPA call of `_SlotAttention`: slots start..end-1 of a plane, their first `positions` positions."""

    start: int
    end: int
    positions: int
    rows: int  # the running rows it serves (the next ones, in order)
    offsets: torch.Tensor | None  # (rows,) their slots - start when some slot in the span does not run
    masked: bool  # the rows differ in length, or a slot does not run


class _SlotAttention:
    """Attention of one new token per row over a SlotKVCache, for the rows still running at a loop; it writes
    the rows' new K/V first (an exited row's K/V of its exit loop: "last exited").

    A batched call reads every slot it spans up to its longest row, padding included; a call per row reads only
    that row's positions but costs a call. On CPU `attention_segments` splits the running rows (in slot order)
    into runs that minimise the two together, once a loop: a batch of rows at one length is one call, a long
    row among short ones (continuous batching: new requests next to old) gets its own, and so do the few rows of
    the deeper loops of adaptive depth (gathering their planes would copy them first). On other devices, where a
    call costs more than reading padding, one call spans the running rows.
    """

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor, position: torch.Tensor, num_layers: int):
        self.cache, self.device = cache, slots.device  # position: (b,) each row's new token's position
        self.n = int(position.max()) + 1  # positions the longest row attends
        cache.reserve(self.n)
        self.write_index = cache.write_index(slots, position)  # where each row's new K/V goes
        self.slot_list, self.position_list = slots.tolist(), position.tolist()
        self.loop, self.run = 0, None  # this loop; its running rows (local indices)
        self.calls: list[_AttentionCall] = []  # this loop's, planned by start_loop
        self.last_kv: list = [None] * num_layers  # per layer (b, Hkv, d): each row's K/V at its latest loop
        k = cache.k  # a call's cost in positions of a slot read (K and V); None: one call spans the running rows
        position_bytes = 2 * k.shape[2] * k.shape[4] * k.element_size()
        self.call_positions = _CALL_BYTES / position_bytes if k.device.type == "cpu" else None
        self.plan_all: list[_AttentionCall] | None = None  # the calls when every row runs (the same at each loop)

    def start_loop(self, loop: int, run: torch.Tensor | None) -> None:
        """The rows running loop `loop`: local indices into the step's slots (None: all). Plans its calls."""
        self.loop, self.run = loop, run
        if run is None and self.plan_all is not None:
            self.calls = self.plan_all
            return
        local = range(len(self.slot_list)) if run is None else run.tolist()
        slots, lengths = [self.slot_list[i] for i in local], [self.position_list[i] + 1 for i in local]
        if self.call_positions is None:
            segments = [(0, len(slots), max(lengths))]
        else:
            segments = attention_segments(slots, lengths, self.call_positions)
        self.calls = []
        for first, end, n in segments:
            s0, s1 = slots[first], slots[end - 1] + 1
            offsets = None if s1 - s0 == end - first else torch.tensor(slots[first:end], device=self.device) - s0
            masked = offsets is not None or min(lengths[first:end]) < n
            self.calls.append(_AttentionCall(s0, s1, n, end - first, offsets, masked))
        if run is None:
            self.plan_all = self.calls

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(S, 1, 1, n) additive, for the calls over rows of different lengths (made at the first)."""
        return _attention_mask(self.cache.lengths, self.n, self.cache.k.dtype)

    def one_call(self) -> bool:
        """Whether the plan for every row running is one call over every slot of the cache."""
        self.start_loop(0, None)
        return len(self.calls) == 1 and self.calls[0].rows == self.cache.k.shape[1]

    def store_exited(self, loop: int) -> None:
        """Every row exited before `loop`: its planes get the exited K/V, uncomputed."""
        for layer, kv in enumerate(self.last_kv):
            self.cache.store(loop, layer, *kv, self.write_index)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """(b_run, H, d) queries and (b_run, Hkv, d) K/V of the running rows at `layer` -> (b_run, H, d)."""
        if self.run is not None:  # exited rows keep the K/V of their exit loop
            k, v = self.last_kv[layer][0].index_copy(0, self.run, k), self.last_kv[layer][1].index_copy(0, self.run, v)
        self.last_kv[layer] = (k, v)
        plane = self.cache.store(self.loop, layer, k, v, self.write_index)
        keys, values = self.cache.k[plane], self.cache.v[plane]  # (S, Hkv, capacity, d)
        out, row = [], 0
        for s0, s1, n, rows, offsets, masked in self.calls:
            q_call = q[row : row + rows]
            mask = self.mask[s0:s1, :, :, :n] if masked else None
            if offsets is None:
                out.append(_sdpa(q_call, keys[s0:s1, :, :n], values[s0:s1, :, :n], mask))
            else:  # slots in the span that do not run: attend for them too, keep the running rows
                q_all = q.new_zeros(s1 - s0, *q.shape[1:]).index_copy_(0, offsets, q_call)
                out.append(_sdpa(q_all, keys[s0:s1, :, :n], values[s0:s1, :, :n], mask).index_select(0, offsets))
            row += rows
        return out[0] if len(out) == 1 else torch.cat(out)


# One attention call on CPU costs about as long as reading this much K/V (measured on one thread: about 25 us
# a call beside 0.33 us per position of 5 K/V heads of 64, K and V in fp32: 7.7 GB/s).
_CALL_BYTES = 192 * 1024
# The most rows one planned call serves, so that planning costs O(rows x this) (0.1 ms at 32 rows); a larger
# batch at one length takes a call per 32 rows, whose overhead is a few percent of what they read.
_MAX_CALL_ROWS = 32


def attention_segments(slots: list[int], lengths: list[int], call_positions: float) -> list[tuple[int, int, int]]:
    """Split rows (in slot order; row i attends `lengths[i]` positions of slot `slots[i]`) into runs, one
    attention call each, that minimise the positions read plus `call_positions` a call: a call over rows
    first..end-1 reads every slot from slots[first] to slots[end - 1] up to the run's longest length, and serves
    at most `_MAX_CALL_ROWS` rows. -> (first, end, longest) per call, in order. Dynamic programming over the rows."""
    best, cut = [0.0], [0]  # best[end]: the least cost of rows 0..end-1; cut[end]: its last run's first row
    for end in range(1, len(slots) + 1):
        top, longest, least, first_of_least = slots[end - 1] + 1, 0, float("inf"), 0
        for first in range(end - 1, max(end - _MAX_CALL_ROWS, 0) - 1, -1):
            longest = max(longest, lengths[first])
            cost = best[first] + (top - slots[first]) * longest
            if cost < least:
                least, first_of_least = cost, first
        best.append(least + call_positions)
        cut.append(first_of_least)
    segments, end = [], len(slots)
    while end > 0:
        first = cut[end]
        segments.append((first, end, max(lengths[first:end])))
        end = first
    return segments[::-1]


def _attention_mask(lengths: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, 1, 1, n) additive: a slot sees its positions up to its length (the held ones and the new one);
    finite everywhere, so a slot that is not fed never makes NaNs."""
    seen = torch.arange(n, device=lengths.device)[None] <= lengths[:, None]
    return torch.zeros(seen.shape, dtype=dtype, device=lengths.device).masked_fill_(~seen, float("-inf"))[:, None, None]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(b, H, d) queries over (b, Hkv, n, d) keys and values -> (b, H, d)."""
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


def decode_layer(x: torch.Tensor, w: DecodeLayerWeights, rope: tuple[torch.Tensor, torch.Tensor], attend) -> torch.Tensor:
    """One layer for one new token per row, (b, D) -> (b, D): `LoopLMDecoderLayer` with fused projections.
    attend: (q (b, H, d), k, v (b, Hkv, d)) -> (b, H, d), the rows' attention over their past and new K/V."""
    H, Hkv, d = w.heads
    qkv = w.linear(w.norm(x, 0), w.qkv)  # (b, (H + 2 Hkv) d)
    qk = qkv[:, : (H + Hkv) * d].view(-1, H + Hkv, d)
    cos, sin = rope
    qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once
    attn = attend(qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * d :].view(-1, Hkv, d)).reshape(-1, H * d)
    x = x + w.norm(w.linear(attn, w.o), 1)
    gate, up = w.linear(w.norm(x, 2), w.gate_up).chunk(2, dim=-1)
    return x + w.norm(w.linear(F.silu(gate) * up, w.down), 3)


def decode_all_loops(
    x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_past: torch.Tensor, v_past: torch.Tensor,
    mask: torch.Tensor, layers: list[DecodeLayerWeights], final_norm: torch.Tensor, gate: torch.Tensor,
    num_loops: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode step at fixed depth, every row running every loop, as one function of tensors: no cache writes
    and no decisions on values, so that `torch.compile` makes it one graph (`LoopLMModel.compile_decode`).

    x: (b, D) embedded tokens; k_past, v_past: (T*L, b, Hkv, n, d) the rows' held K/V per plane; mask: (b, 1,
    1, n) additive over those positions. Each token attends to its past and to its own new K/V, which
    the caller writes afterwards. -> (b, D) final state, (b, T) gate logits, (T*L, b, Hkv, d) new K and V.
    """
    new_k, new_v, gate_logits = [], [], []

    def attend(q, k, v, plane):
        new_k.append(k)
        new_v.append(v)
        return _attend_past_and_new(q, k, v, k_past[plane], v_past[plane], mask)

    for loop in range(num_loops):
        for i, w in enumerate(layers):
            x = decode_layer(x, w, rope, functools.partial(attend, plane=loop * len(layers) + i))
        x = decode_rms_norm(x, final_norm, layers[0].eps, layers[0].fast_norm)
        gate_logits.append(F.linear(x, gate)[:, 0])
    return x, torch.stack(gate_logits, -1), torch.stack(new_k), torch.stack(new_v)


def _attend_past_and_new(q, k, v, k_past, v_past, mask) -> torch.Tensor:
    """Softmax attention of (b, H, d) queries over (b, Hkv, n, d) past K/V and the rows' own (b, Hkv, d) new K/V
    -> (b, H, d), without writing the new K/V into the past first: attention over the past comes with its
    log-sum-exp, and the new key joins the softmax by weighting the two parts."""
    b, H, d = q.shape
    Hkv = k.shape[1]
    q = q.reshape(b, Hkv, H // Hkv, d)  # the query heads of a K/V head as its query rows: GQA without copies
    if q.device.type == "cpu":  # the fused kernel, which returns its log-sum-exp (written out, the compiler
        # turned the one-row products into loops: 2x slower than this at 32 rows, measured)
        past, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k_past, v_past, attn_mask=mask)
    else:
        past, lse = _attention_with_lse(q, k_past, v_past, mask)
    new = (q.float() * k[:, :, None].float()).sum(-1) * d**-0.5  # (b, Hkv, g): each query's score on its new key
    top = torch.maximum(lse, new)
    w_past, w_new = (lse - top).exp(), (new - top).exp()
    out = (past.float() * w_past[..., None] + v[:, :, None].float() * w_new[..., None]) / (w_past + w_new)[..., None]
    return out.to(q.dtype).reshape(b, H, d)


def _attention_with_lse(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, h, m, d) queries over (b, h, n, d) K/V, written out: -> (b, h, m, d) output and (b, h, m) fp32
    log-sum-exp of the scaled scores (what the CPU flash kernel returns)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(-1)
    return torch.matmul((scores - lse[..., None]).exp().to(v.dtype), v), lse


# ----------------------------------------------------------------------------------------------------------
# Models


@dataclass
class LoopLMModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None  # (B, S, D) each token's state at its exit loop
    cache: LoopKVCache | None = None
    exit_steps: torch.LongTensor | None = None  # (B, S) in 1..num_loops
    gate_logits: torch.FloatTensor | None = None  # (B, S, loops run) exit-gate logits per loop
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None  # per loop (B, S, D), if asked for


@dataclass
class LoopLMCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # (B, S, V) from each token's exit loop
    cache: LoopKVCache | None = None
    exit_steps: torch.LongTensor | None = None
    gate_logits: torch.FloatTensor | None = None
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    loop_logits: torch.FloatTensor | None = None  # (loops, B, S, V), if asked for


class LoopLMPreTrainedModel(PreTrainedModel):
    config_class = LoopLMConfig
    config: LoopLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LoopLMDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, made strict: a missing, unexpected or mis-shaped tensor is an error naming it.

        (transformers would only warn and leave a randomly initialised weight behind.)
        """
        want_info = kwargs.pop("output_loading_info", False)
        where = Path(str(pretrained_model_name_or_path))
        # transformers raises on a size mismatch but names the tensor only in a logged report: load with
        # mismatches allowed and raise below with the names.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {
            "missing": sorted(info.get("missing_keys") or []),
            "unexpected": sorted(info.get("unexpected_keys") or []),
            "mis-shaped": sorted(_describe_mismatch(k) for k in info.get("mismatched_keys") or []),
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            details = "; ".join(f"{kind} tensor(s): {keys}" for kind, keys in problems.items())
            raise ValueError(f"{where}: checkpoint does not match {cls.__name__} ({details})")
        return (model, info) if want_info else model


def _describe_mismatch(entry) -> str:
    """transformers lists a mismatch as (key, checkpoint shape, model shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, found, expected = entry
        return f"{key} {tuple(found)} in checkpoint, {tuple(expected)} expected"
    return str(entry)


class LoopLMModel(LoopLMPreTrainedModel):
    """The backbone: embeddings, the looped layer stack, the final norm and the exit gate."""

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LoopLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LoopLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.rotary_emb = LoopLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @exact_mode_aware  # config.exact_mode: batch-invariant kernels (looplm.batch_invariant)
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as transformers' own models do
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopKVCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        exit_steps: torch.LongTensor | None = None,
        exit_threshold: float | torch.Tensor | None = None,
        output_loop_states: bool = False,
        exit_hidden_eps: float | None = None,
        exit_temperature: float = 1.0,
        **kwargs,
    ) -> LoopLMModelOutput:
        """Args beyond transformers' usual ones:
        num_loops: run this many loops instead of `config.total_ut_steps`.
        exit_steps: (B, S) LongTensor in 1..num_loops, each token's exit loop (replays a rollout).
        exit_threshold: Q-exit threshold q decided on the fly per token (the rollout engine's adaptive depth), or a
            (B, S) tensor of per-token thresholds (sampled exits, gate logits divided by `exit_temperature`).
        exit_hidden_eps: exit a token once its state's relative change between loops is below eps (see ExitTracker).
        output_loop_states: also return every loop's (normed) hidden states.
        """
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        B, S, _ = h.shape
        n_loops = self._check_depth_args(num_loops, exit_steps, exit_threshold, B, S, exit_hidden_eps)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = LoopKVCache(self.config)
        if cache is not None:
            cache.start_forward(n_loops)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len, S, h.device)
        mask, is_causal = build_attention_mask(attention_mask, position_ids, S, past_len)
        rope = self.rotary_emb(position_ids, h.dtype)

        exits = ExitTracker((B, S), n_loops, exit_steps, exit_threshold, h.device, exit_hidden_eps, exit_temperature)
        last_kv: list = [None] * len(self.layers)  # per layer: each token's K/V at its latest loop
        gate_logits, loop_states = [], []
        for loop in range(n_loops):
            active = exits.active
            for i, layer in enumerate(self.layers):
                h, last_kv[i] = layer(
                    h, rope, mask, is_causal, active, last_kv[i], loop, i, cache=cache
                )
            h = self.norm(h)  # the normed state feeds the next loop and the gate
            gate_logits.append(self.early_exit_gate(h).squeeze(-1))  # (B, S)
            if output_loop_states:
                loop_states.append(h)
            exits.step(loop, h, gate_logits)
            if exits.all_exited and loop + 1 < n_loops:
                self._fill_skipped_loops(cache, last_kv, loop + 1, n_loops)
                break
        if cache is not None:
            cache.commit()
        return LoopLMModelOutput(
            last_hidden_state=exits.output,
            cache=cache,
            exit_steps=exits.steps,
            gate_logits=torch.stack(gate_logits, dim=-1),
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
        )

    @staticmethod
    def _fill_skipped_loops(cache: LoopKVCache | None, last_kv: list, start: int, n_loops: int) -> None:
        """Every token exited before loop `start`: deeper planes get each token's exited K/V, uncomputed."""
        if cache is None:
            return
        for loop in range(start, n_loops):
            for i, (k, v) in enumerate(last_kv):
                cache.update_loop(k, v, loop, i)

    # -- decode fast path ------------------------------------------------------------------------------------

    @exact_mode_aware
    @torch.inference_mode()
    def decode_step(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        cache: SlotKVCache,
        exit_threshold: float | torch.Tensor | None = None,
        exit_hidden_eps: float | None = None,
        exit_temperature: float = 1.0,
    ) -> DecodeStepOutput:
        """Decode one token for each of `slots` (sorted, distinct) of a SlotKVCache, at the slot's next position.

        The same function as `forward` on one new token with a cache (the parity tests hold it to that), computed
        for the rows that have not exited only: at each loop the running rows run the layers (gathered), and a
        row that exited at loop e writes its loop-e K/V into the deeper loops' planes ("last exited").
        tokens: (b,) ids. exit_threshold: Q-exit q, a float or a (b,) tensor of per-row q; exit_hidden_eps: the
        hidden-difference rule (see ExitTracker). Neither: every row runs `cache.num_loops` loops.
        exit_temperature: divides the gate logits of the Q-exit rule (sampled exits, as in `forward`).
        """
        if torch.is_tensor(exit_threshold):
            exit_threshold = exit_threshold.reshape(len(tokens)).float()  # (b,) or (b, 1): one q per row
        rule = ExitRule(cache.num_loops, None, exit_threshold, exit_hidden_eps, exit_temperature).check()
        weights, final_norm = self._decode_weights()
        n_loops, (b,) = cache.num_loops, tokens.shape
        x = self.embed_tokens(tokens)  # (b, D)
        position = cache.lengths[slots]  # (b,) the new token's position in its slot
        cos, sin = (t[:, 0] for t in self.rotary_emb(position[:, None], x.dtype))  # (b, 1, d): over heads
        # rotate_half(x) = roll(x, d/2) * [-1]*d/2 + [1]*d/2: the sign goes into sin, RoPE is three ops
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        attend = _SlotAttention(cache, slots, position, len(weights))
        compiled = self.__dict__.get("_compiled_decode")
        # The graph attends over every slot up to the longest: taken where the eager step would make that one call.
        if (compiled is not None and exit_threshold is None and exit_hidden_eps is None and not self.config.exact_mode
                and cache.mode == "full" and b == cache.k.shape[1] and attend.one_call()):
            return self._decode_compiled(compiled, x, (cos, sin), cache, slots, attend, weights, final_norm)
        exits = RunningExits(b, rule, x.device)
        for loop in range(n_loops):
            run = exits.running  # local indices of the rows still running (None: all)
            if run is not None and len(run) == 0:
                attend.store_exited(loop)
                continue
            attend.start_loop(loop, run)
            rope = (cos, sin) if run is None else (cos[run], sin[run])
            for i, w in enumerate(weights):
                x = decode_layer(x, w, rope, functools.partial(attend, layer=i))
            x = decode_rms_norm(x, final_norm, self.norm.eps, weights[0].fast_norm)  # (b_run, D)
            x = exits.step(loop, x, self.early_exit_gate(x)[:, 0])
        cache.commit(slots)
        return DecodeStepOutput(exits.output, exits.steps, exits.gate_logits)

    def compile_decode(self, **compile_kwargs) -> None:
        """Decode fixed-depth steps that feed every slot of the cache through `torch.compile(decode_all_loops)`:
        one graph for all loops and layers instead of thousands of small ops a token. The first steps compile
        (tens of seconds on CPU; a C++ compiler is needed there); other steps, exact mode, adaptive depth and the
        shared cache modes keep the eager path. The compiled step equals the eager one to fp32 rounding."""
        self.__dict__["_compiled_decode"] = torch.compile(decode_all_loops, **compile_kwargs)

    def _decode_compiled(self, compiled, x, rope, cache: SlotKVCache, slots, attend: _SlotAttention, weights,
                         final_norm) -> DecodeStepOutput:
        """Every slot of a "full" cache fed, fixed depth: the whole step in the compiled `decode_all_loops`."""
        n_past = attend.n - 1  # positions held by the longest slot
        k_past, v_past = cache.k[:, :, :, :n_past], cache.v[:, :, :, :n_past]  # slots == every slot, in order
        mask = _attention_mask(cache.lengths - 1, n_past, cache.k.dtype)  # (S, 1, 1, n_past) the held positions
        for t, dims in ((x, (0,)), (rope[0], (0,)), (rope[1], (0,)), (k_past, (1, 3)), (v_past, (1, 3)), (mask, (0, 3))):
            for dim in dims:  # one graph whatever the number of rows and positions
                torch._dynamo.maybe_mark_dynamic(t, dim)
        hidden, gate_logits, new_k, new_v = compiled(
            x, rope, k_past, v_past, mask, weights, final_norm, self.early_exit_gate.weight, cache.num_loops
        )
        cache.store_planes(new_k, new_v, attend.write_index)
        cache.commit(slots)
        steps = torch.full((len(slots),), cache.num_loops, dtype=torch.long, device=x.device)
        return DecodeStepOutput(hidden, steps, gate_logits.float())

    def _decode_weights(self) -> tuple[list[DecodeLayerWeights], torch.Tensor]:
        """Fused per-layer weights and the final norm's, rebuilt when any parameter changed (load_state_dict, an
        optimizer step and `.to()` all change a parameter's version or storage) or exact mode was switched; not
        parameters, so the state_dict is unchanged."""
        # (Parameters made under inference_mode have no version counter: only their storage is compared.)
        # The weights are read straight from the modules `of` uses: walking `parameters()` cost 0.3 ms a step.
        exact = self.config.exact_mode
        weights = [m.weight for layer in self.layers for m in DecodeLayerWeights.sources(layer)] + [self.norm.weight]
        key = (exact, *((w.data_ptr(), -1 if w.is_inference() else w._version) for w in weights))
        cached = self.__dict__.get("_decode_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                layers = [DecodeLayerWeights.of(layer, exact) for layer in self.layers]
                final = DecodeLayerWeights.norm_weight(self.norm, layers[0].fast_norm)  # applied with that flag
                cached = (key, (layers, final))
            self.__dict__["_decode_cache"] = cached
        return cached[1]

    def _check_depth_args(self, num_loops, exit_steps, exit_threshold, B: int, S: int, hidden_eps=None) -> int:
        n_loops = self.config.total_ut_steps if num_loops is None else int(num_loops)
        ExitRule(n_loops, exit_steps, exit_threshold, hidden_eps).check((B, S))
        return n_loops


class LoopLMForCausalLM(LoopLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # vLLM and Ouro's remote code know the architecture by this name; ours is registered for model_type "ouro".
    checkpoint_architecture = "OuroForCausalLM"

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.model = LoopLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @exact_mode_aware
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopKVCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        exit_steps: torch.LongTensor | None = None,
        exit_threshold: float | torch.Tensor | None = None,
        output_loop_states: bool = False,
        output_loop_logits: bool = False,
        exit_hidden_eps: float | None = None,
        exit_temperature: float = 1.0,
        **kwargs,
    ) -> LoopLMCausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            exit_steps=exit_steps,
            exit_threshold=exit_threshold,
            output_loop_states=output_loop_states or output_loop_logits,
            exit_hidden_eps=exit_hidden_eps,
            exit_temperature=exit_temperature,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])  # (B, S', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        loop_logits = None
        if output_loop_logits:
            loop_logits = torch.stack([self.lm_head(s[:, keep]) for s in out.loop_hidden_states])
        return LoopLMCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            exit_steps=out.exit_steps,
            gate_logits=out.gate_logits,
            loop_hidden_states=out.loop_hidden_states if output_loop_states else None,
            loop_logits=loop_logits,
        )

    @exact_mode_aware
    def decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache, **depth) -> DecodeStepOutput:
        """`LoopLMModel.decode_step` plus the (b, V) logits of each row's exit state (the rollout engine's step)."""
        out = self.model.decode_step(tokens, slots, cache, **depth)
        with torch.inference_mode():
            out.logits = self.lm_head(out.hidden)
        return out

    # -- generation: transformers' own `generate()` with our cache ------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(GENERATE_CACHE_KEY) is None and generation_config.use_cache is not False:
            model_kwargs[GENERATE_CACHE_KEY] = LoopKVCache(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if GENERATE_CACHE_KEY != "cache" and GENERATE_CACHE_KEY in inputs:  # transformers 5.23
            inputs["cache"] = inputs.pop(GENERATE_CACHE_KEY)
        if is_first_iteration:
            inputs.pop("exit_threshold", None)  # the prompt's prefill always runs at full depth
            inputs.pop("exit_hidden_eps", None)
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.cache is not None:  # transformers 5.23 looks for `outputs.past_key_values` only
            model_kwargs[GENERATE_CACHE_KEY] = outputs.cache
        return model_kwargs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with the architecture named as vLLM and Ouro's code know it.

        `auto_map` (an Ouro folder's pointer to remote code we don't ship) is dropped: `import looplm` loads it.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "config.json"
        saved = json.loads(config_file.read_text())
        saved["architectures"] = [self.checkpoint_architecture]
        saved["rope_theta"] = self.config.rope_parameters["rope_theta"]  # where pre-v5 readers (vLLM) look
        saved.pop("auto_map", None)
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


__all__ = [
    "DecodeStepOutput",
    "ExitTracker",
    "LoopLMCausalLMOutput",
    "LoopLMForCausalLM",
    "LoopLMModel",
    "LoopLMModelOutput",
    "LoopLMPreTrainedModel",
    "build_attention_mask",
    "position_ids_from_mask",
]
