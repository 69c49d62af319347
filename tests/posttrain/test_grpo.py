"""RLVR recipe: LoopGRPOTrainer on tiny LoopLMs (TRL's trainer tests, in spirit) and its pure functions.

Models are `looplm.tiny`'s "test" size with a tokenizer trained on the synthetic task, rollouts come from our
engine in-process (one test goes through the Ray pool), and a handful of steps run per test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl import GRPOConfig

from posttrain.grpo_recipe import (
    GRPODataSection,
    GRPOModelSection,
    GRPORecipeConfig,
    RolloutSection,
    load_grpo_data,
    load_policy,
    rollout_engine,
)
from posttrain.grpo_trainer import (
    DynamicSamplingConfig,
    LoopGRPOTrainer,
    LoopRLConfig,
    importance_weights,
    loop_credit_weights,
    parity_metrics,
    replay_exit_steps,
)
from rollout.engine import DepthConfig, RolloutRecord
from tests.helpers import (
    ADAPTIVE,
    PARITY_MAX,
    PARITY_MEAN,
    SHARED_DATA,
    grpo_args,
    length_reward,
    logged,
    make_grpo_trainer,
    save_policy,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The policy with a spread-out gate (adaptive depth exits at every loop)."""
    return save_policy(tmp_path_factory.mktemp("tiny_policy"))


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_replay_exit_steps_lines_up_with_trls_padding():
    records = [
        RolloutRecord([5, 6], [7, 8, 9], [0.0] * 3, [2, 1, 4], 0, "stop", 4),
        RolloutRecord([5, 6, 7], [8], [0.0], [4], 0, "stop", 4),
    ]
    steps = replay_exit_steps(records, prompt_width=3, completion_width=3, num_loops=4, full_depth=False)
    assert steps.tolist() == [[4, 4, 4, 2, 1, 4], [4, 4, 4, 4, 4, 4]]
    full = replay_exit_steps(records, 3, 3, 4, full_depth=True)
    assert bool((full == 4).all())


def test_loop_credit_weights():
    steps = torch.tensor([[4, 2]])
    uniform = loop_credit_weights("uniform", steps, 4)
    assert torch.allclose(uniform, torch.tensor([[[0.25] * 4, [0.5, 0.5, 0, 0]]]))
    progressive = loop_credit_weights("progressive", steps, 4, power=1.0)
    assert torch.allclose(progressive[0, 0], torch.tensor([1, 2, 3, 4]) / 10)
    gate = torch.zeros(1, 2, 4)  # lambda = 1/2 everywhere: p = (1/2, 1/4, 1/8, 1/8)
    exit_w = loop_credit_weights("exit", steps, 4, gate)
    assert torch.allclose(exit_w[0, 0], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert torch.allclose(exit_w[0, 1], torch.tensor([2 / 3, 1 / 3, 0, 0]))
    with pytest.raises(ValueError, match="unknown loop credit"):
        loop_credit_weights("bogus", steps, 4)


def test_importance_weights_truncate_and_mask():
    trainer = torch.log(torch.tensor([[0.5, 0.9]]))
    rollout = torch.log(torch.tensor([[0.1, 0.9]]))
    mask = torch.ones(1, 2)
    truncated = importance_weights(trainer, rollout, mask, "token_truncate", None, 3.0)
    assert torch.allclose(truncated, torch.tensor([[3.0, 1.0]]))
    masked = importance_weights(trainer, rollout, mask, "token_mask", None, 3.0)
    assert torch.allclose(masked, torch.tensor([[0.0, 1.0]]))
    sequence = importance_weights(trainer, rollout, mask, "sequence_truncate", None, 10.0)
    assert torch.allclose(sequence, torch.full((1, 2), 5.0))


def test_parity_metrics_ignore_padding():
    rollout = torch.tensor([[-1.0, -2.0, 0.0]])
    trainer = torch.tensor([[-1.0, -2.5, -9.0]])
    stats = parity_metrics(rollout, trainer, torch.tensor([[1, 1, 0]]))
    assert stats["parity/max_abs"] == pytest.approx(0.5)
    assert stats["parity/mean_abs"] == pytest.approx(0.25)
    assert stats["parity/kl"] > 0


# ----------------------------------------------------------------------------------------------------------
# The trainer


@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE], ids=["fixed", "adaptive"])
def test_update_replays_rollout_depths_and_logs_parity(model_dir, tmp_path, depth):
    trainer = make_grpo_trainer(model_dir, tmp_path, depth=depth)
    gate_before = {k: v.clone() for k, v in trainer.model.model.early_exit_gate.state_dict().items()}
    lm_before = trainer.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert max(logged(trainer, "parity/max_abs")) <= PARITY_MAX
    assert max(logged(trainer, "parity/mean_abs")) <= PARITY_MEAN
    exit_loop = logged(trainer, "loops/mean_exit_loop")
    assert (exit_loop[0] == 4.0) if depth.policy == "fixed" else (1.0 < exit_loop[0] < 4.0)
    for key in ("time/generate_s", "time/update_s", "rollout/tokens_per_s", "completions/truncated_frac"):
        assert logged(trainer, key), key
    # TRL's parameter test: the LM moved; the frozen gate did not.
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight, lm_before)
    for k, v in trainer.model.model.early_exit_gate.state_dict().items():
        assert torch.equal(v, gate_before[k]), k
    # Every step's rollouts were generated at that step's weights.
    assert trainer.engine.policy_version == trainer.state.global_step - 1


