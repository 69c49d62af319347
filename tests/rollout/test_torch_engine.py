"""Our engine in-process: records, batching, stopping, depth policies, and parity with the training forward."""

from __future__ import annotations

import pytest
import torch

from rollout.engine import DepthConfig, RolloutRecord, SamplingConfig, prepare_request
from rollout.parity import check_parity, replay_logprobs, token_gaps
from rollout.torch_engine import TorchEngine, _length_groups
from tests.helpers import ADAPTIVE, mixed_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = mixed_prompts(6)


def test_records_come_back_n_per_prompt_in_prompt_order(model):
    records = TorchEngine(model, max_batch_size=5).generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=7, seed=0))
    assert [r.prompt_ids for r in records] == [p for p in PROMPTS for _ in range(3)]
    for r in records:
        assert len(r.completion_ids) == len(r.logprobs) == len(r.exit_steps) == 7
        assert r.finish_reason == "length" and r.policy_version == 0 and r.num_loops == 4
        assert all(lp < 0 for lp in r.logprobs)
    assert len({tuple(r.completion_ids) for r in records}) == len(records)  # samples differ
    assert set(records[0].to_dict()) >= {"prompt_ids", "completion_ids", "logprobs", "exit_steps", "policy_version",
                                         "finish_reason"}


def test_completions_do_not_depend_on_batching_and_repeat_per_seed(model):
    sampling = SamplingConfig(n=2, max_new_tokens=10, seed=5, stop_token_ids=[7, 8, 9])
    one = TorchEngine(model, max_batch_size=1).generate(PROMPTS, sampling)
    many = TorchEngine(model, max_batch_size=12).generate(PROMPTS, sampling)
    assert [r.completion_ids for r in one] == [r.completion_ids for r in many]
    other_seed = TorchEngine(model).generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=10, seed=6))
    assert [r.completion_ids for r in one] != [r.completion_ids for r in other_seed]


def test_stop_ids_end_a_row_and_freed_slots_are_refilled_from_the_queue(model, monkeypatch):
    stops = list(range(3, 300))  # ~30% per token: rows end at different steps
    prefill_rows, fed_rows = [], []
    handle = model.register_forward_pre_hook(lambda _m, args, _kwargs: prefill_rows.append(args[0].shape[0]), with_kwargs=True)
    decode_step = model.decode_step
    monkeypatch.setattr(model, "decode_step", lambda tokens, *a, **k: fed_rows.append(len(tokens)) or decode_step(tokens, *a, **k))
    try:
        records = TorchEngine(model, max_batch_size=4).generate(
            PROMPTS, SamplingConfig(n=4, max_new_tokens=30, seed=1, stop_token_ids=stops)
        )
    finally:
        handle.remove()
    stopped = [r for r in records if r.finish_reason == "stop"]
    assert stopped and all(r.completion_ids[-1] in stops for r in stopped)
    assert all(c not in stops for r in records for c in r.completion_ids[:-1])
    assert {len(r.completion_ids) for r in records} != {30}
    assert sum(prefill_rows) == len(PROMPTS)  # the n samples of a prompt share one prefill
    # Every token but each completion's last is fed back once; the 4 slots stay nearly full while 24 requests
    # queue (a batch-by-batch engine would run each batch of 4 for as long as its longest completion).
    assert sum(fed_rows) == sum(len(r.completion_ids) - 1 for r in records) and max(fed_rows) <= 4
    longest = max(len(r.completion_ids) for r in records)
    assert len(fed_rows) <= sum(fed_rows) / 4 + longest, (len(fed_rows), sum(fed_rows), longest)

def test_context_limit_caps_the_completion(model):
    prompt = list(range(3, 3 + 250))  # context 256: room for 6 tokens
    (record,) = TorchEngine(model).generate([prompt], SamplingConfig(max_new_tokens=50, seed=0))
    assert len(record.completion_ids) == 6 and record.finish_reason == "length"


@pytest.mark.parametrize(
    "depth", [DepthConfig(), DepthConfig(num_loops=2), ADAPTIVE], ids=["fixed-T", "fixed-2", "adaptive"]
)
def test_parity_with_the_training_forward_in_process(model, depth):
    sampling = SamplingConfig(n=2, max_new_tokens=24, top_p=0.9, top_k=200, min_p=0.01, seed=3, return_distributions=True)
    records = TorchEngine(model, max_batch_size=8).generate(PROMPTS, sampling, depth)
    stats = check_parity(model, records, sampling).stats()
    # Truncation is discontinuous: float noise may move a boundary token at a rare position (counted apart).
    assert stats.max_abs_gap_same_support <= 1e-5 and stats.support_changes <= 0.01 * stats.tokens, stats
    assert stats.filtered_tokens <= stats.support_changes and abs(stats.mean_kl) <= 1e-5
    fed = {e for r in records for e in r.exit_steps[:-1]}
    assert fed == ({1, 2, 3, 4} if depth.policy == "adaptive" else {depth.num_loops or 4})


def test_parity_counts_a_changed_kept_set_apart():
    rollout_dist = torch.tensor([[-0.5, -1.0, float("-inf")], [-0.2, -2.0, -3.0]]).log_softmax(-1)
    train_dist = torch.tensor([[-0.5, -1.0, -5.0], [-0.2, -2.0, -3.0]]).log_softmax(-1)  # row 0 kept one more
    record = RolloutRecord([1], [0, 1], rollout_dist.gather(-1, torch.tensor([[0], [1]]))[:, 0].tolist(), [4, 4], 0,
                           "length", 4, rollout_dist)
    stats = token_gaps([record], [train_dist]).stats()
    assert stats.support_changes == 1 and stats.max_abs_gap > 1e-3 and stats.max_abs_gap_same_support < 1e-6


