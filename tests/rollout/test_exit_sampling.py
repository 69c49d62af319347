"""The sampled depth policy: exits drawn from the gate's exit distribution, their log-probs, and their parity.

Sampling e ~ p is Q-exit at a per-token threshold u ~ U(0, 1): checked against the distribution, against the
inverse-CDF rule on the model's own gate logits, for batch independence, and (exit log-prob parity) through the
Ray pool. The pool test uses a gate of std 0.1 (logits of order 1, as a trained gate gives); the conftest's
std-1 gate has logits of order 10, where float noise in the states is amplified ~10x in log p(e).
"""

from __future__ import annotations

from collections import Counter

import pytest
import ray
import torch

from looplm.exit_gate import exit_cdf, exit_log_pdf, exit_log_prob, exit_pdf
from looplm.exits import ExitTracker
from looplm.tiny import tiny_model
from rollout.engine import DepthConfig, SamplingConfig, exit_uniforms, gumbel_noise, request_keys
from rollout.parity import check_exit_parity, check_parity
from rollout.pool import PoolConfig, RolloutPool
from rollout.torch_engine import TorchEngine
from tests.helpers import ADAPTIVE, mixed_prompts

SAMPLED = DepthConfig(policy="sampled")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rollout/conftest.py


def test_exit_log_prob_is_the_pdf_at_the_exit_and_needs_only_the_gates_run():
    g = torch.randn(5, 4) * 2
    steps = torch.tensor([1, 2, 3, 4, 2])
    for tau in (1.0, 0.5, 3.0):
        want = exit_log_pdf(g / tau).gather(-1, (steps - 1)[:, None])[:, 0]
        assert torch.allclose(exit_log_prob(g, steps, 4, tau), want, atol=1e-6)
    # A forward that stopped after loop 2 (every token exited by then) gives the same log p for exits <= 2.
    early = torch.tensor([1, 2, 2, 1, 2])
    assert torch.allclose(exit_log_prob(g[:, :2], early, 4), exit_log_prob(g, early, 4), atol=1e-7)


def test_exit_uniforms_are_keyed_by_request_and_step_only():
    keys = request_keys(7, torch.arange(4096))
    u = exit_uniforms(keys, 3)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    assert torch.equal(exit_uniforms(keys[[5, 900, 17]], 3), u[[5, 900, 17]])  # any batch, same values
    assert not torch.equal(exit_uniforms(keys, 4), u)
    assert not torch.equal(exit_uniforms(request_keys(8, torch.arange(4096)), 3), u)
    # Independent of the token noise drawn at the same (request, step): no correlation with its uniforms.
    token_u = torch.exp(-torch.exp(-gumbel_noise(keys, 3, 1)[:, 0]))
    assert abs(torch.corrcoef(torch.stack([u, token_u]))[0, 1].item()) < 0.05


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_per_token_thresholds_sample_the_exit_distribution(tau):
    """ExitTracker with u ~ U(0, 1) per token draws its exits from p (at temperature tau)."""
    n, loops = 40_000, 4
    g = torch.tensor([-1.0, 0.3, -0.5, 2.0])
    u = exit_uniforms(request_keys(1, torch.arange(n)), 0)[:, None]  # (n, 1)
    tracker = ExitTracker((n, 1), loops, threshold=u, temperature=tau)
    h = torch.zeros(n, 1, 2)
    gates = []
    for loop in range(loops):
        gates.append(g[loop].expand(n, 1))
        tracker.step(loop, h, gates)
    freq = torch.bincount(tracker.steps.flatten(), minlength=loops + 1)[1:].float() / n
    assert torch.allclose(freq, exit_pdf(g / tau), atol=0.01), (freq, exit_pdf(g / tau))


