"""The one factory for small LoopLMs built in code: tests, the demo, CPU recipes and benchmarks all use it.

    from looplm.tiny import tiny_model
    model = tiny_model("small", seed=0)                  # ~0.42M parameters, T = 4, a spread-out exit gate
    model = tiny_model("demo", vocab_size=len(tokenizer))  # the CPU recipes' model, sized to its tokenizer

Sizes (every one has T = 4 loops unless overridden):
  test   hidden 32, 2 layers, vocab 99: transformers' model-test scale (unit tests)
  small  hidden 96, 2 layers, vocab 1024: ~0.42M parameters (rollout and pool tests)
  demo   hidden 64, 2 layers, vocab from the tokenizer: the CPU recipes and the demo
  10m    hidden 320, 4 layers, vocab 8192: 10.2M parameters (parity and speed at a non-toy size)
"""

from __future__ import annotations

from typing import Any

import torch

from .configuration_looplm import LoopLMConfig
from .modeling_looplm import LoopLMForCausalLM

TINY_SIZES: dict[str, dict[str, Any]] = {
    "test": dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512),
    "small": dict(vocab_size=1024, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256),
    "demo": dict(vocab_size=384, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512),
    "10m": dict(vocab_size=8192, hidden_size=320, intermediate_size=864, num_hidden_layers=4, num_attention_heads=5,
                max_position_embeddings=1024),
}


def tiny_config(size: str = "test", **overrides: Any) -> LoopLMConfig:
    """A LoopLMConfig of one of `TINY_SIZES`, T = 4, with any field overridden."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny LoopLM size {size!r}; known sizes: {sorted(TINY_SIZES)}")
    return LoopLMConfig(**{"total_ut_steps": 4, **TINY_SIZES[size], **overrides})


def tiny_model(size: str = "test", seed: int = 0, gate_std: float | None = 1.0, **overrides: Any) -> LoopLMForCausalLM:
    """A freshly initialised LoopLM in eval mode, seeded.

    gate_std: std of the exit gate's weights. transformers' default init keeps every lambda near 0.5, so
    adaptive depth would exit at one loop everywhere; a spread of gate logits gives a mix of exit loops.
    None keeps the default init (what a recipe that trains the gate wants).
    """
    torch.manual_seed(seed)
    model = LoopLMForCausalLM(tiny_config(size, **overrides)).eval()
    if gate_std is not None:
        with torch.no_grad():
            model.model.early_exit_gate.weight.normal_(0.0, gate_std)
    return model


__all__ = ["TINY_SIZES", "tiny_config", "tiny_model"]
