"""Exact mode: kernels whose result for one position does not depend on what else is computed with it.

The rollout engine decodes one position per row against a cache; the training forward computes every position
at once. The two agree to rounding only, because a reduction's order can depend on the shape of the whole
operation. Measured on this project's CPU (torch 2.13, MKL/oneDNN, AVX-512 + AMX; `tests/looplm/
test_batch_invariant.py` keeps each claim honest):
  * fp32 matmul: a row's result changes with the number of rows and with its position among them (MKL picks
    gemv for one row, and its gemm edge kernels differ by row). bf16 matmul (oneDNN) did not, at any row count
    tried. Fixed 16-row tiles run the same kernel for every row whatever the batch: rows are padded to a
    multiple of 16 and multiplied as a batch of (16, K) x (K, N) products.
  * attention (SDPA): the fused kernel splits keys into blocks whose size and order depend on the sequence
    length, and a decoded position sees a cache of `pos + 1` keys where the training forward sees `S`.
    Here it is written out in fixed tiles: 16 queries x 64 keys per score and value product, per-tile sums over
    the 64 keys, then a left fold over key tiles. Tiles past a query's last key contribute exact zeros, and
    keys are aligned to each row's first real key (left padding moves nothing), so the decode step and the
    parallel forward add the same numbers in the same order. Softmax runs in fp32.
  * RMSNorm, SiLU, exp, log-softmax over the vocabulary, sums over a fixed-length last dimension: a row's
    result did not change with the batch. Left as they are.

`BatchInvariantMode` swaps `F.linear` and `F.scaled_dot_product_attention` for these versions through a
`TorchFunctionMode`, so every module (LoRA adapters included) and both call sites take them, with autograd.
The model enters it when `config.exact_mode` is set (`LoopLMConfig`); nothing else changes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROW_TILE = 16  # rows per matmul tile (linear layers; queries in attention)
KEY_TILE = 64  # keys per attention tile

# Dtypes whose CPU matmul was measured to depend on the number of rows (see the module docstring).
TILED_MATMUL_DTYPES = (torch.float32, torch.float64, torch.float16)


def _pad_dim(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of x up to a multiple of `multiple`."""
    extra = (-x.shape[dim]) % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with each row's result independent of the other rows: (..., K) -> (..., N)."""
    if x.dtype not in TILED_MATMUL_DTYPES:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    tiles = _pad_dim(rows, 0, ROW_TILE).view(-1, ROW_TILE, rows.shape[-1])  # (M / 16, 16, K)
    # bmm against the weight expanded over tiles (a stride-0 view, not a copy): one (16, K) x (K, N) product each.
    out = torch.bmm(tiles, weight.t().unsqueeze(0).expand(tiles.shape[0], -1, -1)).flatten(0, 1)[: rows.shape[0]]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _valid_keys(attn_mask, is_causal: bool, B: int, Sq: int, Sk: int, device) -> torch.Tensor:
    """(B, 1|H, Sq, Sk) bool: which keys each query may see (SDPA's boolean mask convention)."""
    if attn_mask is not None:
        valid = attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
        if attn_mask.dtype != torch.bool and not bool((attn_mask[~valid] == float("-inf")).all()):
            raise ValueError("exact mode takes boolean masks or their additive form (0 = seen, -inf = hidden)")
    elif is_causal:
        valid = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril()
    else:
        valid = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    valid = valid.expand(B, *valid.shape[-3:]) if valid.dim() >= 3 else valid.expand(B, 1, Sq, Sk)
    return valid


def _align_to_first_key(k, v, valid):
    """Shift each row's keys so its first real key sits at index 0 (left padding then moves no tile edge).

    The first real key is the first key the row's last query may see: the last query is always a real token
    (left-padded prompts, decode steps, right-padded training rows alike).
    """
    first = valid[:, 0, -1, :].int().argmax(-1)  # (B,)
    if not bool(first.any()):
        return k, v, valid
    Sk = k.shape[-2]
    index = torch.arange(Sk, device=k.device)[None, :] + first[:, None]  # (B, Sk)
    inside = index < Sk
    index = index.clamp(max=Sk - 1)

    def take(t: torch.Tensor) -> torch.Tensor:  # gather along the key axis, per row
        idx = index.view(index.shape[0], *([1] * (t.dim() - 3)), Sk, 1).expand(*t.shape[:-2], Sk, t.shape[-1])
        return t.gather(-2, idx)

    valid = valid.gather(-1, index[:, None, None, :].expand(*valid.shape[:-1], Sk)) & inside[:, None, None, :]
    valid[..., 0] |= ~valid.any(-1)  # a pad query before the first real key: any finite output will do
    return take(k), take(v), valid


