"""Asynchronous rollouts (rollout.max_staleness): batches started ahead draw the noise a synchronous run draws,
carry the policy version that made them, and are corrected by importance sampling."""

from __future__ import annotations

import pytest

from posttrain.async_rollouts import Lookahead
from posttrain.grpo_trainer import DynamicSamplingConfig, LoopRLConfig
from tests.helpers import PARITY_MAX, logged, make_grpo_trainer, save_policy

CORRECTED = LoopRLConfig(importance_sampling_correction=True)
SAME_BATCH = ("reward", "loops/mean_exit_loop", "completions/mean_length")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_policy(tmp_path_factory.mktemp("async_policy"))


def test_lookahead_serves_peeked_items_first_and_stops_at_the_end():
    items = Lookahead(iter(range(5)))
    assert items.peek(2) == [0, 1] and next(items) == 0
    assert items.peek(10) == [1, 2, 3, 4]
    assert list(items) == [1, 2, 3, 4]


def test_one_step_ahead_draws_the_synchronous_runs_batches(model_dir, tmp_path):
    """With the weights held still (learning rate 0) staleness changes nothing but the versions: the batches
    started one step ahead are the synchronous run's, step for step."""
    runs = {}
    for k in (0, 1):
        trainer = make_grpo_trainer(model_dir, tmp_path / str(k), loop=CORRECTED, max_staleness=k, learning_rate=0.0,
                               max_steps=4)
        trainer.train()
        runs[k] = trainer
    for key in SAME_BATCH:
        assert logged(runs[0], key) == logged(runs[1], key), key
    assert logged(runs[1], "rollout/staleness_max") == [0.0, 1.0, 1.0, 1.0]
    parity = logged(runs[1], "parity/max_abs")
    assert parity[0] <= PARITY_MAX and parity[1:] == [None] * 3  # only step 1's batch is fresh (TRL logs NaN as None)
    assert max(logged(runs[1], "offpolicy/max_abs")[1:]) <= PARITY_MAX  # weights unchanged: the gap stays noise


def test_stale_batches_are_corrected_and_logged_apart(model_dir, tmp_path):
    trainer = make_grpo_trainer(model_dir, tmp_path, loop=CORRECTED, max_staleness=1, max_steps=3, learning_rate=5e-2)
    trainer.train()
    assert trainer.state.global_step == 3
    assert max(logged(trainer, "rollout/staleness_max")) == 1.0
    gaps = logged(trainer, "offpolicy/max_abs")[1:]
    assert min(gaps) > 100 * PARITY_MAX, "the updates since the batch was made should show in its gap"
    ratios = logged(trainer, "sampling/importance_sampling_ratio/min")
    assert len(ratios) == 3 and min(ratios) < 1.0  # the correction weighs the stale tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loop": LoopRLConfig()}, "importance_sampling_correction"),
        ({"loop": CORRECTED, "dynamic": DynamicSamplingConfig(enabled=True)}, "dynamic_sampling"),
        ({"loop": CORRECTED, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_what_asynchronous_rollouts_do_not_support_is_refused(model_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_grpo_trainer(model_dir, tmp_path, max_staleness=1, **overrides)
