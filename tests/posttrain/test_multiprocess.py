"""Several training processes, one rollout pool: 2 processes (torchrun, gloo) = 1 process at the same global batch.

The runs go through `run.py grpo` in subprocesses, as a user launches them; FSDP2's state-dict gathering (the
weights the pool gets under FSDP) runs in 2 spawned gloo processes. Each run takes about 20-30 s here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from configs import UserError
from looplm.tiny import tiny_model
from posttrain.distributed import SharedEngine, check_launch, full_state_dict
from rollout.engine import SamplingConfig
from rollout.torch_engine import TorchEngine
from tests.helpers import save_policy

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def grpo_config(model_dir: Path, out: Path, per_device_batch: int) -> dict:
    """A 3-step run with a reward that varies inside every group (the depth charge of each completion), so the
    weights move every step."""
    return {
        "model": {"path": str(model_dir)},
        "data": {"synthetic_rows": 128, "eval_rows": 8},
        "rollout": {"engine": "pool", "depth": {"policy": "adaptive", "exit_threshold": 0.6},
                    "pool": {"num_actors": 2, "threads_per_actor": 1, "num_cpus": 2}},
        "rewards": {"names": ["dapo_reward", "depth_penalty"], "options": {"alpha": 0.5}},
        "eval": {"num_prompts": 0},
        "training": {
            "output_dir": str(out), "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
            "report_to": "none", "per_device_train_batch_size": per_device_batch, "num_generations": 4,
            "max_completion_length": 12, "max_steps": STEPS, "logging_steps": 1, "save_strategy": "no",
            "learning_rate": 3e-4, "seed": 0, "disable_tqdm": True,
        },
    }


def launch(tmp_path: Path, model_dir: Path, processes: int, fsdp: bool = False) -> tuple[Path, str]:
    """Run `run.py grpo` in `processes` processes at a global batch of 16 completions -> (output folder, log).
    fsdp: accelerate's FSDP2 launch on GPUs (configs/accelerate/fsdp2_gpus.yaml) instead of torchrun on CPU."""
    out = tmp_path / f"out_{processes}{'_fsdp' if fsdp else ''}"
    config = tmp_path / f"{out.name}.yaml"
    settings = grpo_config(model_dir, out, 16 // processes)
    settings["training"]["use_cpu"] = not fsdp
    config.write_text(yaml.safe_dump(settings))
    if fsdp:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/fsdp2_gpus.yaml"), "--num_processes", str(processes),
                  "--mixed_precision", "no"]
    elif processes > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    else:
        prefix = [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [*prefix, str(REPO / "run.py"), "grpo", "--config", str(config)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    return out, log


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("multiprocess")
    model_dir = save_policy(tmp / "policy")
    return {n: launch(tmp, model_dir, n) for n in (1, 2)}


def test_two_processes_share_one_pool_and_log_each_step_once(runs):
    out, log = runs[2]
    assert [row["step"] for row in metrics(out)] == list(range(1, STEPS + 1))
    assert log.count("rollout pool: started a private local Ray") == 1, log[-3000:]
    assert log.count("rollout pool: 2 actors on") == 1
    assert log.count("# run.py grpo: ") == 1  # the config summary, from rank 0 only
    assert log.count("2 training processes (MULTI_CPU) share the main process's rollout engine") == 1
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log
    assert json.loads((out / "results.json").read_text())["processes"] == 2


def test_two_processes_equal_one_process_at_the_same_global_batch(runs):
    """Same prompts, completions (hence rewards and depths) and parity per step; weights equal to float noise
    (DDP averages two half-batch gradients where one process sums the whole batch: rounding only)."""
    one, two = metrics(runs[1][0]), metrics(runs[2][0])
    for a, b in zip(one, two, strict=True):
        for key in ("reward_mean", "reward_std", "mean_exit_loop", "truncated_frac", "completions/mean_length"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        assert a["parity_max_abs"] <= 1e-5 and b["parity_max_abs"] <= 1e-5
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    start = load_file(str(runs[1][0].parent / "policy" / "model.safetensors"))
    w1 = load_file(str(runs[1][0] / "model" / "model.safetensors"))
    w2 = load_file(str(runs[2][0] / "model" / "model.safetensors"))
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    gap = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"\n[1 vs 2 processes] weights moved {moved:.3e}, max |w1 - w2| {gap:.3e}")
    assert moved > 1e-4, "the weights barely moved: the comparison would show nothing"
    assert gap <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 training needs 2 CUDA devices (transformers' Trainer "
                    "runs FSDP only off CPU); the gathering it syncs with is tested on CPU below")
def test_fsdp2_on_two_gpus_equals_one_process(tmp_path):
    """FSDP2 over 2 GPUs: the pool (on CPU actors) gets the gathered full weights every step, so the per-step
    rewards and depths match a 1-process run while the weights move."""
    model_dir = save_policy(tmp_path / "policy")
    one, _ = launch(tmp_path, model_dir, 1)
    two, log = launch(tmp_path, model_dir, 2, fsdp=True)
    assert "2 training processes (FSDP) share" in log, log[-3000:]
    first_one, first_two = metrics(one)[0], metrics(two)[0]  # the same weights sampled: the same batch
    assert first_one["reward_mean"] == first_two["reward_mean"]
    assert first_one["mean_exit_loop"] == first_two["mean_exit_loop"]
    assert [row["step"] for row in metrics(two)] == list(range(1, STEPS + 1))
    assert all(row["parity_max_abs"] <= 1e-4 for row in metrics(two))  # GPU trainer vs CPU actors, fp32


def test_a_launch_the_training_arguments_do_not_see_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="2 processes were launched but training sees one"):
        check_launch(world_size=1, use_cpu=False)
    check_launch(world_size=2, use_cpu=True)  # seen: fine


def test_shared_engine_in_one_process_is_the_engine():
    engine = TorchEngine(tiny_model("test", seed=0))
    shared = SharedEngine(engine)
    sampling = SamplingConfig(n=2, max_new_tokens=6, seed=3)
    prompts = [[5, 6, 7], [8, 9]]
    assert [r.completion_ids for r in shared.generate(prompts, sampling)] == [
        r.completion_ids for r in engine.generate(prompts, sampling)
    ]
    shared.load_weights(engine.model.state_dict(), version=4)
    assert shared.policy_version == engine.policy_version == 4
    with pytest.raises(ValueError, match="owns the engine"):
        SharedEngine(None, rank=0)


# ----------------------------------------------------------------------------------------------------------
# FSDP2: the full weights the pool gets, gathered from shards (2 gloo processes on CPU)


def _gather_shards(rank: int, world: int, port: int, result: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = tiny_model("test", seed=0)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = sum(p.to_local().numel() for p in model.parameters())
        state = full_state_dict(model)
        if rank == 0:
            result["keys_equal"] = sorted(state) == sorted(reference)
            result["max_diff"] = max((state[k] - reference[k]).abs().max().item() for k in reference)
            result["local_fraction"] = sharded / sum(v.numel() for v in reference.values())
        else:
            result["other_rank_empty"] = len(state) == 0
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_shards_gather_into_the_full_state_dict_on_rank_0():
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_gather_shards, args=(2, free_port(), result), nprocs=2, join=True)
        result = dict(result)
    assert result["keys_equal"] and result["max_diff"] == 0.0, result
    assert result["local_fraction"] < 0.75, "each rank should hold a shard, not the whole model"
    assert result["other_rank_empty"]