def invariant_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA's signature and result, (B, H, Sq, d), computed in fixed tiles (see the module docstring)."""
    if dropout_p:
        raise ValueError("exact mode does not support attention dropout")
    B, H, Sq, d = query.shape
    Sk = key.shape[-2]
    if key.shape[1] != H:  # grouped-query attention: every query head reads its group's K/V
        key, value = key.repeat_interleave(H // key.shape[1], 1), value.repeat_interleave(H // value.shape[1], 1)
    valid = _valid_keys(attn_mask, is_causal, B, Sq, Sk, query.device)
    key, value, valid = _align_to_first_key(key, value, valid)
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    q = _pad_dim(query.float() * scale, 2, ROW_TILE).view(B, H, -1, 1, ROW_TILE, d)  # (B, H, nq, 1, 16, d)
    k = _pad_dim(key.float(), 2, KEY_TILE).view(B, H, 1, -1, KEY_TILE, d)  # (B, H, 1, nk, 64, d)
    v = _pad_dim(value.float(), 2, KEY_TILE).view(B, H, 1, -1, KEY_TILE, d)
    nq, nk = q.shape[2], k.shape[3]
    # Padded queries see every key (finite, discarded); padded keys are seen by no real query.
    valid = _pad_dim(_pad_dim(valid, 3, KEY_TILE), 2, ROW_TILE).clone()
    valid[:, :, Sq:] = True
    valid = valid.view(B, valid.shape[1], nq, ROW_TILE, nk, KEY_TILE).transpose(3, 4)  # (B, 1|H, nq, nk, 16, 64)

    scores = (q @ k.transpose(-1, -2)).masked_fill(~valid, float("-inf"))  # (B, H, nq, nk, 16, 64)
    top = scores.amax(dim=(3, 5), keepdim=True)  # a max is exact in any order
    probs = (scores - top).exp()  # masked keys: exp(-inf) = 0
    tile_sums = probs.sum(-1)  # (B, H, nq, nk, 16): 64 keys each
    tile_outs = probs @ v  # (B, H, nq, nk, 16, d)
    total, out = tile_sums[:, :, :, 0], tile_outs[:, :, :, 0]
    for j in range(1, nk):  # left fold over key tiles: trailing tiles of zeros leave the sums unchanged
        total, out = total + tile_sums[:, :, :, j], out + tile_outs[:, :, :, j]
    out = out / total[..., None]  # (B, H, nq, 16, d)
    return out.reshape(B, H, nq * ROW_TILE, d)[:, :, :Sq].to(query.dtype)


_state = threading.local()


class BatchInvariantMode(TorchFunctionMode):
    """Inside it, `F.linear` and `F.scaled_dot_product_attention` run the batch-invariant versions above."""

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _state.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return invariant_linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return invariant_attention(*args, **kwargs)
        return func(*args, **kwargs)


def batch_invariant(enabled: bool = True) -> contextlib.AbstractContextManager:
    """The mode when `enabled` and not already on (the backbone runs inside the LM head's forward)."""
    if not enabled or getattr(_state, "depth", 0):
        return contextlib.nullcontext()
    return BatchInvariantMode()


def exact_mode_aware(forward):
    """Decorates a model's forward: it runs inside the mode when the model's `config.exact_mode` is set."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        with batch_invariant(self.config.exact_mode):
            return forward(self, *args, **kwargs)

    return wrapper


__all__ = ["BatchInvariantMode", "KEY_TILE", "batch_invariant", "exact_mode_aware", "ROW_TILE", "invariant_attention", "invariant_linear"]