def test_mismatch_control_shows_its_gap(model_dir, tmp_path):
    """Adaptive rollouts updated at full depth (the Ouro authors' first attempt): the gap is large and logged."""
    trainer = make_grpo_trainer(model_dir, tmp_path, loop=LoopRLConfig(update_depth="full"), max_steps=1)
    trainer.train()
    assert logged(trainer, "parity/max_abs")[0] > 1e-2


def test_parity_guard_stops_the_run(model_dir, tmp_path):
    trainer = make_grpo_trainer(model_dir, tmp_path, loop=LoopRLConfig(update_depth="full", max_parity_gap=1e-3))
    with pytest.raises(RuntimeError, match="max_parity_gap"):
        trainer.train()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo"])
def test_every_trl_loss_type_runs_on_a_looplm(model_dir, tmp_path, loss_type):
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    trainer = make_grpo_trainer(model_dir, tmp_path, loss_type=loss_type, max_steps=1, **extra)
    before = trainer.model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert not torch.equal(trainer.model.model.layers[1].self_attn.q_proj.weight, before)


def test_loop_credit_concentrated_on_the_last_loop_is_the_standard_term(model_dir, tmp_path):
    """Progressive credit with a huge power puts all weight on the exit loop: the same log-probs as TRL's path."""
    trainer = make_grpo_trainer(model_dir, tmp_path, depth=DepthConfig(), loop=LoopRLConfig(loop_credit="progressive",
                                                                                          progressive_power=200.0))
    ids = torch.tensor([[3, 40, 41, 42, 43, 44, 45]])
    mask = torch.ones_like(ids)
    with trainer.replaying(torch.full_like(ids, 4)), torch.no_grad():
        credit, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4, None, True)
        standard = trainer._token_logps(trainer.model, ids, mask, 4, None)
    assert torch.allclose(credit, standard, atol=1e-5)
    assert entropy.shape == credit.shape and bool((entropy > 0).all())


@pytest.mark.parametrize("credit", ["uniform", "exit"])
def test_loop_credit_trains(model_dir, tmp_path, credit):
    trainer = make_grpo_trainer(model_dir, tmp_path, loop=LoopRLConfig(loop_credit=credit), max_steps=1)
    before = trainer.model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.model.embed_tokens.weight, before)


def test_dynamic_sampling_drops_and_refills_uninformative_groups(model_dir, tmp_path):
    def odd_only(completions, ground_truth, **_):
        # Groups of an even answer all score 0 (no variance); odd ones vary with the completion.
        return [float(len(c[-1]["content"]) % 5) if int(gt) % 2 else 0.0 for c, gt in zip(completions, ground_truth, strict=True)]

    trainer = make_grpo_trainer(model_dir, tmp_path, rewards=[odd_only], dynamic=DynamicSamplingConfig(enabled=True,
                                                                                                  max_retries=6))
    trainer.train()
    assert logged(trainer, "frac_reward_zero_std") == [0.0, 0.0]  # every kept group is informative
    assert sum(logged(trainer, "dynamic/dropped_groups")) > 0
    assert sum(logged(trainer, "dynamic/refilled_groups")) > 0
    assert trainer.completions_generated > 2 * 8  # the refills cost rollouts, and they are counted


