"""`run.py init`, `run.py rollout`, `run.py parity` and `run.py bench` end to end on a tiny random model
(in-process engine), and their bad-input errors: each names the key or file and comes before any model work."""

from __future__ import annotations

import json

import pytest
import torch

from bench.rollout_bench import RolloutBenchConfig
from bench.run import BenchConfig, run_bench
from cli.init import InitConfig, init_model
from looplm import LoopLMConfig
from looplm.tiny import tiny_config
from run import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(InitConfig(output=str(tmp_path_factory.mktemp("cli") / "m"), size="test"))


def test_run_py_init_writes_a_tiny_size_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init", "--config", "configs/init_tiny.yaml", f"output={out}", "overrides.total_ut_steps=3"]) == 0
    saved = LoopLMConfig.from_pretrained(str(out))
    expected = tiny_config("demo", total_ut_steps=3)
    assert (saved.hidden_size, saved.vocab_size, saved.total_ut_steps) == (expected.hidden_size, expected.vocab_size, 3)
    capsys.readouterr()
    assert main(["init", "--config", "configs/init_tiny.yaml", f"output={out}"]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["init", "--config", "configs/init_tiny.yaml", f"output={out}", "overwrite=true"]) == 0


def test_run_py_rollout_writes_one_record_per_line(tmp_path, model_dir):
    out = tmp_path / "r.jsonl"
    argv = ["rollout", "--config", "configs/rollout_tiny.yaml", "engine=torch", f"model={model_dir}",
            f"output={out}", "prompts.count=3", "sampling.n=2", "sampling.max_new_tokens=5"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert all(len(r["completion_ids"]) == len(r["logprobs"]) == len(r["exit_steps"]) == 5 for r in rows)
    assert (tmp_path / "r.config.yaml").exists()


def test_run_py_parity_prints_and_saves_the_gaps_per_policy(tmp_path, capsys, model_dir):
    report = tmp_path / "p.json"
    argv = ["parity", "--config", "configs/parity_tiny.yaml", "engine=torch", f"model={model_dir}",
            f"output={report}", "prompts.count=4", "sampling.max_new_tokens=6"]
    assert main(argv) == 0
    saved = json.loads(report.read_text())
    assert saved["overall"]["max_abs_gap"] <= 1e-5 and saved["overall"]["tokens"] == 3 * 4 * 2 * 6
    assert saved["policies"]["fixed(num_loops=T),kv=last"]["exact_replay"] is False
    assert "overall (full-cache policies)" in capsys.readouterr().out


def test_parity_fails_loudly_above_the_tolerance(model_dir):
    argv = ["parity", "--config", "configs/parity_tiny.yaml", "engine=torch", f"model={model_dir}",
            "output=null", "prompts.count=2", "sampling.max_new_tokens=4", "max_gap=0.0"]
    with pytest.raises(SystemExit, match="parity FAILED"):
        main(argv)


@pytest.mark.parametrize("recipe", ["rollout", "parity"])
def test_mistyped_model_folder_is_an_error_not_a_new_model(tmp_path, capsys, recipe):
    typo = tmp_path / "typo"
    assert main([recipe, "--config", f"configs/{recipe}_tiny.yaml", f"model={typo}", "engine=torch"]) == 2
    err = capsys.readouterr().err
    assert f"model: {typo}: no such folder" in err and "run.py init" in err
    assert not typo.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sampling.temperature=-1"], "key 'sampling': sampling.temperature must be >= 0, got -1"),
        (["depth.exit_threshold=1.5"], "key 'depth': depth.exit_threshold q must be in [0, 1], got 1.5"),
        (["pool.num_actors=0"], "key 'pool': pool.num_actors must be >= 1, got 0"),
        (["prompts.min_len=9", "prompts.max_len=3"], "min_len <= max_len"),
        (["engine=vllm"], "engine 'vllm' with depth adaptive(q=0.6): VLLMEngine: adaptive depth"),
        (["sampling.temprature=0.5"], "did you mean 'temperature'"),
    ],
)
def test_bad_values_fail_at_load_time_naming_the_key(tmp_path, capsys, overrides, message):
    # the model folder does not exist either: the config error must come first, before any model work
    argv = ["rollout", "--config", "configs/rollout_tiny.yaml", f"model={tmp_path / 'none'}", *overrides]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_init_rejects_an_unknown_model_field(tmp_path, capsys):
    assert main(["init", f"output={tmp_path / 'm'}", "overrides.hiden_size=8"]) == 2
    assert "overrides.hiden_size is not a LoopLMConfig field (did you mean 'hidden_size'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[1, 2, 3]\nprompt_ids: [4, 5]\n', ":2: not JSON (Expecting value, column 1)"),
        ('[1, 2]\n\n{"text": "hi"}\n', ':3: got {"text": "hi"}; expected one JSON prompt per line'),
        ("\n\n", "no prompts in it"),
    ],
)
def test_bad_prompts_file_names_file_and_line(tmp_path, model_dir, capsys, text, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    argv = ["rollout", "--config", "configs/rollout_tiny.yaml", "engine=torch", f"model={model_dir}",
            f"prompts.file={prompts}", f"output={tmp_path / 'r.jsonl'}"]
    assert main(argv) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert "prompts.txt" in err and message in err and "Traceback" not in err


def test_missing_prompts_file_is_a_config_error(tmp_path, capsys, model_dir):
    argv = ["rollout", "--config", "configs/rollout_tiny.yaml", "engine=torch", f"model={model_dir}",
            f"prompts.file={tmp_path / 'nope.jsonl'}"]
    assert main(argv) == 2
    assert "prompts.file: " in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error for a machine without CUDA")
def test_bench_on_cuda_says_so_where_there_is_no_gpu(tmp_path):
    bench = RolloutBenchConfig(model=str(tmp_path / "m"), device="cuda")
    with pytest.raises(ValueError, match="rollout.device='cuda', but CUDA is not available"):
        run_bench(BenchConfig(benchmarks=["rollout"], rollout=bench, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "m").exists()  # it stops before building a model


def test_bench_runs_its_rollout_benchmark_by_name(tmp_path):
    bench = RolloutBenchConfig(
        model=str(tmp_path / "m"), init_random=InitConfig(size="small"),  # test_compiled_decode's size: one set of compiled graphs
        batch_sizes=[2], max_new_tokens=3, variable_max_new_tokens=6, stop_ids=8, pool_actors=[], repeats=1,
        rl_prompts=3, rl_samples=2,
    )
    results = run_bench(BenchConfig(benchmarks=["rollout"], rollout=bench, output_dir=str(tmp_path / "out")))["rollout"]
    assert [r["workload"] for r in results["engine_vs_generate"]] == ["fixed-length", "variable-length"]
    assert all(r["ours_tok_s"] > 0 and r["generate_tok_s"] > 0 for r in results["engine_vs_generate"])
    (rl,) = results["rl_workload"]
    assert rl["ours_tokens"] > 0 and rl["baseline_tokens"] > 0 and rl["generate_tokens"] > 0  # the baseline loaded
    assert rl["adaptive_tokens"] > 0 and rl["adaptive_over_fixed"] > 0
    assert rl["compiled_tokens"] == rl["ours_tokens"]  # the compiled step decodes the same completions
    assert [r["batch"] for r in results["decode_step"]] == [2]
    full, *shared = results["kv_bytes_per_token"]
    assert full["measured"] == full["bytes_per_token"] == 4 * shared[0]["bytes_per_token"]
    assert (tmp_path / "out" / "rollout.json").exists()
    with pytest.raises(ValueError, match="unknown benchmark"):
        BenchConfig(benchmarks=["nope"])


def test_weight_sync_bench_puts_once_for_every_actor_and_copies_a_full_state_dict(tmp_path):
    from bench.weight_sync import WeightSyncBenchConfig

    bench = WeightSyncBenchConfig(sizes=["10m"], actors=2, repeats=1)
    results = run_bench(BenchConfig(benchmarks=["weight_sync"], weight_sync=bench, output_dir=str(tmp_path)))
    sync = results["weight_sync"]["sizes"]["10m"]
    assert sync["parameters"] > 10e6 and sync["bytes_per_sync"] == 4 * sync["parameters"]  # fp32
    assert sync["object_store"]["bytes_put"] * 2 == sync["per_actor"]["bytes_put"]
    assert sync["object_store"]["put_s"] > 0 and sync["per_actor"]["put_s"] is None
    assert all(sync[way]["total_s"] >= sync[way]["actor_copy_s"] > 0 for way in ("object_store", "per_actor"))
