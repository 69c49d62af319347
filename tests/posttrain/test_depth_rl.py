"""Depth-aware RL: the exit as part of the GRPO action, charged for compute (`rewards.depth_penalty`).

The trainer runs on `looplm.tiny`'s "test" size with a gate of std 0.3 (a mix of sampled exits), our engine
in-process, two steps per run. The Ray-pool parity of exit log-probs is in tests/rollout/test_exit_sampling.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from looplm.exit_gate import exit_log_pdf
from posttrain.grpo_recipe import (
    GRPOModelSection,
    GRPORecipeConfig,
    RewardsSection,
    RolloutSection,
)
from posttrain.grpo_trainer import (
    LoopGRPOTrainer,
    LoopRLConfig,
    exit_action_logps,
    rollout_exit_logps,
    token_exit_advantages,
)
from rewards import get_reward_funcs
from rewards.depth import depth_penalty
from rollout.engine import DepthConfig, RolloutRecord
from tests.helpers import length_reward, logged, make_grpo_trainer, save_policy

SAMPLED = DepthConfig(policy="sampled")
EXIT_PARITY_MAX = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_policy(tmp_path_factory.mktemp("depth_policy"), gate_std=0.3)


def make_trainer(model_dir, tmp_path, loop: LoopRLConfig, alpha: float = 0.0, **kwargs) -> LoopGRPOTrainer:
    """The shared trainer at sampled depth, with the depth charge (`alpha` per loop) beside the length reward."""
    rewards = [length_reward, *get_reward_funcs("depth_penalty", alpha=alpha)]
    return make_grpo_trainer(model_dir, tmp_path, depth=SAMPLED, loop=loop, rewards=rewards, **kwargs)


def params(trainer: LoopGRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_exit_logps_line_up_with_the_token_each_exit_precedes():
    """Completion token j is predicted at position P + j - 1: its exit term is that position's log p(e)."""
    gates = torch.zeros(1, 6, 4)  # lambda = 1/2: p = (1/2, 1/4, 1/8, 1/8)
    steps = torch.tensor([[4, 4, 1, 2, 3, 4]])  # prompt of 2 positions, completion of 4
    got = exit_action_logps(gates, steps, completion_width=4, num_loops=4, temperature=1.0)
    log_p = exit_log_pdf(gates[0, 0])
    # j = 0: predicted by the last prompt position (full depth, no decision); j = 1..3: exits 1, 2, 3.
    assert torch.allclose(got, torch.stack([torch.tensor(0.0), log_p[0], log_p[1], log_p[2]])[None])
    record = RolloutRecord([1, 2], [5, 6, 7, 8], [0.0] * 4, [1, 2, 3, 4], 0, "stop", 4, exit_logprobs=[-0.1, -0.2, -0.3, 0.0])
    short = RolloutRecord([1], [5, 6], [0.0] * 2, [1, 4], 0, "stop", 4, exit_logprobs=[-0.5, 0.0])
    want = torch.tensor([[0, -0.1, -0.2, -0.3], [0, -0.5, 0, 0]])
    assert torch.allclose(rollout_exit_logps([record, short], 4), want)
    with pytest.raises(ValueError, match="record 0 has no exit_logprobs"):
        rollout_exit_logps([RolloutRecord([1], [5], [0.0], [4], 0, "stop", 4)], 1)


def test_depth_penalty_charges_the_loops_that_ran():
    steps = [[1, 3, 4], [2, 2, 2, 4], [4]]  # each last token never ran
    assert depth_penalty(completions=["a", "b", "c"], exit_steps=steps, alpha=0.5) == [-1.0, -1.0, 0.0]
    assert depth_penalty(completions=["a", "b", "c"], exit_steps=steps, alpha=0.5, per="sum") == [-2.0, -3.0, 0.0]
    assert depth_penalty(completions=["a"], alpha=0.1) == [None]  # no recorded depths: the charge does not apply
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        get_reward_funcs("depth_penalty", alpha=-1.0)