def test_rollouts_through_the_ray_pool(model_dir, tmp_path):
    trainer = make_grpo_trainer(model_dir, tmp_path, engine="pool", max_steps=2)
    try:
        trainer.train()
    finally:
        trainer.engine.close()
    assert max(logged(trainer, "parity/max_abs")) <= PARITY_MAX


def test_exact_mode_parity_reads_exactly_zero_through_the_ray_pool(model_dir, tmp_path):
    """Exact mode: the actors' decode steps and the update's forward give the same log-probs, bit for bit."""
    trainer = make_grpo_trainer(model_dir, tmp_path, engine="pool", max_steps=2, exact_mode=True)
    try:
        trainer.train()
    finally:
        trainer.engine.close()
    assert logged(trainer, "parity/max_abs") == [0.0, 0.0]
    assert 1.0 < logged(trainer, "loops/mean_exit_loop")[0] < 4.0  # adaptive depth: exits at several loops


def test_dapo_schema_files_train_end_to_end(model_dir, tmp_path):
    """The DAPO authors' AIME-2024 file goes through the loader into GRPO steps (the data path is the point)."""
    aime = SHARED_DATA / "dapo" / "aime-2024.parquet"
    data = GRPODataSection(format="dapo", train=str(aime), eval_rows=4)
    train, held = load_grpo_data(data)
    assert len(train) + len(held) == 30  # 960 rows = 30 problems x 32 copies, de-duplicated
    assert "Answer:" in train[0]["prompt"][-1]["content"]
    model, tokenizer = load_policy(GRPOModelSection(path=str(model_dir)))
    trainer = LoopGRPOTrainer(
        model=model, reward_funcs=[length_reward], args=grpo_args(tmp_path, max_steps=1, max_completion_length=4),
        train_dataset=train, processing_class=tokenizer,
        engine=rollout_engine(RolloutSection(engine="torch"), model, str(model_dir), tokenizer), depth=DepthConfig(),
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_impossible_combinations_fail_at_config_time():
    with pytest.raises(ValueError, match="vLLM"):
        RolloutSection(engine="vllm", depth=ADAPTIVE)
    with pytest.raises(ValueError, match="only the full cache"):
        RolloutSection(depth=DepthConfig(kv_mode="last"))
    with pytest.raises(ValueError, match="top_p"):
        GRPORecipeConfig(training=GRPOConfig(output_dir="x", use_cpu=True, bf16=False, top_p=0.9))
    with pytest.raises(ValueError, match="data.train"):
        GRPODataSection(format="dapo")


def test_metrics_file_has_one_row_per_step(model_dir, tmp_path):
    from posttrain.grpo_recipe import MetricsFile

    trainer = make_grpo_trainer(model_dir, tmp_path)
    path = tmp_path / "metrics.jsonl"
    trainer.add_callback(MetricsFile(path))
    trainer.train()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "parity_max_abs", "parity_mean_abs", "parity_kl", "mean_exit_loop"):
        assert all(key in r for r in rows), key


