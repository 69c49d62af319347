"""Rollout benchmarks, each against its baseline in the same run.

Throughput is total completion tokens / total seconds over `repeats` interleaved runs (after a warm-up), each
run with its own seed so that sampled lengths average out. In-process comparisons run on one thread and report
tokens per wall-clock second and per CPU second of the process: on a machine shared with other jobs the second
is the fair one (time spent descheduled is not counted); the pool part can only use wall-clock time.

1. our engine vs `model.generate()` on the same LoopLM and prompts, batch 1 / 8 / 32, in two workloads:
   "fixed-length" (no stop ids: every row decodes max_new_tokens, so only the decode step itself differs) and
   "variable-length" (a set of stop ids ends rows at different steps, as RL completions do; generate() keeps
   finished rows in the batch until the last one stops, our engine drops them);
2. adaptive vs fixed depth in our engine: average loops per decoded token, tokens/s;
3. the Ray pool with 1 actor vs 2 actors (same total threads, and 1 actor x 1 thread);
4. K/V bytes per token for each cache mode (formula and measured);
5. the decode step at batch 1 and 32 (fixed length, no stop): our engine, eager and with `compile_decode`, vs
   the engine before continuous batching and the decode fast path (`baseline_rev`'s rollout code, loaded from
   git history and run in the same process, on the same model) vs `generate()`;
6. the RL workload: `rl_prompts` prompts x `rl_samples` samples, variable lengths up to
   `variable_max_new_tokens`, `max(batch_sizes)` rows decoded together: ours (eager, and compiled) vs the
   baseline engine vs `generate()` (batches of that many rows, the prompt's samples side by side), and ours at
   adaptive depth (q = `exit_threshold`) against ours at fixed depth, both eager.
Throughput counts completion tokens up to and including the first stop id of each row.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cli.init import InitConfig, ensure_model
from looplm import KV_MODES, LoopKVCache, LoopLMForCausalLM
from looplm.decode import compile_decode
from rollout.engine import DepthConfig, SamplingConfig, mean_loops_per_token
from rollout.torch_engine import TorchEngine


@dataclass
class RolloutBenchConfig:
    model: str = "runs/looplm-random-10m"  # created from `init_random` if missing
    init_random: InitConfig = field(default_factory=lambda: InitConfig(size="10m", gate_std=0.1))
    # torch threads for the in-process comparisons. One, so that their CPU-time throughput (reported beside the
    # wall-clock one) stays meaningful on a machine shared with other jobs; the pool part uses `pool_threads`.
    threads: int = 1
    # Where the in-process parts run: "cuda" on a GPU machine (the pool part's actors stay on CPU), to measure
    # there what this CPU's numbers cannot tell, such as what adaptive depth saves at batch 32.
    device: str = "cpu"
    pool_threads: int = 2  # CPUs for the pool part: layouts 1 x 1, then a x (pool_threads / a) for each a
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_min_len: int = 16
    prompt_max_len: int = 64
    max_new_tokens: int = 64  # fixed-length workload
    variable_max_new_tokens: int = 256  # variable-length workload
    stop_ids: int = 128  # variable-length workload: ids 3..3+stop_ids end a row (~1.6% per token at vocab 8192)
    exit_threshold: float = 0.6  # adaptive depth's q
    rl_prompts: int = 128  # RL workload: prompts x rl_samples completions
    rl_samples: int = 4
    rl_repeats: int = 1  # the RL workload's timed runs (each one is minutes for generate())
    # The engine before continuous batching and the decode fast path, for side-by-side ratios ("" skips it).
    baseline_rev: str = "13645de"
    # decode_step and rl_workload also time our engine with `compile_decode` (its fixed-depth step as one
    # torch.compile graph; compiled during the warm-up, not timed).
    compile_decode: bool = True
    pool_prompts: int = 32
    pool_actors: list[int] = field(default_factory=lambda: [1, 2])  # [] skips the pool benchmark
    repeats: int = 4
    seed: int = 0
    parts: list[str] = field(default_factory=lambda: list(PARTS))  # which of the four to run


PARTS = ("engine_vs_generate", "adaptive_vs_fixed", "pool_actors", "kv_bytes_per_token", "decode_step", "rl_workload")


def run_rollout_bench(config: RolloutBenchConfig) -> dict[str, Any]:
    unknown = sorted(set(config.parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown rollout bench part(s) {unknown}; known: {list(PARTS)}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"rollout.device={config.device!r}, but CUDA is not available here")
    torch.set_num_threads(config.threads)
    folder = ensure_model(config.model, config.init_random)
    model = LoopLMForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(config.device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"# rollout bench: {params / 1e6:.2f}M-parameter LoopLM (T={model.config.total_ut_steps}), fp32, "
          f"{config.device}, {config.threads} threads")
    parts = {
        "engine_vs_generate": lambda: _engine_vs_generate(model, config),
        "adaptive_vs_fixed": lambda: _adaptive_vs_fixed(model, config),
        "pool_actors": lambda: _pool_actors(str(folder), model.config.vocab_size, config),
        "kv_bytes_per_token": lambda: _kv_bytes(model),
        "decode_step": lambda: _decode_step(model, config),
        "rl_workload": lambda: _rl_workload(model, config),
    }
    results: dict[str, Any] = {"parameters": params}
    results.update({name: parts[name]() for name in PARTS if name in config.parts})
    print_markdown(results)
    return results


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _prompts(count: int, config: RolloutBenchConfig, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(config.prompt_min_len, config.prompt_max_len + 1, (count,), generator=g).tolist()
    low = 3 + config.stop_ids  # prompts hold no stop id
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


@dataclass
class Timing:
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # CPU seconds of this process (all its threads)
    tokens: int = 0


def _timed(fns: dict[str, Callable[[int], int]], repeats: int) -> dict[str, Timing]:
    """Run each contender once to warm up, then `repeats` times interleaved, repeat r with its own seed (so
    sampled lengths average out); totals over the repeats."""
    timings = {name: Timing() for name in fns}
    for fn in fns.values():
        fn(-1)
    for rep in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            timings[name].tokens += fn(rep)
            timings[name].wall += time.perf_counter() - wall
            timings[name].cpu += time.process_time() - cpu
    return timings


def _hf_generate(model: LoopLMForCausalLM, prompts: list[list[int]], max_new: int, stops: list[int], rep: int) -> int:
    """transformers' generate() with the same sampling; -> completion tokens up to each row's first stop."""
    torch.manual_seed(1000 * (rep + 1))  # rep: the repeat index (-1 for the warm-up)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.inference_mode():
        out = model.generate(
            ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=max_new, eos_token_id=stops or None, pad_token_id=0,
        )[:, width:]
    if not stops:
        return out.numel()
    is_stop = torch.isin(out, torch.tensor(stops, device=out.device))
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, out.shape[1])
    return int(lengths.sum())


def _ours(engine, prompts, sampling: SamplingConfig, depth: DepthConfig | None = None, rep: int = 0, sink=None) -> int:
    """Generate with repeat `rep`'s seed; -> completion tokens. Timed repeats (rep >= 0) add records to `sink`."""
    sampling = dataclasses.replace(sampling, seed=sampling.seed + 1000 * (rep + 1))
    records = engine.generate(prompts, sampling, depth)
    if sink is not None and rep >= 0:
        sink.extend(records)
    return sum(len(r.completion_ids) for r in records)


