"""Exact mode: a position's result does not depend on what is computed with it, so rollout = training, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from looplm.batch_invariant import BatchInvariantMode, invariant_attention, invariant_linear
from looplm.tiny import tiny_model
from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import check_parity
from rollout.torch_engine import TorchEngine
from tests.helpers import ADAPTIVE, mixed_prompts

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_of_invariant_linear_does_not_depend_on_its_batch_or_place(dtype):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(200, 96, generator=g).to(dtype), torch.randn(200, generator=g).to(dtype)
    rows = torch.randn(70, 96, generator=g).to(dtype)
    alone = invariant_linear(rows[3:4], weight, bias)
    for batch, place in ((rows[:5], 3), (rows[:33], 3), (rows.flip(0), 66)):  # other batch sizes, other places
        assert torch.equal(invariant_linear(batch, weight, bias)[place], alone[0])
    assert torch.allclose(invariant_linear(rows, weight, bias).float(), F.linear(rows, weight, bias).float(),
                          rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])  # MHA and grouped-query
def test_invariant_attention_computes_sdpa(heads):
    g = torch.Generator().manual_seed(1)
    h, hkv = heads
    q, k, v = (torch.randn(3, n, 150, 32, generator=g) for n in (h, hkv, hkv))
    pad = torch.ones(3, 150, dtype=torch.bool)
    pad[1, :40] = False  # a left-padded row
    mask = torch.ones(150, 150, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    mask = mask | torch.eye(150, dtype=torch.bool)  # a pad query sees itself, as the model builds it
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}):
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=h != hkv, **kwargs)
        got = invariant_attention(q, k, v, enable_gqa=h != hkv, **kwargs)
        real = pad[:, None, :, None] if "attn_mask" in kwargs else torch.ones(1, dtype=torch.bool)
        assert torch.allclose(got * real, want * real, atol=1e-5), kwargs  # pad queries' outputs are unused


def test_a_query_sees_the_same_sums_alone_against_a_cache_as_inside_the_whole_sequence():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(3))
    whole = invariant_attention(q, k, v, is_causal=True)  # every position at once, keys past it masked
    for pos in (0, 63, 64, 130, 199):  # one query against the pos + 1 keys a cache holds, across tile edges
        alone = invariant_attention(q[:, :, pos : pos + 1], k[:, :, : pos + 1], v[:, :, : pos + 1])
        assert torch.equal(alone[:, :, 0], whole[:, :, pos]), pos
    left_padded = torch.cat([torch.zeros(1, 2, 37, 16), k[:, :, :100]], dim=2), torch.cat(
        [torch.zeros(1, 2, 37, 16), v[:, :, :100]], dim=2
    )
    seen = torch.ones(1, 1, 1, 137, dtype=torch.bool)
    seen[..., :37] = False  # 37 pads before the row's first real key: tile edges stay at its first key
    shifted = invariant_attention(q[:, :, 99:100], *left_padded, attn_mask=seen)
    assert torch.equal(shifted[:, :, 0], whole[:, :, 99])


def _exact_model(dtype: torch.dtype, exact: bool = True):
    model = tiny_model("small", seed=0).to(dtype)
    model.config.exact_mode = exact
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE], ids=["fixed", "adaptive"])
def test_exact_mode_rollout_logprobs_equal_the_training_forward_bit_for_bit(dtype, depth):
    model = _exact_model(dtype)
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=3, ignore_eos=True)
    records = TorchEngine(model, max_batch_size=5).generate(mixed_prompts(6, high=70), sampling, depth)
    exits = {s for r in records for s in r.exit_steps[:-1]}
    assert depth.policy == "fixed" or len(exits) >= 3  # adaptive depth really mixes exit loops here
    assert check_parity(model, records, sampling).stats().max_abs_gap == 0.0
    with torch.enable_grad():  # the training forward builds its graph: same kernels, same numbers
        assert check_parity(model, records, sampling).stats().max_abs_gap == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_mode_a_prompt_alone_and_inside_a_batch_of_32_mixed_lengths_decodes_identically(dtype):
    model = _exact_model(dtype)
    prompts = mixed_prompts(32, high=90, seed=4)
    sampling = SamplingConfig(max_new_tokens=16, seed=9, ignore_eos=True)  # prompt 0 draws the same noise
    alone = TorchEngine(model, max_batch_size=1).generate(prompts[:1], sampling)[0]
    batched = TorchEngine(model, max_batch_size=32).generate(prompts, sampling)[0]
    assert batched.completion_ids == alone.completion_ids
    assert batched.logprobs == alone.logprobs  # bitwise: float lists compare exactly


def test_the_mode_swaps_only_linear_and_attention():
    x = torch.randn(5, 8)
    with BatchInvariantMode():
        assert torch.equal(x.exp(), torch.exp(x)) and torch.equal(x @ x.t(), torch.mm(x, x.t()))
        y = F.linear(x, torch.eye(8))
    assert torch.equal(y, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="exact mode on GPU: needs CUDA (none here)")
@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE], ids=["fixed", "adaptive"])
def test_exact_mode_on_gpu_rollout_equals_the_training_forward(depth):
    """The same design on CUDA: fixed tiles give cuBLAS one kernel shape whatever the batch."""
    model = _exact_model(torch.bfloat16).cuda()
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=3, ignore_eos=True)
    records = TorchEngine(model, max_batch_size=5).generate(mixed_prompts(6, high=70), sampling, depth)
    assert check_parity(model, records, sampling).stats().max_abs_gap == 0.0