def test_exit_steps_follow_the_record_convention(model):
    records = TorchEngine(model).generate(PROMPTS[:2], SamplingConfig(max_new_tokens=12, seed=2), ADAPTIVE)
    for r in records:
        assert r.exit_steps[-1] == 4  # the last token is never fed back
    # Replaying with the depths shifted by one position breaks parity: the record convention is what matches.
    sampling = SamplingConfig(max_new_tokens=12, seed=2)
    shifted = [type(r)(**{**r.__dict__, "exit_steps": r.exit_steps[1:] + [4]}) for r in records]
    assert check_parity(model, shifted, sampling).stats().max_abs_gap > 1e-3


def test_greedy_picks_the_argmax_of_the_training_forward(model):
    sampling = SamplingConfig(temperature=0, max_new_tokens=8)
    records = TorchEngine(model).generate(PROMPTS[:3], sampling)
    for r, train in zip(records, replay_logprobs(model, records, sampling), strict=True):
        assert r.completion_ids == train.argmax(-1).tolist()


def test_shared_kv_modes_decode_but_are_not_replayed_exactly(model):
    sampling = SamplingConfig(max_new_tokens=10, seed=0)
    records = TorchEngine(model).generate(PROMPTS[:3], sampling, DepthConfig(kv_mode="last"))
    assert check_parity(model, records, sampling).stats().max_abs_gap > 1e-4  # reported, never hidden


def test_load_weights_changes_outputs_and_version(model):
    engine = TorchEngine(model.__class__(model.config).eval())
    sampling = SamplingConfig(max_new_tokens=6, seed=0)
    before = engine.generate(PROMPTS[:2], sampling)
    engine.load_weights(model.state_dict(), version=3)
    after = engine.generate(PROMPTS[:2], sampling)
    assert {r.policy_version for r in after} == {3} and {r.policy_version for r in before} == {0}
    assert [r.completion_ids for r in after] == [r.completion_ids for r in TorchEngine(model).generate(PROMPTS[:2], sampling)]


def test_chat_prompts_and_stop_strings_through_the_tokenizer(model):
    tokenizer_module = pytest.importorskip("looplm.tokenizer")
    tokenizer = tokenizer_module.build_tokenizer()
    engine = TorchEngine(model, tokenizer=tokenizer)
    chat = [{"role": "user", "content": "2+2?"}]
    (record,) = engine.generate([chat], SamplingConfig(max_new_tokens=4, seed=0))
    assert record.prompt_ids == tokenizer_module.apply_chat(tokenizer, chat)
    # A stop string: generate once, then ask to stop at a piece of what came out.
    free = engine.generate(["hello"], SamplingConfig(max_new_tokens=40, seed=1, ignore_eos=True))[0]
    text = tokenizer.decode(free.completion_ids)
    needle = next(ch for ch in text[5:] if ch.strip())
    stopped = engine.generate(["hello"], SamplingConfig(max_new_tokens=40, seed=1, ignore_eos=True, stop_strings=[needle]))[0]
    assert stopped.finish_reason == "stop" and needle in tokenizer.decode(stopped.completion_ids)
    assert stopped.completion_ids == free.completion_ids[: len(stopped.completion_ids)]
    assert len(stopped.completion_ids) < len(free.completion_ids)


@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE], ids=["fixed", "adaptive"])
def test_a_request_gives_the_same_completion_whatever_its_slot_and_batch(model, depth):
    """Continuous batching moves a request between slots and batchmates (batch size, a chunk of the prompts as the
    pool hands out): same token ids and depths, log-probs within the parity bound."""
    engine = TorchEngine(model)
    prompt_ids, sampling, depth = prepare_request(
        PROMPTS, SamplingConfig(n=3, max_new_tokens=20, seed=7, stop_token_ids=list(range(3, 80))), depth,
        engine.limits,
    )
    runs = [TorchEngine(model, max_batch_size=b).generate_ids(prompt_ids, sampling, depth) for b in (1, 4, 7, 32)]
    runs.append(runs[0][:6] + TorchEngine(model, max_batch_size=5).generate_ids(prompt_ids[2:], sampling, depth, 2))
    reference = runs[0]
    assert len({len(r.completion_ids) for r in reference}) > 3  # rows finish at different steps: slots get reused
    for run in runs[1:]:
        assert [(r.completion_ids, r.exit_steps, r.finish_reason) for r in run] == [
            (r.completion_ids, r.exit_steps, r.finish_reason) for r in reference
        ]
        gaps = [abs(a - b) for r, s in zip(run, reference, strict=True) for a, b in zip(r.logprobs, s.logprobs, strict=True)]
        assert max(gaps) <= 1e-5


def test_prefill_groups_bound_the_padding_and_keep_every_prompt():
    lengths = [16, 64, 17, 40, 41, 63, 18, 39, 90, 5]
    groups = _length_groups(list(range(len(lengths))), lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert max(lengths[i] for i in g) * len(g) <= 1.1 * real  # padded tokens within 10% of the real ones
    assert len(groups) < len(lengths)  # similar lengths still share a forward