def test_model_exits_where_its_own_cdf_first_reaches_the_threshold():
    model = tiny_model("small", gate_std=0.1)
    ids = torch.randint(3, 1024, (3, 9), generator=torch.Generator().manual_seed(0))
    u = torch.rand(3, 9, generator=torch.Generator().manual_seed(1))
    for tau in (1.0, 2.0):
        out = model(ids, exit_threshold=u, exit_temperature=tau, use_cache=False)
        cdf = exit_cdf(out.gate_logits / tau)  # (3, 9, loops run); the last loop run is the last exit
        e = out.exit_steps
        at_exit = cdf.gather(-1, (e - 1)[..., None])[..., 0]
        before = torch.where(e > 1, cdf.gather(-1, (e - 2).clamp(min=0)[..., None])[..., 0], torch.zeros_like(u))
        assert bool(((before < u) & ((at_exit >= u) | (e == 4))).all())
        assert len(set(e.flatten().tolist())) > 1
    with pytest.raises(ValueError, match="exit_threshold tensor must have shape"):
        model(ids, exit_threshold=u[:, :3], use_cache=False)
    with pytest.raises(ValueError, match=r"exit thresholds must be in \[0, 1\]"):
        model(ids, exit_threshold=u + 1, use_cache=False)


def test_sampled_rollouts_are_batch_independent_and_record_exit_logprobs():
    model = tiny_model("small", gate_std=0.1)
    prompts = mixed_prompts(5, 1, 30)
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=5)
    one = TorchEngine(model, max_batch_size=3).generate(prompts, sampling, SAMPLED)
    other = TorchEngine(model, max_batch_size=32).generate(prompts, sampling, SAMPLED)
    assert [(r.completion_ids, r.exit_steps) for r in one] == [(r.completion_ids, r.exit_steps) for r in other]
    for a, b in zip(one, other, strict=True):  # the batch shape changes the float rounding, not the draw
        assert torch.allclose(torch.tensor(a.exit_logprobs), torch.tensor(b.exit_logprobs), atol=1e-5)
    for r in one:
        assert len(r.exit_logprobs) == len(r.completion_ids) and r.exit_logprobs[-1] == 0.0
        assert all(lp <= 0.0 for lp in r.exit_logprobs)
        assert r.to_dict()["exit_logprobs"] == r.exit_logprobs
    assert any(lp < -0.1 for r in one for lp in r.exit_logprobs[:-1]), "exits should be uncertain on this gate"
    reseeded = TorchEngine(model).generate(prompts, SamplingConfig(n=2, max_new_tokens=16, seed=6), SAMPLED)
    assert [r.exit_steps for r in reseeded] != [r.exit_steps for r in one]
    # Deterministic policies make no exit decision: log-prob 0 everywhere.
    adaptive = TorchEngine(model).generate(prompts, sampling, ADAPTIVE)
    assert all(lp == 0.0 for r in adaptive for lp in r.exit_logprobs)


def test_depth_config_checks_the_exit_temperature():
    with pytest.raises(ValueError, match="depth.exit_temperature must be > 0"):
        DepthConfig(policy="sampled", exit_temperature=0.0).check()
    assert DepthConfig(policy="sampled", exit_temperature=2.0).label() == "sampled(tau=2.0)"


def test_exit_logprob_parity_through_the_pool():
    """Rollouts from 2 Ray actors at sampled depth, replayed by the training forward: tokens and exits agree."""
    model = tiny_model("small", gate_std=0.1)
    prompts = mixed_prompts(8, low=1, high=60)
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=11)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RolloutPool(model, PoolConfig(num_actors=2, threads_per_actor=1, max_batch_size=4)) as pool:
            for tau in (1.0, 2.0):
                depth = DepthConfig(policy="sampled", exit_temperature=tau)
                records = pool.generate(prompts, sampling, depth)
                exit_gap = check_exit_parity(model, records, tau)
                token = check_parity(model, records, sampling).stats()
                exits = Counter(e for r in records for e in r.exit_steps[:-1])
                print(f"\n[pool exit parity tau={tau}] max |d log p(e)| {exit_gap.max().item():.2e}, "
                      f"tokens {token.max_abs_gap:.2e}, exits {dict(sorted(exits.items()))}")
                assert exit_gap.max().item() <= 1e-5 and token.max_abs_gap <= 1e-5
                assert set(exits) == {1, 2, 3, 4}
                assert exit_gap.numel() == 2 * len(prompts) * 24
    finally:
        ray.shutdown()
