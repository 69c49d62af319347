"""The decode fast path (`decode_step` over a SlotKVCache) against the model's cached forward, per depth rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from looplm import LoopKVCache, decode
from looplm.cache import SlotKVCache
from tests.helpers import tiny_model

PROMPTS = [[5, 9, 17, 33, 8], [40, 41], [7, 3, 90, 12, 66, 2, 71, 30, 9]]
DEPTHS = [{}, {"exit_threshold": 0.6}, {"exit_hidden_eps": 0.3}]


@torch.inference_mode()
def prefill(model, prompt: list[int]) -> LoopKVCache:
    cache = LoopKVCache(model.config)
    model(torch.tensor([prompt]), cache=cache)
    return cache


@pytest.mark.parametrize("call_bytes", [0, 1e12], ids=["a-call-per-row", "one-call-over-the-gap"])
@pytest.mark.parametrize("depth", DEPTHS, ids=["fixed", "q-exit", "hidden-diff"])
@torch.inference_mode()
def test_decode_step_matches_the_cached_forward_in_any_slot(depth, call_bytes, monkeypatch):
    """Rows of different lengths in slots 3, 0 and 2 of 4 (slot 1 empty): logits and exit depths of each row equal
    a one-sequence cached forward's, with every exit loop present under Q-exit; whether attention runs a call per
    row or one call over slots 0-3 (slot 1 attended and dropped, rows masked to their lengths)."""
    monkeypatch.setattr(decode, "_CALL_BYTES", call_bytes)
    model = tiny_model()
    slots_of = [3, 0, 2]
    cache = SlotKVCache(model.config, 4, model.config.total_ut_steps, capacity=4)  # grows while decoding
    for slot, prompt in zip(slots_of, PROMPTS, strict=True):
        cache.load_prefill(slot, prefill(model, prompt), 0, len(prompt))
    references = [prefill(model, p) for p in PROMPTS]
    order = torch.tensor(slots_of).argsort()  # decode_step takes slots sorted
    slots = torch.tensor(slots_of)[order]
    exits = set()
    for step in range(6):
        tokens = torch.tensor([11 + step + 3 * i for i in range(3)])
        cache.reserve(int(cache.lengths.max()) + 1)
        out = model.decode_step(tokens[order], slots, cache, **depth)
        for j, i in enumerate(order.tolist()):
            ref = model(tokens[i].view(1, 1), cache=references[i], **depth)
            torch.testing.assert_close(out.logits[j], ref.logits[0, -1], atol=2e-5, rtol=0)
            assert int(out.exit_steps[j]) == int(ref.exit_steps[0, 0])
            exits.add(int(out.exit_steps[j]))
    assert cache.lengths.tolist() == [len(PROMPTS[1]) + 6, 0, len(PROMPTS[2]) + 6, len(PROMPTS[0]) + 6]
    if "exit_threshold" in depth:
        assert len(exits) >= 3, exits


def test_attention_segments_batch_rows_unless_their_padding_costs_more_than_a_call():
    # Four rows at one length in slots 0-3: one call. A long row among short ones: a call of its own.
    assert decode.attention_segments([0, 1, 2, 3], [50] * 4, 75) == [(0, 4, 50)]
    segments = decode.attention_segments([0, 1, 2, 3, 4], [40, 45, 300, 50, 40], 75)
    assert segments == [(0, 2, 45), (2, 3, 300), (3, 5, 50)]
    # Rows in slots 0 and 9 only (a deep loop of adaptive depth): one call would read the 8 slots between.
    assert decode.attention_segments([0, 9], [60, 60], 75) == [(0, 1, 60), (1, 2, 60)]
    # A call cost of nothing: a call per row; a cost above any padding: one call.
    assert decode.attention_segments([0, 1, 2], [10, 20, 30], 0) == [(0, 1, 10), (1, 2, 20), (2, 3, 30)]
    assert decode.attention_segments([0, 1, 2], [10, 20, 30], 1e9) == [(0, 3, 30)]
    # A large batch at one length: calls of at most _MAX_CALL_ROWS rows (planning stays linear in the rows).
    many = decode.attention_segments(list(range(100)), [50] * 100, 75)
    assert len(many) == 4 and max(end - first for first, end, _ in many) == decode._MAX_CALL_ROWS


def test_per_row_thresholds_and_fused_weights_follow_the_parameters():
    model = tiny_model()  # built outside inference_mode, as a trainer's policy is
    keys = set(model.state_dict())
    cache = SlotKVCache(model.config, 2, model.config.total_ut_steps, capacity=16)
    for slot in range(2):
        cache.load_prefill(slot, prefill(model, PROMPTS[0]), 0, len(PROMPTS[0]))
    tokens, slots = torch.tensor([3, 3]), torch.arange(2)
    out = model.decode_step(tokens, slots, cache, exit_threshold=torch.tensor([[0.0], [1.0]]))
    assert out.exit_steps.tolist() == [1, model.config.total_ut_steps]  # q = 0 exits at loop 1, q = 1 never early
    assert set(model.state_dict()) == keys  # fused weights are not parameters or buffers
    before = model.decode_step(tokens, slots, cache).logits
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # an in-place update (optimizer step, load_state_dict)
    cache.lengths -= 1  # decode the same position again
    after = model.decode_step(tokens, slots, cache).logits
    assert (after - before).abs().max() > 1e-3


@torch.inference_mode()
def test_per_token_q_of_one_never_exits_early_in_the_forward_or_the_decode_step():
    """A saturated gate makes C(1) round to 1: a per-token q of 1 must still run every loop, in both paths
    (sampled exits pass per-token q tensors), and any q below 1 exits at loop 1 in both."""
    model = tiny_model()
    model.model.early_exit_gate.bias.fill_(40.0)  # sigmoid(40) == 1.0 in fp32
    T = model.config.total_ut_steps
    ids = torch.tensor([PROMPTS[0]])
    for q, expected in ((1.0, T), (0.99, 1)):
        out = model(ids, exit_threshold=torch.full(ids.shape, q))
        assert out.exit_steps.eq(expected).all(), (q, out.exit_steps)
        cache = SlotKVCache(model.config, 1, T, capacity=16)
        cache.load_prefill(0, prefill(model, PROMPTS[0]), 0, len(PROMPTS[0]))
        step = model.decode_step(torch.tensor([3]), torch.arange(1), cache, exit_threshold=torch.tensor([[q]]))
        assert step.exit_steps.tolist() == [expected]


@torch.inference_mode()
def test_attention_over_the_past_and_the_new_key_equals_attention_over_both():
    """The compiled step's attention (the new K/V not yet in the cache) against SDPA over past + new, with GQA and
    a mask; and the written-out form (off CPU) against the CPU kernel, log-sum-exp included."""
    g = torch.Generator().manual_seed(0)
    b, H, Hkv, n, d = 3, 4, 2, 7, 16
    q, k, v = (torch.randn(b, h, d, generator=g) for h in (H, Hkv, Hkv))
    k_past, v_past = torch.randn(2, b, Hkv, n, d, generator=g)
    held = torch.tensor([7, 2, 5])  # row r holds positions < held[r]
    mask = torch.zeros(b, 1, 1, n).masked_fill_(torch.arange(n) >= held[:, None, None, None], float("-inf"))
    out = decode._attend_past_and_new(q, k, v, k_past, v_past, mask)
    keys, values = torch.cat([k_past, k[:, :, None]], 2), torch.cat([v_past, v[:, :, None]], 2)
    full_mask = torch.cat([mask, torch.zeros(b, 1, 1, 1)], -1)
    expected = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=full_mask, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grouped = q.reshape(b, Hkv, H // Hkv, d)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(grouped, k_past, v_past, attn_mask=mask)
    for ours, theirs in zip(decode._attention_with_lse(grouped, k_past, v_past, mask), kernel, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_the_fast_decode_norm_equals_rms_norm():
    x, w = torch.randn(5, 64) * 3, torch.rand(64) + 0.5
    torch.testing.assert_close(decode.decode_rms_norm(x, w * 8.0, 1e-6, fast=True), decode.rms_norm(x, w, 1e-6))
    assert torch.equal(decode.decode_rms_norm(x, w, 1e-6, fast=False), decode.rms_norm(x, w, 1e-6))