# ----------------------------------------------------------------------------------------------------------
# The four benchmarks


def _engine_vs_generate(model: LoopLMForCausalLM, config: RolloutBenchConfig) -> list[dict[str, Any]]:
    rows = []
    stop_ids = list(range(3, 3 + config.stop_ids))
    workloads = [("fixed-length", config.max_new_tokens, []), ("variable-length", config.variable_max_new_tokens, stop_ids)]
    for workload, max_new, stops in workloads:
        for batch in config.batch_sizes:
            engine = TorchEngine(model, max_batch_size=batch)
            prompts = _prompts(batch, config, model.config.vocab_size, config.seed + batch)
            sampling = SamplingConfig(max_new_tokens=max_new, stop_token_ids=stops, seed=config.seed)
            timed = _timed(
                {
                    "ours": lambda rep, e=engine, p=prompts, s=sampling: _ours(e, p, s, rep=rep),
                    "generate": lambda rep, p=prompts, m=max_new, s=stops: _hf_generate(model, p, m, s, rep),
                },
                config.repeats,
            )
            row: dict[str, Any] = {"workload": workload, "batch": batch}
            for name, t in timed.items():
                row[f"{name}_tokens"], row[f"{name}_tok_s"], row[f"{name}_tok_cpu_s"] = t.tokens, t.tokens / t.wall, t.tokens / t.cpu
            row["speedup"] = row["ours_tok_s"] / row["generate_tok_s"]
            row["speedup_cpu"] = row["ours_tok_cpu_s"] / row["generate_tok_cpu_s"]
            rows.append(row)
            print(row)
    return rows