def test_nonfinite_gradients_skip_the_step_then_stop_the_run(model_dir, tmp_path):
    """A NaN injected into the loss (by a hook the test puts on the model): the step is skipped, the weights stay
    finite and unchanged, and the configured number of bad steps in a row stops the run with a clear error."""
    trainer = make_grpo_trainer(model_dir, tmp_path, loop=LoopRLConfig(max_consecutive_nonfinite_steps=2), max_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poison = trainer.model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan") if m.training else out)
    with pytest.raises(RuntimeError, match="2 consecutive optimizer steps had non-finite gradients"):
        trainer.train()
    poison.remove()
    assert trainer.state.global_step == 1  # the first bad step was skipped, the second stopped the run
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


RUN_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from trl import GRPOConfig
from posttrain.grpo_recipe import GRPODataSection, GRPOModelSection, GRPORecipeConfig, RolloutSection, EvalSection, run_grpo
import posttrain.grpo_recipe
posttrain.grpo_recipe.save_config = lambda *a, **k: None  # the recipe config file is not what this test checks
# A reward with variance in every group, so the weights (and the optimizer state) change at every step.
posttrain.grpo_recipe.get_reward_funcs = lambda names, **options: [
    lambda completions, **_: [float(len(c[-1]["content"]) % 7) for c in completions]
]
model_dir, out = sys.argv[1], sys.argv[2]
run_grpo(GRPORecipeConfig(
    model=GRPOModelSection(path=model_dir),
    data=GRPODataSection(synthetic_rows=64, eval_rows=8),
    rollout=RolloutSection(engine="torch", depth=DepthConfig(policy="adaptive", exit_threshold=0.6)),
    rewards=RewardsSection(names=["dapo_reward"]),
    eval=EvalSection(num_prompts=0),
    training=GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
        num_generations=4, max_completion_length=12, max_steps=6, logging_steps=1, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, gradient_checkpointing=False, beta=0.0, seed=0, disable_tqdm=True,
        resume_from_checkpoint="latest",
    ),
))
"""


def test_killed_run_resumes_from_its_last_complete_checkpoint(model_dir, tmp_path):
    """SIGKILL after checkpoint-2, restart with the same command: steps 3-6 log what an uninterrupted run logs,
    and a half-written checkpoint (no completion marker) is set aside rather than resumed from."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text("from rollout.engine import DepthConfig\nfrom posttrain.grpo_recipe import RewardsSection\n" + RUN_SCRIPT)
    env_cmd = [sys.executable, str(script), str(model_dir)]
    repo = Path(__file__).resolve().parents[2]

    def run(out: Path, kill_after: str | None = None) -> None:
        proc = subprocess.Popen([*env_cmd, str(out)], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kill_after is None:
            assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
            return
        marker = out / kill_after / "checkpoint_complete"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert marker.exists() and not (out / "checkpoint-4").exists(), "the kill must land between checkpoints"

    run(tmp_path / "straight")
    killed = tmp_path / "killed"
    run(killed, kill_after="checkpoint-2")
    (killed / "checkpoint-4").mkdir()  # a save cut short: files but no completion marker
    (killed / "checkpoint-4" / "model.safetensors").write_bytes(b"half")
    run(killed)
    assert (killed / "checkpoint-4.incomplete").is_dir()

    def metrics(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = metrics(tmp_path / "straight"), metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing logged twice
    for a, b in zip(straight, resumed, strict=True):
        assert a["grad_norm"] > 0
        for key in ("reward_mean", "loss", "grad_norm", "parity_max_abs", "mean_exit_loop", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_lora_policy_reaches_the_engine_merged(model_dir, tmp_path):
    """With LoRA, the engine gets base + adapter merged under the checkpoint's names: step 2's rollouts come from
    the adapted policy, so parity holds there too (an unmerged engine would sample from the base model)."""
    from posttrain.recipe_parts import LoraSection, lora_config

    cfg = GRPORecipeConfig(model=GRPOModelSection(path=str(model_dir)), data=GRPODataSection(synthetic_rows=64,
                           eval_rows=8), training=grpo_args(tmp_path, max_steps=3, learning_rate=5e-2))
    train, _ = load_grpo_data(cfg.data)
    model, tokenizer = load_policy(cfg.model)
    engine = rollout_engine(RolloutSection(engine="torch"), model, str(model_dir), tokenizer)
    trainer = LoopGRPOTrainer(
        model=model, reward_funcs=[length_reward], args=cfg.training, train_dataset=train, processing_class=tokenizer,
        peft_config=lora_config(LoraSection(enabled=True, r=4, alpha=8)), engine=engine, depth=ADAPTIVE,
    )
    base = {k: v.clone() for k, v in engine.model.state_dict().items()}
    trainer.train()
    assert max(logged(trainer, "parity/max_abs")) <= PARITY_MAX
    moved = [k for k, v in engine.model.state_dict().items() if not torch.equal(v, base[k])]
    assert any("q_proj" in k for k in moved)  # the engine holds merged, adapted weights


def test_parity_reuses_trls_old_logprobs_when_generation_spans_steps(model_dir, tmp_path):
    """steps_per_generation=2: TRL computes the old log-probs itself (through our replay), and the parity check
    reads them; the gap stays at rounding and training proceeds over both steps of the generation."""
    trainer = make_grpo_trainer(model_dir, tmp_path, steps_per_generation=2, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    assert max(logged(trainer, "parity/max_abs")) <= PARITY_MAX
