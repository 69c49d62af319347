"""`run.py rollout` (model folder + prompts file -> JSONL of records) and `run.py parity` (generate, replay with
the training forward, print the log-prob gap and KL overall and per depth policy).

Both take a model folder. With `init_random` set and no folder there yet, a randomly initialised LoopLM of
those sizes is saved there first (seeded), so the commands run on a fresh checkout with no checkpoint.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from configs import save_config
from looplm import LoopLMConfig, LoopLMForCausalLM

from .engine import DepthConfig, Prompt, RolloutEngine, RolloutRecord, SamplingConfig, mean_loops_per_token
from .parity import TokenGaps, check_parity
from .pool import PoolConfig


@dataclass
class RandomModelConfig:
    """Sizes of a random LoopLM to create when the model folder does not exist."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    total_ut_steps: int = 4
    max_position_embeddings: int = 1024
    seed: int = 0
    gate_std: float = 1.0  # exit-gate weight std: the default init keeps every lambda near 0.5


@dataclass
class PromptsConfig:
    """A JSONL file (each line a list of ids, or {"prompt_ids"}, {"messages"} or {"prompt": text or messages}),
    or, with no file, `count` random id prompts with lengths uniform in [min_len, max_len]."""

    file: str | None = None
    count: int = 16
    min_len: int = 4
    max_len: int = 64
    seed: int = 0


@dataclass
class RolloutRecipeConfig:
    model: str = "runs/looplm-random-tiny"  # model folder
    init_random: RandomModelConfig | None = None  # create a random model there if the folder is missing
    tokenizer: str | None = None  # tokenizer folder (default: the model folder's, if it has one)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    engine: Literal["torch", "pool", "vllm"] = "pool"  # torch: in-process (max_batch_size from `pool`)
    pool: PoolConfig = field(default_factory=PoolConfig)
    output: str = "runs/rollouts.jsonl"


@dataclass
class ParityRecipeConfig:
    model: str = "runs/looplm-random-tiny"
    init_random: RandomModelConfig | None = None
    tokenizer: str | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(seed=0, return_distributions=True))
    policies: list[DepthConfig] = field(
        default_factory=lambda: [DepthConfig(), DepthConfig(policy="adaptive", exit_threshold=0.6)]
    )
    engine: Literal["torch", "pool"] = "pool"
    pool: PoolConfig = field(default_factory=PoolConfig)
    replay_batch_size: int = 8
    max_gap: float = 1e-5  # fail (exit 1) when a full-cache policy's max |dlogp| exceeds this
    output: str | None = "runs/parity.json"


# ----------------------------------------------------------------------------------------------------------
# Set-up shared by both recipes


def ensure_model(path: str, init: RandomModelConfig | None) -> Path:
    folder = Path(path)
    if (folder / "config.json").exists():
        return folder
    if init is None:
        raise FileNotFoundError(f"model folder {folder} has no config.json (set init_random to create a random one)")
    torch.manual_seed(init.seed)
    config = LoopLMConfig(
        vocab_size=init.vocab_size, hidden_size=init.hidden_size, intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers, num_attention_heads=init.num_attention_heads,
        total_ut_steps=init.total_ut_steps, max_position_embeddings=init.max_position_embeddings,
    )
    model = LoopLMForCausalLM(config)
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0.0, init.gate_std)
    model.save_pretrained(folder)
    print(f"created a random LoopLM ({_params(model) / 1e6:.2f}M parameters) in {folder}")
    return folder


def load_tokenizer(model: Path, tokenizer: str | None) -> Any:
    path = Path(tokenizer) if tokenizer else model
    if tokenizer is None and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_prompts(config: PromptsConfig, vocab_size: int) -> list[Prompt]:
    if config.file is None:
        g = torch.Generator().manual_seed(config.seed)
        lengths = torch.randint(config.min_len, config.max_len + 1, (config.count,), generator=g).tolist()
        return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
    prompts = []
    for number, line in enumerate(Path(config.file).read_text().splitlines(), 1):
        if line.strip():
            prompts.append(_prompt_from_json(json.loads(line), f"{config.file}:{number}"))
    return prompts


def _prompt_from_json(item: Any, where: str) -> Prompt:
    if isinstance(item, list):
        return item
    if isinstance(item, dict):
        for key in ("prompt_ids", "messages", "prompt"):
            if key in item:
                return item[key]
    raise ValueError(f"{where}: expected a list of ids or an object with prompt_ids / messages / prompt")


def build_engine(kind: str, model: Path, tokenizer: Any, pool: PoolConfig, depth: DepthConfig) -> RolloutEngine:
    if kind == "pool":
        from .pool import RolloutPool

        return RolloutPool(str(model), pool, tokenizer=tokenizer, depth=depth)
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer=tokenizer, depth=depth)
    from .torch_engine import TorchEngine

    return TorchEngine.from_pretrained(model, tokenizer=tokenizer, depth=depth, max_batch_size=pool.max_batch_size)