def _adaptive_vs_fixed(model: LoopLMForCausalLM, config: RolloutBenchConfig) -> list[dict[str, Any]]:
    """At batch 1 and the largest batch: the model skips deeper loops only once every row of a step exited."""
    rows = []
    for batch in sorted({min(config.batch_sizes), max(config.batch_sizes)}):
        engine = TorchEngine(model, max_batch_size=batch)
        prompts = _prompts(batch, config, model.config.vocab_size, config.seed + 1)
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, seed=config.seed)
        depths = {
            "fixed (T=4)": DepthConfig(),
            f"adaptive (q={config.exit_threshold})": DepthConfig(policy="adaptive", exit_threshold=config.exit_threshold),
        }
        records: dict[str, list] = {name: [] for name in depths}  # the timed runs' records, for their depths
        timed = _timed(
            {
                name: lambda rep, d=d, e=engine, p=prompts, s=sampling, out=records[name]: _ours(e, p, s, d, rep, out)
                for name, d in depths.items()
            },
            config.repeats,
        )
        for name in depths:
            t = timed[name]
            rows.append({
                "depth": name, "batch": batch, "loops_per_token": mean_loops_per_token(records[name]),
                "tok_s": t.tokens / t.wall, "tok_cpu_s": t.tokens / t.cpu,
            })
            print(rows[-1])
    return rows


