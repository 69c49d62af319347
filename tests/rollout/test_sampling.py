"""The sampling math shared by the engine and the parity check, and the request checks."""

from __future__ import annotations

import pytest
import torch

from rollout.engine import (
    DepthConfig,
    ModelLimits,
    SamplingConfig,
    _mix32,
    gumbel_noise,
    prepare_request,
    processed_logprobs,
    request_keys,
    sample_tokens,
)
from rollout.torch_engine import TorchEngine
from tests.helpers import small_model

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def kept(logp: torch.Tensor) -> list[int]:
    return torch.isfinite(logp[0]).nonzero()[:, 0].tolist()


def test_temperature_scales_logits_and_distribution_normalises():
    logp = processed_logprobs(LOGITS, SamplingConfig(temperature=0.5))
    torch.testing.assert_close(logp, (LOGITS / 0.5).log_softmax(-1))
    # Greedy keeps the temperature-1 distribution for its log-probs.
    torch.testing.assert_close(processed_logprobs(LOGITS, SamplingConfig(temperature=0)), LOGITS.log_softmax(-1))


def test_top_k_top_p_min_p_filter_then_renormalise():
    assert kept(processed_logprobs(LOGITS, SamplingConfig(top_k=2))) == [0, 1]
    probs = LOGITS.softmax(-1)[0]  # 0.56, 0.21, 0.13, 0.08, 0.03, 0.004
    # top_p: the smallest prefix reaching p; the boundary token is included.
    assert kept(processed_logprobs(LOGITS, SamplingConfig(top_p=float(probs[0]) + 1e-3))) == [0, 1]
    assert kept(processed_logprobs(LOGITS, SamplingConfig(top_p=0.01))) == [0]
    # min_p: drop tokens below min_p * p_max.
    assert kept(processed_logprobs(LOGITS, SamplingConfig(min_p=0.2))) == [0, 1, 2]
    logp = processed_logprobs(LOGITS, SamplingConfig(top_k=3, top_p=0.9, min_p=0.05))
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0))


def test_gumbel_sampling_follows_the_processed_distribution():
    logp = processed_logprobs(LOGITS, SamplingConfig(top_k=4)).expand(40_000, -1)
    tokens = sample_tokens(logp, request_keys(7, torch.arange(40_000)), step=3, greedy=False)
    freq = torch.bincount(tokens, minlength=6).float() / 40_000
    torch.testing.assert_close(freq, logp[0].exp(), rtol=0, atol=0.01)
    assert freq[4:].sum() == 0  # filtered tokens are never drawn


def test_noise_is_a_function_of_seed_request_and_step_only():
    logp = torch.zeros(4, 50)  # uniform: the draw is the noise's argmax
    keys = request_keys(1, torch.arange(4))
    first = sample_tokens(logp, keys, 0, greedy=False)
    assert torch.equal(first, sample_tokens(logp, keys, 0, greedy=False))
    # Request 2 alone draws what it drew inside the batch.
    assert sample_tokens(logp[2:3], keys[2:3], 0, greedy=False).item() == first[2].item()
    assert not torch.equal(first, sample_tokens(logp, request_keys(2, torch.arange(4)), 0, greedy=False))
    assert not torch.equal(first, sample_tokens(logp, keys, 1, greedy=False))


def test_gumbel_noise_keeps_the_int64_hash_bits():
    """The vocabulary-wide hash runs on int32 for speed; its noise must be the int64 hash's, bit for bit, so
    a seed draws the same completions as before. Reference: the int64 formula written out."""
    keys = request_keys(3, torch.arange(64) * 1_000_003)
    steps = torch.arange(64) * 37 + 5
    vocab = 8195  # not a multiple of the vector width: the scalar tail of each kernel runs too
    tokens = torch.arange(vocab)
    h = _mix32(keys[:, None] + _mix32(steps[:, None] * 0x9E3779B1 + 0x7F4A7C15))
    h = _mix32(h ^ (tokens[None, :] * 0x85EBCA6B))
    u = ((h >> 8).float() + 0.5) / float(1 << 24)
    assert torch.equal(gumbel_noise(keys, steps, vocab), -torch.log(-torch.log(u)))
    assert torch.equal(gumbel_noise(keys[:1], 5, vocab), -torch.log(-torch.log(u[:1])))  # one step for all rows


class CountingModel(torch.nn.Module):
    """Fails the test if the engine runs the model: bad input must be refused before any work."""

    def __init__(self):
        super().__init__()
        self.inner = small_model()
        self.config = self.inner.config
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    @property
    def device(self):
        return self.inner.device


@pytest.mark.parametrize(
    ("prompts", "sampling", "depth", "message"),
    [
        ([], SamplingConfig(), None, "prompts is empty"),
        ([[5] * 256], SamplingConfig(), None, r"prompt 0 has 256 tokens: longer than the context allows \(256 positions"),
        ([[5, 6], []], SamplingConfig(), None, "prompt 1 is empty"),
        ([[5, 6]], SamplingConfig(n=0), None, r"sampling.n must be >= 1"),
        ([[5, 6]], SamplingConfig(stop_token_ids=[1024]), None, "unknown token id 1024"),
        ([[5, 6]], SamplingConfig(stop_token_ids=[-1]), None, "unknown token id -1"),
        ([[5, 6]], SamplingConfig(), DepthConfig(policy="adaptive", exit_threshold=1.5), r"q must be in \[0, 1\]"),
        ([[5, 6]], SamplingConfig(), DepthConfig(policy="adaptive", exit_threshold=-0.1), r"q must be in \[0, 1\]"),
        ([[5, 6]], SamplingConfig(top_p=0.0), None, "top_p"),
        ([[5, 6]], SamplingConfig(stop_strings=["x"]), None, "needs a tokenizer"),
        ([[5, 2000]], SamplingConfig(), None, "outside the vocabulary"),
        (["text"], SamplingConfig(), None, "needs a tokenizer"),
    ],
)
def test_bad_input_is_refused_before_any_work(prompts, sampling, depth, message):
    model = CountingModel()
    engine = TorchEngine(model)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, sampling, depth)
    assert model.calls == 0


def test_prepare_request_resolves_seed_stops_and_depth():
    limits = ModelLimits(vocab_size=100, context=50, num_loops=4, eos_token_ids=(2,))
    ids, sampling, depth = prepare_request([[5, 6]], SamplingConfig(stop_token_ids=[7]), DepthConfig(), limits)
    assert ids == [[5, 6]] and sampling.stop_token_ids == [7, 2] and depth.num_loops == 4
    assert isinstance(sampling.seed, int)
    _, sampling, _ = prepare_request([[5]], SamplingConfig(ignore_eos=True, seed=3), DepthConfig(num_loops=2), limits)
    assert sampling.stop_token_ids == [] and sampling.seed == 3
