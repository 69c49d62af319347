"""`run.py rollout`, `run.py parity` and `run.py bench` end to end on a tiny random model (in-process engine)."""

from __future__ import annotations

import json

import pytest

from bench.rollout_bench import RolloutBenchConfig
from bench.run import BenchConfig, run_bench
from rollout.cli import RandomModelConfig
from run import main

TINY = ["init_random.vocab_size=128", "init_random.hidden_size=32", "init_random.intermediate_size=64"]


def test_run_py_rollout_writes_one_record_per_line(tmp_path):
    out = tmp_path / "r.jsonl"
    argv = ["rollout", "--config", "configs/rollout_tiny.yaml", "engine=torch", f"model={tmp_path / 'm'}",
            f"output={out}", "prompts.count=3", "sampling.n=2", "sampling.max_new_tokens=5", *TINY]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert all(len(r["completion_ids"]) == len(r["logprobs"]) == len(r["exit_steps"]) == 5 for r in rows)
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "r.config.yaml").exists()


def test_run_py_parity_prints_and_saves_the_gaps_per_policy(tmp_path, capsys):
    report = tmp_path / "p.json"
    argv = ["parity", "--config", "configs/parity_tiny.yaml", "engine=torch", f"model={tmp_path / 'm'}",
            f"output={report}", "prompts.count=4", "sampling.max_new_tokens=6", *TINY]
    assert main(argv) == 0
    saved = json.loads(report.read_text())
    assert saved["overall"]["max_abs_gap"] <= 1e-5 and saved["overall"]["tokens"] == 3 * 4 * 2 * 6
    assert saved["policies"]["fixed(num_loops=T),kv=last"]["exact_replay"] is False
    assert "overall (full-cache policies)" in capsys.readouterr().out


def test_parity_fails_loudly_above_the_tolerance(tmp_path):
    argv = ["parity", "--config", "configs/parity_tiny.yaml", "engine=torch", f"model={tmp_path / 'm'}",
            "output=null", "prompts.count=2", "sampling.max_new_tokens=4", "max_gap=0.0", *TINY]
    with pytest.raises(SystemExit, match="parity FAILED"):
        main(argv)


def test_missing_model_folder_without_init_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["rollout", f"model={tmp_path / 'none'}", "engine=torch"])


def test_bench_runs_its_rollout_benchmark_by_name(tmp_path):
    bench = RolloutBenchConfig(
        model=str(tmp_path / "m"), init_random=RandomModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64),
        batch_sizes=[2], max_new_tokens=3, variable_max_new_tokens=6, stop_ids=8, pool_actors=[], repeats=1,
    )
    results = run_bench(BenchConfig(benchmarks=["rollout"], rollout=bench, output_dir=str(tmp_path / "out")))["rollout"]
    assert [r["workload"] for r in results["engine_vs_generate"]] == ["fixed-length", "variable-length"]
    assert all(r["ours_tok_s"] > 0 and r["generate_tok_s"] > 0 for r in results["engine_vs_generate"])
    full, *shared = results["kv_bytes_per_token"]
    assert full["measured"] == full["bytes_per_token"] == 4 * shared[0]["bytes_per_token"]
    assert (tmp_path / "out" / "rollout.json").exists()
    with pytest.raises(ValueError, match="unknown benchmark"):
        BenchConfig(benchmarks=["nope"])
