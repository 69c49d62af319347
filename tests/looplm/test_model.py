"""The looped forward: depth semantics, cached decoding against the full forward, generate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import looplm
from looplm import LoopKVCache
from tests.helpers import decode_incrementally, tiny_model


@torch.no_grad()
def test_one_loop_is_a_plain_transformer_of_L_layers():
    model = tiny_model(total_ut_steps=1)
    ids = torch.randint(0, 99, (2, 10))
    # The same computation written out by hand: L sandwich layers, final norm, lm_head; no loop, no gate.
    backbone = model.model
    h = backbone.embed_tokens(ids)
    cos, sin = backbone.rotary_emb(torch.arange(10)[None], h.dtype)
    for layer in backbone.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = (p(x).view(2, 10, -1, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = q * cos + looplm.modeling_looplm.rotate_half(q) * sin, k * cos + looplm.modeling_looplm.rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, -1)
        h = h + layer.input_layernorm_2(attn.o_proj(a))
        h = h + layer.post_attention_layernorm_2(layer.mlp(layer.post_attention_layernorm(h)))
    expected = model.lm_head(backbone.norm(h))
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_num_loops_overrides_T_and_more_loops_change_the_output():
    looped = tiny_model(total_ut_steps=4)
    single = tiny_model(total_ut_steps=1)
    single.load_state_dict(looped.state_dict())
    ids = torch.randint(0, 99, (2, 12))
    torch.testing.assert_close(looped(ids, num_loops=1).logits, single(ids).logits, rtol=0, atol=0)
    by_depth = [looped(ids, num_loops=n).logits for n in (1, 2, 3, 4)]
    for shallow, deep in zip(by_depth, by_depth[1:], strict=False):
        assert (shallow - deep).abs().max() > 1e-3
    torch.testing.assert_close(by_depth[-1], looped(ids).logits, rtol=0, atol=0)
    assert looped(ids).gate_logits.shape == (2, 12, 4)


@torch.no_grad()
def test_exit_steps_all_T_equals_default_and_exit_at_e_reads_loop_e_state():
    model = tiny_model()
    ids = torch.randint(0, 99, (1, 9))
    full = model(ids, output_loop_states=True)
    torch.testing.assert_close(model(ids, exit_steps=torch.full((1, 9), 4)).logits, full.logits, rtol=0, atol=0)
    # Exiting every token at loop 2 is exactly running 2 loops.
    torch.testing.assert_close(
        model(ids, exit_steps=torch.full((1, 9), 2)).logits, model(ids, num_loops=2).logits, rtol=0, atol=1e-6
    )
    # The LAST token's exit never feeds any other token: its logits are the loop-e state's.
    steps = torch.full((1, 9), 4)
    steps[0, -1] = 1
    out = model(ids, exit_steps=steps)
    torch.testing.assert_close(out.logits[0, -1], model.lm_head(full.loop_hidden_states[0][0, -1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits[0, :-1], full.logits[0, :-1], rtol=0, atol=1e-6)
    # An early exit in the middle changes later tokens (their deeper loops see the exited K/V).
    steps = torch.full((1, 9), 4)
    steps[0, 3] = 1
    assert (model(ids, exit_steps=steps).logits[0, 4:] - full.logits[0, 4:]).abs().max() > 1e-4
    assert model(ids, exit_steps=steps).exit_steps.tolist() == steps.tolist()


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_exit_steps_outside_1_to_T_is_an_error(model, bad):
    ids = torch.randint(0, 99, (1, 6))
    steps = torch.full((1, 6), 2)
    steps[0, 2] = bad
    with pytest.raises(ValueError, match=r"exit_steps must be in 1\.\.4"):
        model(ids, exit_steps=steps)


def test_depth_argument_errors(model):
    ids = torch.randint(0, 99, (1, 6))
    with pytest.raises(ValueError, match="shape"):
        model(ids, exit_steps=torch.full((1, 5), 2))
    with pytest.raises(ValueError, match="integer"):
        model(ids, exit_steps=torch.full((1, 6), 2.0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model(ids, exit_threshold=1.5)
    with pytest.raises(ValueError, match="num_loops"):
        model(ids, num_loops=0)


@torch.no_grad()
@pytest.mark.parametrize("per_token_exit", [False, True])
def test_cached_decoding_reproduces_full_forward(per_token_exit):
    model = tiny_model()
    torch.manual_seed(1)
    ids = torch.randint(0, 99, (3, 40))
    steps = torch.randint(1, 5, (3, 40)) if per_token_exit else None
    if steps is not None:
        steps[:, :8] = 4  # prompt at full depth, like the rollout engine
    full = model(ids, exit_steps=steps, use_cache=False).logits
    incremental, cache = decode_incrementally(model, ids, prompt_len=8, exit_steps=steps)
    gap = (full.log_softmax(-1) - incremental.log_softmax(-1)).abs().max().item()
    assert gap <= 1e-5, gap
    assert cache.get_seq_length() == 40 and len(cache.layers) == 4 * 2


@torch.no_grad()
def test_cached_decoding_with_left_padding_matches_unpadded_rows():
    model = tiny_model()
    a, b = torch.randint(3, 99, (1, 12)), torch.randint(3, 99, (1, 7))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])  # row 1 left-padded
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits, _ = decode_incrementally(model, ids, prompt_len=9, attention_mask=mask)
    torch.testing.assert_close(logits[1, 5:], model(b).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0], model(a).logits[0], rtol=0, atol=1e-5)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_packed_rows_attend_within_their_own_sequence():
    model = tiny_model()
    a, b = torch.randint(3, 99, (1, 6)), torch.randint(3, 99, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    out = model(packed, position_ids=positions).logits
    torch.testing.assert_close(out[0, :6], model(a).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0, 6:], model(b).logits[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_adaptive_decoding_records_exits_that_replay_exactly():
    model = tiny_model()
    ids = torch.randint(3, 99, (4, 30))
    cache = LoopKVCache(model.config)
    logits = [model(ids[:, :6], cache=cache).logits]
    steps = [torch.full((4, 6), 4)]
    for i in range(6, 30):
        out = model(ids[:, i : i + 1], cache=cache, exit_threshold=0.6)
        logits.append(out.logits)
        steps.append(out.exit_steps)
    steps = torch.cat(steps, dim=1)
    assert len(steps[:, 6:].unique()) >= 2, "q should give a mix of depths on this gate"
    replay = model(ids, exit_steps=steps, use_cache=False).logits
    gap = (torch.cat(logits, 1).log_softmax(-1) - replay.log_softmax(-1)).abs().max().item()
    assert gap <= 1e-5, gap
    # The decision is Q-exit on the gate: the first loop whose CDF reaches q.
    gates = model(ids, exit_steps=steps, use_cache=False).gate_logits
    decided = looplm.q_exit_step(gates[:, 6:], 0.6)
    assert torch.equal(decided, steps[:, 6:])


@torch.no_grad()
def test_exit_threshold_one_runs_every_loop(model):
    ids = torch.randint(3, 99, (2, 8))
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(30.0)  # lambda == 1.0 in fp32
    out = model(ids, exit_threshold=1.0)
    assert out.exit_steps.eq(4).all()
    assert model(ids, exit_threshold=0.5).exit_steps.eq(1).all()


@torch.no_grad()
def test_shared_kv_modes_hold_one_plane_per_layer_and_differ_from_full():
    model = tiny_model()
    ids = torch.randint(3, 99, (2, 20))
    full = model(ids).logits
    for mode in ("last", "average", "first"):
        logits, cache = decode_incrementally(model, ids, prompt_len=5, mode=mode)
        assert len(cache.layers) == model.config.num_hidden_layers
        torch.testing.assert_close(logits[:, :5], full[:, :5], rtol=0, atol=1e-5)  # prefill is exact
        assert (logits[:, 5:] - full[:, 5:]).abs().max() > 1e-4
        assert cache.nbytes() * 4 == decode_incrementally(model, ids, 5)[1].nbytes()
    # With one loop every mode is the same cache.
    one = tiny_model(total_ut_steps=1)
    base = one(ids).logits
    for mode in ("last", "average", "first"):
        torch.testing.assert_close(decode_incrementally(one, ids, 5, mode=mode)[0], base, rtol=0, atol=1e-5)


def test_kv_bytes_per_token_is_what_the_cache_holds():
    """The formula against the bytes of the K/V tensors a decode actually leaves in the cache."""
    model = tiny_model()
    config = model.config
    ids = torch.randint(3, 99, (2, 20))
    for mode in ("full", "last", "average", "first"):
        _, cache = decode_incrementally(model, ids, prompt_len=5, mode=mode)
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert LoopKVCache.bytes_per_token(config, mode) == held / ids.numel(), mode
    assert LoopKVCache.bytes_per_token(config, "full") == 4 * LoopKVCache.bytes_per_token(config, "last")
    with pytest.raises(ValueError, match="unknown KV cache mode"):
        LoopKVCache(config, mode="half")
    with pytest.raises(ValueError, match="unknown KV cache mode"):
        LoopKVCache(config, mode="half")


@torch.no_grad()
def test_generate_greedy_matches_a_manual_greedy_loop(model):
    ids = torch.randint(3, 99, (2, 6))
    generated = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    manual = ids
    for _ in range(12):
        manual = torch.cat([manual, model(manual, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, manual)
    # Adaptive depth through generate(): prefill at full depth, then Q-exit per decoded token. The same greedy
    # loop without a cache: each fed-back token's depth is Q-exit on its own gate logits (loops before its exit
    # do not depend on where it exits), then its logits are read at that depth.
    adaptive = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, exit_threshold=0.5)
    T = model.config.total_ut_steps
    manual, steps = ids, torch.full_like(ids, T)
    for i in range(12):
        if i > 0:
            gates = model(manual, use_cache=False, exit_steps=steps).gate_logits[:, -1]  # last token run to T
            steps[:, -1] = looplm.q_exit_step(gates, 0.5)
        logits = model(manual, use_cache=False, exit_steps=steps).logits
        manual = torch.cat([manual, logits[:, -1:].argmax(-1)], dim=1)
        steps = torch.cat([steps, torch.full_like(steps[:, :1], T)], dim=1)
    assert torch.equal(adaptive, manual)
    assert not torch.equal(adaptive, generated)  # depth changed what was generated


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(3, 99, (2, 10))
    steps = torch.randint(1, 5, (2, 10))

    def grads():
        model.zero_grad()
        model(ids, labels=ids, exit_steps=steps).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_loops_after_every_token_exited_are_not_computed(model):
    calls = []
    model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(3, 99, (2, 7))
    cache = LoopKVCache(model.config)
    model(ids[:, :6], cache=cache)
    assert len(calls) == 4  # prefill: every loop
    calls.clear()
    out = model(ids[:, 6:], cache=cache, exit_steps=torch.ones(2, 1, dtype=torch.long))
    assert len(calls) == 1 and out.exit_steps.eq(1).all()
    # ... yet every (loop, layer) plane holds the new token, deeper loops its loop-1 K/V ("last exited").
    assert all(plane.get_seq_length() == 7 for plane in cache.layers)
    L = model.config.num_hidden_layers
    for loop in range(1, 4):
        assert torch.equal(cache.layers[loop * L].keys[:, :, -1], cache.layers[0].keys[:, :, -1])


@torch.no_grad()
def test_cached_decoding_is_the_same_function_in_float64():
    """fp32 gaps are rounding (they grow with trained weights); in fp64 the cached adaptive replay is exact."""
    model = tiny_model().double()
    ids = torch.randint(3, 99, (3, 30))
    steps = torch.randint(1, 5, (3, 30))
    steps[:, :6] = 4
    full = model(ids, exit_steps=steps, use_cache=False).logits.log_softmax(-1)
    incremental = decode_incrementally(model, ids, prompt_len=6, exit_steps=steps)[0].log_softmax(-1)
    assert (full - incremental).abs().max().item() <= 1e-12


def test_the_cache_keeps_transformers_old_name_with_a_warning(model):
    """transformers 5.24 renamed past_key_values -> cache; old callers (and old code in bench's baselines) work."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    new = LoopKVCache(model.config)
    model(ids[:, :5], cache=new)
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = LoopKVCache(model.config)
        model(ids[:, :5], past_key_values=old)
    torch.testing.assert_close(model(ids[:, 5:], cache=old).logits, model(ids[:, 5:], cache=new).logits)
