"""The decode fast path: one new token per sequence over a `SlotKVCache`, the rollout engine's step.

The same function as the model's forward on one token with a cache (tests/looplm/test_decode_step.py holds it to
that), computed with fewer and fused ops: at decode sizes a step costs its ops' dispatch, not their arithmetic.
It reads the model's weights through `DecodeLayerWeights` (fused projections, rebuilt when a parameter changes)
and reuses the forward's rotary embedding, RMSNorm (exact mode) and exit rules (`looplm.exits`).
Entry points: `decode_step(model, tokens, slots, cache, ...)` (also `LoopLMForCausalLM.decode_step`) and
`compile_decode(model)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import exact_mode_aware
from .cache import SlotKVCache, keep_exited_rows, plane_index
from .exits import ExitRule, RunningExits
from .modeling_looplm import LoopLMDecoderLayer, LoopLMForCausalLM, LoopLMModel, LoopLMRMSNorm, rms_norm


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
        self.cache.store_exited(loop, self.last_kv, self.write_index)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """(b_run, H, d) queries and (b_run, Hkv, d) K/V of the running rows at `layer` -> (b_run, H, d)."""
        if self.run is not None:  # exited rows keep the K/V of their exit loop
            last_k, last_v = self.last_kv[layer]
            k, v = keep_exited_rows(k, last_k, self.run), keep_exited_rows(v, last_v, self.run)
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
    and no decisions on values, so that `torch.compile` makes it one graph (`compile_decode`).

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
            x = decode_layer(x, w, rope, functools.partial(attend, plane=plane_index(loop, i, len(layers))))
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


@exact_mode_aware
@torch.inference_mode()
def decode_backbone(
    backbone: LoopLMModel,
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
    hidden-difference rule (see looplm.exits). Neither: every row runs `cache.num_loops` loops.
    exit_temperature: divides the gate logits of the Q-exit rule (sampled exits, as in `forward`).
    """
    if torch.is_tensor(exit_threshold):
        exit_threshold = exit_threshold.reshape(len(tokens)).float()  # (b,) or (b, 1): one q per row
    rule = ExitRule(cache.num_loops, None, exit_threshold, exit_hidden_eps, exit_temperature).check()
    weights, final_norm = _decode_weights(backbone)
    n_loops, (b,) = cache.num_loops, tokens.shape
    x = backbone.embed_tokens(tokens)  # (b, D)
    position = cache.lengths[slots]  # (b,) the new token's position in its slot
    cos, sin = (t[:, 0] for t in backbone.rotary_emb(position[:, None], x.dtype))  # (b, 1, d): over heads
    # rotate_half(x) = roll(x, d/2) * [-1]*d/2 + [1]*d/2: the sign goes into sin, RoPE is three ops
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    attend = _SlotAttention(cache, slots, position, len(weights))
    compiled = backbone.__dict__.get("_compiled_decode")
    # The graph attends over every slot up to the longest: taken where the eager step would make that one call.
    if (compiled is not None and exit_threshold is None and exit_hidden_eps is None and not backbone.config.exact_mode
            and cache.mode == "full" and b == cache.k.shape[1] and attend.one_call()):
        return _decode_compiled(backbone, compiled, x, (cos, sin), cache, slots, attend, weights, final_norm)
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
        x = decode_rms_norm(x, final_norm, backbone.norm.eps, weights[0].fast_norm)  # (b_run, D)
        x = exits.step(loop, x, backbone.early_exit_gate(x)[:, 0])
    cache.commit(slots)
    return DecodeStepOutput(exits.output, exits.steps, exits.gate_logits)

def compile_decode(model: LoopLMForCausalLM, **compile_kwargs) -> None:
    """Decode fixed-depth steps that feed every slot of the cache through `torch.compile(decode_all_loops)`:
    one graph for all loops and layers instead of thousands of small ops a token. The first steps compile
    (tens of seconds on CPU; a C++ compiler is needed there); other steps, exact mode, adaptive depth and the
    shared cache modes keep the eager path. The compiled step equals the eager one to fp32 rounding."""
    model.model.__dict__["_compiled_decode"] = torch.compile(decode_all_loops, **compile_kwargs)

def _decode_compiled(backbone: LoopLMModel, compiled, x, rope, cache: SlotKVCache, slots, attend: _SlotAttention, weights,
                     final_norm) -> DecodeStepOutput:
    """Every slot of a "full" cache fed, fixed depth: the whole step in the compiled `decode_all_loops`."""
    n_past = attend.n - 1  # positions held by the longest slot
    k_past, v_past = cache.k[:, :, :, :n_past], cache.v[:, :, :, :n_past]  # slots == every slot, in order
    mask = _attention_mask(cache.lengths - 1, n_past, cache.k.dtype)  # (S, 1, 1, n_past) the held positions
    for t, dims in ((x, (0,)), (rope[0], (0,)), (rope[1], (0,)), (k_past, (1, 3)), (v_past, (1, 3)), (mask, (0, 3))):
        for dim in dims:  # one graph whatever the number of rows and positions
            torch._dynamo.maybe_mark_dynamic(t, dim)
    hidden, gate_logits, new_k, new_v = compiled(
        x, rope, k_past, v_past, mask, weights, final_norm, backbone.early_exit_gate.weight, cache.num_loops
    )
    cache.store_planes(new_k, new_v, attend.write_index)
    cache.commit(slots)
    steps = torch.full((len(slots),), cache.num_loops, dtype=torch.long, device=x.device)
    return DecodeStepOutput(hidden, steps, gate_logits.float())

def _decode_weights(backbone: LoopLMModel) -> tuple[list[DecodeLayerWeights], torch.Tensor]:
    """Fused per-layer weights and the final norm's, rebuilt when any parameter changed (load_state_dict, an
    optimizer step and `.to()` all change a parameter's version or storage) or exact mode was switched; not
    parameters, so the state_dict is unchanged."""
    # (Parameters made under inference_mode have no version counter: only their storage is compared.)
    # The weights are read straight from the modules `of` uses: walking `parameters()` cost 0.3 ms a step.
    exact = backbone.config.exact_mode
    weights = [m.weight for layer in backbone.layers for m in DecodeLayerWeights.sources(layer)] + [backbone.norm.weight]
    key = (exact, *((w.data_ptr(), -1 if w.is_inference() else w._version) for w in weights))
    cached = backbone.__dict__.get("_decode_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            layers = [DecodeLayerWeights.of(layer, exact) for layer in backbone.layers]
            final = DecodeLayerWeights.norm_weight(backbone.norm, layers[0].fast_norm)  # applied with that flag
            cached = (key, (layers, final))
        backbone.__dict__["_decode_cache"] = cached
    return cached[1]


@exact_mode_aware
def decode_step(model: LoopLMForCausalLM, tokens: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache,
                **depth) -> DecodeStepOutput:
    """`decode_backbone` plus the (b, V) logits of each row's exit state (the rollout engine's step)."""
    out = decode_backbone(model.model, tokens, slots, cache, **depth)
    with torch.inference_mode():
        out.logits = model.lm_head(out.hidden)
    return out


__all__ = ["DecodeLayerWeights", "DecodeStepOutput", "attention_segments", "compile_decode", "decode_backbone",
           "decode_step"]