def test_token_credit_charges_each_exit_its_own_loops_against_the_batch_mean():
    """Column j is the exit of completion position j - 1; column 0 (the prompt's) and padding are not charged."""
    steps = torch.tensor([[1, 3, 4, 4], [2, 4, 4, 4]])  # completion positions' exit steps (record form)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 0: 3 tokens (exits 1, 3 ran), row 1: 2 (exit 2 ran)
    got, baseline = token_exit_advantages(torch.tensor([1.0, -1.0]), steps, mask, cost=0.5)
    assert baseline == 2.0  # (1 + 3 + 2) / 3
    want = torch.tensor([[1.0, 1.5, 0.5, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.equal(got, want)


def test_impossible_depth_rl_combinations_fail_at_config_time(tmp_path):
    with pytest.raises(ValueError, match="exit_action needs rollout.depth.policy=sampled"):
        GRPORecipeConfig(loop=LoopRLConfig(exit_action=True))
    with pytest.raises(ValueError, match="lm_trainable=false leaves only the gate"):
        GRPORecipeConfig(model=GRPOModelSection(lm_trainable=False, gate_trainable=True))
    with pytest.raises(ValueError, match="exit_action needs loop.loop_credit=last"):
        LoopRLConfig(exit_action=True, loop_credit="uniform")
    with pytest.raises(ValueError, match="exit_credit=token needs loop.exit_action"):
        LoopRLConfig(exit_credit="token", exit_cost=0.1)
    with pytest.raises(ValueError, match="exit_cost is charged per exit with loop.exit_credit=token only"):
        LoopRLConfig(exit_action=True, exit_cost=0.1)
    with pytest.raises(ValueError, match="leave depth_penalty out of rewards.names"):
        GRPORecipeConfig(
            loop=LoopRLConfig(exit_action=True, exit_credit="token", exit_cost=0.1),
            rollout=RolloutSection(depth=SAMPLED), rewards=RewardsSection(names=["dapo_reward", "depth_penalty"]),
        )
    path = tmp_path / "bad.yaml"
    path.write_text("loop:\n  exit_action: true\n")
    with pytest.raises(ConfigError, match="exit_action"):
        load_config(GRPORecipeConfig, path)


# ----------------------------------------------------------------------------------------------------------
# The trainer


def test_alpha_zero_and_a_frozen_gate_give_the_plain_grpo_update(model_dir, tmp_path):
    """Same rollouts (same seed and weights), same rewards: the joint (exit, token) objective moves the LM exactly
    as the standard recipe does, because the exit term's gradient reaches the frozen gate only. Letting it reach
    the LM (exit_grad_to_lm) changes the update: the comparison can fail. Plain SGD, so the update is the gradient
    (Adam's first step divides each gradient by its own size and would blow rounding up on near-zero entries)."""
    sgd = dict(max_steps=1, optim="sgd", learning_rate=1.0)
    plain = make_trainer(model_dir, tmp_path / "plain", LoopRLConfig(), **sgd)
    joint = make_trainer(model_dir, tmp_path / "joint", LoopRLConfig(exit_action=True), **sgd)
    to_lm = make_trainer(model_dir, tmp_path / "to_lm", LoopRLConfig(exit_action=True, exit_grad_to_lm=True), **sgd)
    start = params(plain)
    for trainer in (plain, joint, to_lm):
        trainer.train()
    step = {name: {k: v - start[k] for k, v in params(t).items()} for name, t in
            (("plain", plain), ("joint", joint), ("to_lm", to_lm))}
    size = max(d.abs().max().item() for d in step["plain"].values())
    assert size > 1e-3 and not any(step["plain"][k].any() for k in start if "early_exit_gate" in k)
    gap = max((step["joint"][k] - step["plain"][k]).abs().max().item() for k in start)
    assert gap <= 1e-5 * size, (gap, size)  # rounding: the exit term is added to and cancels out of each log-ratio
    assert logged(joint, "reward") == logged(plain, "reward")
    assert max(logged(joint, "parity/exit_max_abs")) <= EXIT_PARITY_MAX
    assert max((step["to_lm"][k] - step["plain"][k]).abs().max().item() for k in start) > 1e-3 * size


def test_gate_only_depth_rl_trains_the_gate_alone_and_checks_exit_parity(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, LoopRLConfig(exit_action=True), alpha=0.5, lm=False, gate=True)
    start = params(trainer)
    trainer.train()
    after = params(trainer)
    changed = {k for k in start if not torch.equal(after[k], start[k])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert max(logged(trainer, "parity/exit_max_abs")) <= EXIT_PARITY_MAX
    assert max(logged(trainer, "parity/max_abs")) <= 1e-4
    penalty = logged(trainer, "rewards/depth_penalty/mean")
    loops = logged(trainer, "loops/mean_exit_loop")
    assert penalty and all(p < 0 for p in penalty) and 1.0 < loops[0] < 4.0
    assert trainer.engine.policy_version == trainer.state.global_step - 1  # step 2 sampled from the trained gate


def test_a_compute_charge_alone_makes_the_gate_exit_earlier(model_dir, tmp_path):
    """With only the depth penalty as reward, depth-aware RL of the gate must lower the average exit loop."""
    loop = LoopRLConfig(exit_action=True)
    trainer = make_trainer(model_dir, tmp_path, loop, alpha=1.0, lm=False, gate=True, max_steps=4, learning_rate=0.1,
                           reward_weights=[0.0, 1.0])
    trainer.train()
    loops = logged(trainer, "loops/mean_exit_loop")
    assert loops[-1] < loops[0] - 0.2, loops


def test_token_credit_alone_makes_the_gate_exit_earlier(model_dir, tmp_path):
    """Each exit charged its own loops (no reward but a zero-weighted length reward): the exits move earlier,
    and the baseline the charge is measured against is logged."""
    loop = LoopRLConfig(exit_action=True, exit_credit="token", exit_cost=1.0)
    trainer = make_grpo_trainer(model_dir, tmp_path, depth=SAMPLED, loop=loop, rewards=[length_reward], lm=False,
                                gate=True, max_steps=4, learning_rate=0.1, reward_weights=[0.0])
    trainer.train()
    loops = logged(trainer, "loops/mean_exit_loop")
    assert loops[-1] < loops[0] - 0.2, loops
    assert 1.0 < logged(trainer, "depth/exit_baseline_loops")[0] < 4.0


def test_the_gate_gets_its_own_learning_rate(model_dir, tmp_path):
    loop = LoopRLConfig(exit_action=True, gate_lr_scale=10.0)
    trainer = make_trainer(model_dir, tmp_path, loop, lm=True, gate=True, learning_rate=1e-4)
    optimizer = trainer.create_optimizer()
    gate = {id(p) for p in trainer.model.model.early_exit_gate.parameters()}
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert groups[-1] == gate and not any(g & gate for g in groups[:-1])
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-3) and optimizer.param_groups[0]["lr"] == 1e-4
    assert sum(len(g) for g in groups) == sum(p.requires_grad for p in trainer.model.parameters())