def _close(engine: RolloutEngine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# run.py rollout


def run_rollout(config: RolloutRecipeConfig) -> list[RolloutRecord]:
    folder = ensure_model(config.model, config.init_random)
    tokenizer = load_tokenizer(folder, config.tokenizer)
    prompts = load_prompts(config.prompts, LoopLMConfig.from_pretrained(str(folder)).vocab_size)
    engine = build_engine(config.engine, folder, tokenizer, config.pool, config.depth)
    try:
        start = time.perf_counter()
        records = engine.generate(prompts, config.sampling, config.depth)
        seconds = time.perf_counter() - start
    finally:
        _close(engine)
    out = Path(config.output)
    save_config(config, out.with_suffix(".config.yaml"))  # the resolved config beside the outputs
    with out.open("w") as f:
        for i, record in enumerate(records):
            row = {"prompt_index": i // config.sampling.n, "sample_index": i % config.sampling.n, **record.to_dict()}
            if tokenizer is not None:
                row["completion_text"] = tokenizer.decode(record.completion_ids)
            f.write(json.dumps(row) + "\n")
    tokens = sum(len(r.completion_ids) for r in records)
    print(f"{len(records)} completions, {tokens} tokens in {seconds:.2f}s ({tokens / seconds:.1f} tokens/s) -> {out}")
    return records


# ----------------------------------------------------------------------------------------------------------
# run.py parity


def run_parity(config: ParityRecipeConfig) -> dict[str, Any]:
    folder = ensure_model(config.model, config.init_random)
    tokenizer = load_tokenizer(folder, config.tokenizer)
    trainer_model = LoopLMForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()  # the training forward
    prompts = load_prompts(config.prompts, trainer_model.config.vocab_size)
    engine = build_engine(config.engine, folder, tokenizer, config.pool, config.policies[0])
    where = f"{config.engine}" + (f" ({config.pool.num_actors} actors)" if config.engine == "pool" else "")
    report: dict[str, Any] = {"model": str(folder), "parameters": _params(trainer_model), "engine": where, "policies": {}}
    parts: list[TokenGaps] = []
    try:
        for depth in config.policies:
            records = engine.generate(prompts, config.sampling, depth)
            gaps = check_parity(trainer_model, records, config.sampling, config.replay_batch_size)
            parts.append(gaps)
            exits = Counter(e for r in records for e in r.exit_steps)
            report["policies"][depth.label()] = {
                **gaps.stats().to_dict(),
                "exact_replay": depth.kv_mode == "full",
                "exit_steps": dict(sorted(exits.items())),
                "mean_loops_per_token": mean_loops_per_token(records),
            }
    finally:
        _close(engine)
    exact = [g for g, depth in zip(parts, config.policies, strict=True) if depth.kv_mode == "full"]
    if exact:  # the invariant covers the replayable (full-cache) policies only
        report["overall"] = TokenGaps.cat(exact).stats().to_dict()
    _print_parity(report)
    if config.output:
        save_config(config, Path(config.output).with_suffix(".config.yaml"))
        Path(config.output).write_text(json.dumps(report, indent=2) + "\n")
    failed = [
        name
        for name, s in report["policies"].items()
        if s["exact_replay"] and (s["max_abs_gap"] > config.max_gap or s["filtered_tokens"])
    ]
    if failed:
        raise SystemExit(f"parity FAILED: max |dlogp| above {config.max_gap:g} for {failed}")
    return report


def _print_parity(report: dict[str, Any]) -> None:
    print(f"parity: {report['parameters'] / 1e6:.2f}M-parameter LoopLM, rollouts from {report['engine']}")
    print(f"{'policy':32s} {'tokens':>7s} {'max|dlogp|':>11s} {'mean|dlogp|':>12s} {'mean KL':>11s} {'filtered':>8s} {'support':>7s}  exit steps")
    rows = list(report["policies"].items())
    if "overall" in report:
        rows.append(("overall (full-cache policies)", report["overall"]))
    for name, s in rows:
        print(
            f"{name:32s} {s['tokens']:7d} {s['max_abs_gap']:11.3e} {s['mean_abs_gap']:12.3e} {s['mean_kl']:11.3e} "
            f"{s['filtered_tokens']:8d} {s['support_changes']:7d}  {s.get('exit_steps', '')} (KL {s['kl']})"
        )


__all__ = [
    "ParityRecipeConfig",
    "PromptsConfig",
    "RandomModelConfig",
    "RolloutRecipeConfig",
    "ensure_model",
    "load_prompts",
    "run_parity",
    "run_rollout",
]
