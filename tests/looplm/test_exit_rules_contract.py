"""The exit rules' contract (looplm/exits.py): for every rule, the forward and the decode fast path give the same
exit steps and the same log-probs.

Each rule decodes a few steps of rows in three slots of a SlotKVCache (`decode_step`), and every step is checked
against (a) the model's cached forward of that row under the same rule and (b) replay: one parallel forward of the
row's whole sequence with the decoded `exit_steps` (what training does). Exit steps must be equal. Log-probs: in
exact mode (batch-invariant kernels) bit for bit, as the engine's exact-mode parity test holds them; otherwise within
2e-5 (test_decode_step.py's bound for the cached forward) and 1e-5 (architecture.md's bound for replay).
"""

from __future__ import annotations

import pytest
import torch

from looplm import LoopKVCache
from looplm.cache import SlotKVCache
from tests.conftest import tiny_model

PROMPTS = [[5, 9, 17, 33, 8], [40, 41], [7, 3, 90, 12, 66, 2, 71, 30, 9]]
STEPS = 5
U = torch.tensor([0.15, 0.5, 0.85])  # sampled exits: one threshold u per row

# rule -> (the decode step's kwargs, one row's forward kwargs)
RULES = {
    "fixed": (lambda: {}, lambda row: {}),
    "q-exit": (lambda: {"exit_threshold": 0.6}, lambda row: {"exit_threshold": 0.6}),
    "sampled": (
        lambda: {"exit_threshold": U[:, None], "exit_temperature": 2.0},
        lambda row: {"exit_threshold": U[row].view(1, 1), "exit_temperature": 2.0},
    ),
    "hidden-diff": (lambda: {"exit_hidden_eps": 0.45}, lambda row: {"exit_hidden_eps": 0.45}),
}


@torch.inference_mode()
def prefill(model, prompt: list[int]) -> LoopKVCache:
    cache = LoopKVCache(model.config)
    model(torch.tensor([prompt]), cache=cache)
    return cache


def check(got: torch.Tensor, want: torch.Tensor, exact: bool, atol: float) -> None:
    if exact:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact-mode"])
@pytest.mark.parametrize("rule", list(RULES))
@torch.inference_mode()
def test_forward_and_decode_step_agree_under_every_exit_rule(rule, exact):
    model = tiny_model()
    model.config.exact_mode = exact
    T = model.config.total_ut_steps
    decode_kwargs, forward_kwargs = RULES[rule]
    cache = SlotKVCache(model.config, len(PROMPTS), T, capacity=32)
    for slot, prompt in enumerate(PROMPTS):
        cache.load_prefill(slot, prefill(model, prompt), 0, len(prompt))
    references = [prefill(model, p) for p in PROMPTS]
    slots = torch.arange(len(PROMPTS))
    fed: list[list[int]] = [[] for _ in PROMPTS]
    decoded_logp, decoded_steps = [], []
    for step in range(STEPS):
        tokens = torch.tensor([11 + step + 3 * i for i in range(len(PROMPTS))])
        out = model.decode_step(tokens, slots, cache, **decode_kwargs())
        decoded_logp.append(out.logits.float().log_softmax(-1))
        decoded_steps.append(out.exit_steps)
        for row in range(len(PROMPTS)):  # (a) the cached forward under the same rule, one row at a time
            ref = model(tokens[row].view(1, 1), cache=references[row], **forward_kwargs(row))
            assert int(out.exit_steps[row]) == int(ref.exit_steps[0, 0]), (rule, step, row)
            check(decoded_logp[-1][row], ref.logits[0, -1].float().log_softmax(-1), exact, 2e-5)
            fed[row].append(int(tokens[row]))
    steps = torch.stack(decoded_steps, 1)  # (rows, STEPS)
    if rule != "fixed":
        assert steps.unique().numel() >= 2, (rule, steps)  # the rule really mixes depths here
    for row, prompt in enumerate(PROMPTS):  # (b) replay: the decoded exit steps in one parallel forward
        ids = torch.tensor([prompt + fed[row]])
        exit_steps = torch.tensor([[T] * len(prompt) + steps[row].tolist()])
        replay = model(ids, exit_steps=exit_steps, use_cache=False).logits[0, len(prompt) :].float().log_softmax(-1)
        check(torch.stack([lp[row] for lp in decoded_logp]), replay, exact, 1e-5)
