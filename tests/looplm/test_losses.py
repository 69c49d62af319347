"""The chunked per-loop cross-entropy equals the unchunked one: value and every gradient (Stage-I loss)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from looplm.losses import IGNORE_INDEX, per_loop_token_losses, stage1_loss


def _stage1(chunk_tokens: int | None, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    loops, batch, seq, width, vocab = 4, 3, 11, 16, 97
    states = [torch.randn(batch, seq, width, requires_grad=True) for _ in range(loops)]
    head = nn.Linear(width, vocab, bias=False)
    gates = torch.randn(batch, seq, loops, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, -3:] = IGNORE_INDEX  # padding
    chunk_logits = None if chunk_tokens is None else chunk_tokens * vocab
    ce, mask = per_loop_token_losses(states, head, labels, chunk_logits=chunk_logits)
    loss = stage1_loss(ce, gates, mask, beta=0.05)[0]
    grads = torch.autograd.grad(loss, [*states, head.weight, gates])
    return loss.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, 1000])
def test_chunked_loss_equals_unchunked_value_and_gradients(chunk_tokens):
    # 30 positions in all (3 x 10): chunks of 7 leave a ragged last one, 1000 is a single chunk.
    loss, grads = _stage1(chunk_tokens)
    ref_loss, ref_grads = _stage1(None)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert want.abs().max() > 0  # every input gets a gradient: the comparison can fail
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_masked_positions_have_zero_loss_and_chunk_size_is_checked():
    torch.manual_seed(0)
    head = nn.Linear(8, 13, bias=False)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    ce, mask = per_loop_token_losses([torch.randn(1, 4, 8, requires_grad=True)], head, labels, chunk_logits=2 * 13)
    assert mask.tolist() == [[False, True, True]]
    assert ce[0, 0, 0] == 0 and (ce[0, 0, 1:] > 0).all()
    with pytest.raises(ValueError, match="chunk_logits"):
        per_loop_token_losses([torch.randn(1, 4, 8, requires_grad=True)], head, labels, chunk_logits=0)


def test_the_chunk_budget_is_in_logits():
    """At Ouro's vocabulary the default is 1,024 tokens a chunk; a small vocabulary fits in one chunk."""
    from looplm.losses import DEFAULT_CHUNK_LOGITS

    assert DEFAULT_CHUNK_LOGITS // 49152 == 1024 and DEFAULT_CHUNK_LOGITS // 384 > 100_000
    # One chunk is the unchunked computation itself: bitwise the same loss and gradients.
    loss, grads = _stage1(DEFAULT_CHUNK_LOGITS // 97)
    ref_loss, ref_grads = _stage1(None)
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