def _pool_actors(folder: str, vocab: int, config: RolloutBenchConfig) -> list[dict[str, Any]]:
    import ray

    from rollout.pool import PoolConfig, RolloutPool

    prompts = _prompts(config.pool_prompts, config, vocab, config.seed + 2)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, seed=config.seed)
    if not config.pool_actors:
        return []
    layouts = [(1, 1)] + [(a, max(1, config.pool_threads // a)) for a in config.pool_actors]
    rows = []
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=config.pool_threads, include_dashboard=False, log_to_driver=False)
    try:
        for actors, threads in dict.fromkeys(layouts):
            with RolloutPool(folder, PoolConfig(num_actors=actors, threads_per_actor=threads)) as pool:
                timed = _timed({"pool": lambda rep, p=pool: _ours(p, prompts, sampling, rep=rep)}, config.repeats)
            t = timed["pool"]  # wall time: the work runs in the actors' processes
            rows.append({"actors": actors, "threads_per_actor": threads, "prompts": len(prompts), "tok_s": t.tokens / t.wall})
            print(rows[-1])
    finally:
        if started_ray:
            ray.shutdown()
    return rows


def _kv_bytes(model: LoopLMForCausalLM) -> list[dict[str, Any]]:
    rows = []
    ids = torch.randint(0, model.config.vocab_size, (1, 100)).to(model.device)
    for mode in KV_MODES:
        cache = LoopKVCache(model.config, mode=mode)
        with torch.inference_mode():
            model(ids[:, :90], cache=cache)
            for i in range(90, 100):  # a few decode steps, so the shared modes' commit path is measured too
                model(ids[:, i : i + 1], cache=cache)
        formula = LoopKVCache.bytes_per_token(model.config, mode)
        rows.append({"mode": mode, "bytes_per_token": formula, "measured": cache.nbytes() / ids.shape[1]})
    return rows


def _baseline_engine(rev: str) -> type | None:
    """`TorchEngine` as of git revision `rev`, with the sampling code it ran with (`rollout/engine.py` of that
    revision), loaded from history into a package of its own so that it runs beside today's engine in one
    process; the model code is today's. None (with the reason printed) without git or that revision."""
    if not rev:
        return None
    root = Path(__file__).resolve().parents[1]
    package = f"rollout_at_{rev}"
    modules = {}
    for name in ("engine", "torch_engine"):  # engine first: torch_engine imports it
        try:
            source = subprocess.run(["git", "show", f"{rev}:rollout/{name}.py"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"# baseline engine {rev!r} not available ({err}): its columns are skipped")
            return None
        module = types.ModuleType(f"{package}.{name}")
        module.__package__ = package
        sys.modules[module.__name__] = modules[name] = module
        exec(compile(source, f"{rev}:rollout/{name}.py", "exec"), module.__dict__)  # noqa: S102 - our own history
    return modules["torch_engine"].TorchEngine


def _ratio_row(timed: dict[str, Timing], row: dict[str, Any]) -> dict[str, Any]:
    """tok/s and tok per CPU second of each contender, and ours over each other one (both ways of timing)."""
    for name, t in timed.items():
        row[f"{name}_tokens"], row[f"{name}_tok_s"], row[f"{name}_tok_cpu_s"] = t.tokens, t.tokens / t.wall, t.tokens / t.cpu
    for ours in ("ours", "compiled"):
        for name in timed:
            if ours in timed and name not in ("ours", "adaptive", "compiled"):
                row[f"{ours}_over_{name}"] = row[f"{ours}_tok_s"] / row[f"{name}_tok_s"]
                row[f"{ours}_over_{name}_cpu"] = row[f"{ours}_tok_cpu_s"] / row[f"{name}_tok_cpu_s"]
    return row


def _compiled_model(model: LoopLMForCausalLM, config: RolloutBenchConfig) -> LoopLMForCausalLM | None:
    """A copy of the model whose fixed-depth decode step is compiled, its graphs (one row, several rows) built by
    a short warm-up here; None when `compile_decode` is off."""
    if not config.compile_decode:
        return None
    compiled = copy.deepcopy(model)
    compile_decode(compiled)
    for rows in (1, 2):
        prompts = _prompts(rows, config, model.config.vocab_size, config.seed + 7)
        TorchEngine(compiled, max_batch_size=rows).generate(prompts, SamplingConfig(max_new_tokens=4))
    return compiled


def _decode_step(model: LoopLMForCausalLM, config: RolloutBenchConfig) -> list[dict[str, Any]]:
    """Fixed length (no stop): every row decodes max_new_tokens, so only the step differs."""
    baseline, compiled = _baseline_engine(config.baseline_rev), _compiled_model(model, config)
    rows = []
    for batch in sorted({min(config.batch_sizes), max(config.batch_sizes)}):
        prompts = _prompts(batch, config, model.config.vocab_size, config.seed + batch)
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, seed=config.seed)
        engines = {"ours": TorchEngine(model, max_batch_size=batch)}
        if compiled is not None:
            engines["compiled"] = TorchEngine(compiled, max_batch_size=batch)
        if baseline is not None:
            engines["baseline"] = baseline(model, max_batch_size=batch)
        fns: dict[str, Callable[[int], int]] = {
            name: lambda rep, e=e, p=prompts, s=sampling: _ours(e, p, s, rep=rep) for name, e in engines.items()
        }
        fns["generate"] = lambda rep, p=prompts: _hf_generate(model, p, config.max_new_tokens, [], rep)
        rows.append(_ratio_row(_timed(fns, config.repeats), {"batch": batch}))
        print(rows[-1])
    return rows


def _rl_workload(model: LoopLMForCausalLM, config: RolloutBenchConfig) -> list[dict[str, Any]]:
    """Many prompts x samples of geometric-like lengths (stop ids), more requests than one batch holds."""
    baseline = _baseline_engine(config.baseline_rev)
    batch, n, max_new = max(config.batch_sizes), config.rl_samples, config.variable_max_new_tokens
    prompts = _prompts(config.rl_prompts, config, model.config.vocab_size, config.seed + 3)
    stops = list(range(3, 3 + config.stop_ids))
    sampling = SamplingConfig(n=n, max_new_tokens=max_new, stop_token_ids=stops, seed=config.seed)
    rows_of_samples = [p for p in prompts for _ in range(n)]

    def generate_all(rep: int) -> int:
        return sum(_hf_generate(model, rows_of_samples[i : i + batch], max_new, stops, rep)
                   for i in range(0, len(rows_of_samples), batch))

    adaptive = DepthConfig(policy="adaptive", exit_threshold=config.exit_threshold)
    fns = {
        "ours": lambda rep: _ours(TorchEngine(model, max_batch_size=batch), prompts, sampling, rep=rep),
        "adaptive": lambda rep: _ours(TorchEngine(model, max_batch_size=batch), prompts, sampling, adaptive, rep=rep),
    }
    compiled = _compiled_model(model, config)
    if compiled is not None:
        fns["compiled"] = lambda rep: _ours(TorchEngine(compiled, max_batch_size=batch), prompts, sampling, rep=rep)
    if baseline is not None:
        fns["baseline"] = lambda rep: _ours(baseline(model, max_batch_size=batch), prompts, sampling, rep=rep)
    fns["generate"] = generate_all
    # Warm-up on a few prompts only: the full workload takes minutes per contender.
    warm = dataclasses.replace(config, rl_prompts=max(1, batch // n))
    warm_prompts = _prompts(warm.rl_prompts, warm, model.config.vocab_size, config.seed + 4)
    _ours(TorchEngine(model, max_batch_size=batch), warm_prompts, sampling)
    _hf_generate(model, [p for p in warm_prompts for _ in range(n)], max_new, stops, -1)
    timed = {name: Timing() for name in fns}
    for rep in range(config.rl_repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            timed[name].tokens += fn(rep)
            timed[name].wall += time.perf_counter() - wall
            timed[name].cpu += time.process_time() - cpu
    row = _ratio_row(timed, {"prompts": len(prompts), "samples": n, "batch": batch, "max_new_tokens": max_new})
    row["adaptive_over_fixed"] = row["adaptive_tok_s"] / row["ours_tok_s"]  # ours at q = exit_threshold vs T loops
    row["adaptive_over_fixed_cpu"] = row["adaptive_tok_cpu_s"] / row["ours_tok_cpu_s"]
    print(row)
    return [row]


def print_markdown(results: dict[str, Any]) -> None:
    nan = float("nan")  # a contender the run left out
    tables = {
        "engine_vs_generate": (
            "| workload | batch | ours tok/s | generate() tok/s | ours / generate() | same, per CPU second |",
            lambda r: f"| {r['workload']} | {r['batch']} | {r['ours_tok_s']:.0f} | {r['generate_tok_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['speedup_cpu']:.2f}x |",
        ),
        "adaptive_vs_fixed": (
            "| depth | batch | loops per decoded token | tok/s | tok per CPU second |",
            lambda r: f"| {r['depth']} | {r['batch']} | {r['loops_per_token']:.2f} | {r['tok_s']:.0f} | "
            f"{r['tok_cpu_s']:.0f} |",
        ),
        "pool_actors": (
            "| actors x threads | prompts | tok/s |",
            lambda r: f"| {r['actors']} x {r['threads_per_actor']} | {r['prompts']} | {r['tok_s']:.0f} |",
        ),
        "kv_bytes_per_token": (
            "| KV mode | bytes per token (formula) | measured |",
            lambda r: f"| {r['mode']} | {r['bytes_per_token']} | {r['measured']:.0f} |",
        ),
        "decode_step": (
            "| batch | ours tok/s | compiled tok/s | baseline tok/s | generate() tok/s | ours / baseline | "
            "same, per CPU s | compiled / baseline | same, per CPU s | ours / generate() |",
            lambda r: f"| {r['batch']} | {r['ours_tok_s']:.0f} | {r.get('compiled_tok_s', nan):.0f} | "
            f"{r.get('baseline_tok_s', nan):.0f} | {r['generate_tok_s']:.0f} | {r.get('ours_over_baseline', nan):.2f}x | "
            f"{r.get('ours_over_baseline_cpu', nan):.2f}x | {r.get('compiled_over_baseline', nan):.2f}x | "
            f"{r.get('compiled_over_baseline_cpu', nan):.2f}x | {r['ours_over_generate']:.2f}x |",
        ),
        "rl_workload": (
            "| prompts x samples | batch | ours tok/s | baseline tok/s | generate() tok/s | ours / baseline | "
            "same, per CPU s | ours / generate() | same, per CPU s | ours adaptive tok/s | adaptive / fixed | "
            "same, per CPU s | compiled (fixed) tok/s | compiled / generate() |",
            lambda r: f"| {r['prompts']} x {r['samples']} | {r['batch']} | {r['ours_tok_s']:.0f} | "
            f"{r.get('baseline_tok_s', nan):.0f} | {r['generate_tok_s']:.0f} | "
            f"{r.get('ours_over_baseline', nan):.2f}x | {r.get('ours_over_baseline_cpu', nan):.2f}x | "
            f"{r['ours_over_generate']:.2f}x | {r['ours_over_generate_cpu']:.2f}x | {r['adaptive_tok_s']:.0f} | "
            f"{r['adaptive_over_fixed']:.2f}x | {r['adaptive_over_fixed_cpu']:.2f}x | "
            f"{r.get('compiled_tok_s', nan):.0f} | {r.get('compiled_over_generate', nan):.2f}x |",
        ),
    }
    for name, (header, row) in tables.items():
        if results.get(name):
            columns = header.count("|") - 1
            print(f"\n{header}\n|---|" + "---:|" * (columns - 1))
            for r in results[name]:
                print(row(r))


__all__ = ["PARTS", "RolloutBenchConfig", "print_markdown", "run_rollout_bench"]
