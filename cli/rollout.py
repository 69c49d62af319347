"""`run.py init` (a random LoopLM folder of a `looplm.tiny` size), `run.py rollout` (model folder + prompts file
-> JSONL of records) and `run.py parity` (generate, replay with the training forward, print the log-prob gap
and KL overall and per depth policy).

rollout and parity take an existing model folder only: a mistyped path is an error, never a new random
model. Creating one is the explicit `run.py init --config configs/init_tiny.yaml` (seeded, refuses to
overwrite a model folder unless `overwrite=true`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from configs import ConfigError, UserError, save_config
from configs.inputs import model_folder
from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.tiny import TINY_SIZES, tiny_model
from rollout.engine import (
    DepthConfig,
    Prompt,
    RolloutEngine,
    RolloutRecord,
    SamplingConfig,
    mean_loops_per_token,
)
from rollout.parity import TokenGaps, check_parity
from rollout.pool import PoolConfig
from rollout.vllm_engine import check_vllm_depth

logger = logging.getLogger(__name__)


@dataclass
class InitConfig:
    """A random LoopLM of one of `looplm.tiny.TINY_SIZES`, saved as a model folder."""

    output: str = "runs/looplm-random-tiny"
    size: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # LoopLMConfig fields, e.g. {total_ut_steps: 6}
    seed: int = 0
    gate_std: float | None = 1.0  # exit-gate weight std (None: transformers' init, every lambda near 0.5)
    overwrite: bool = False  # replace a model folder already at `output`

    def check(self) -> None:
        if self.size not in TINY_SIZES:
            raise ValueError(f"size must be one of {sorted(TINY_SIZES)}, got {self.size!r}")
        known = set(LoopLMConfig().to_dict())
        for key in self.overrides:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
                raise ValueError(f"overrides.{key} is not a LoopLMConfig field{hint}")
        if self.gate_std is not None and self.gate_std < 0:
            raise ValueError(f"gate_std must be >= 0, got {self.gate_std}")


@dataclass
class PromptsConfig:
    """A JSONL file (each line a list of ids, or {"prompt_ids"}, {"messages"} or {"prompt": text or messages}),
    or, with no file, `count` random id prompts with lengths uniform in [min_len, max_len]."""

    file: str | None = None
    count: int = 16
    min_len: int = 4
    max_len: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.file is not None:
            return
        if self.count < 1:
            raise ValueError(f"prompts.count must be >= 1, got {self.count}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"prompts needs 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")


@dataclass
class RolloutRecipeConfig:
    model: str = "runs/looplm-random-tiny"  # an existing model folder (run.py init creates a random one)
    tokenizer: str | None = None  # tokenizer folder (default: the model folder's, if it has one)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    engine: Literal["torch", "pool", "vllm"] = "pool"  # torch: in-process (max_batch_size, compile_decode from `pool`)
    pool: PoolConfig = field(default_factory=PoolConfig)
    output: str = "runs/rollouts.jsonl"

    def check(self) -> None:
        if self.engine == "vllm":
            try:
                check_vllm_depth(self.depth)
            except ValueError as err:
                raise ValueError(f"engine 'vllm' with depth {self.depth.label()}: {err}") from None


@dataclass
class ParityRecipeConfig:
    model: str = "runs/looplm-random-tiny"  # an existing model folder
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
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the weights, in the engine and the training forward
    exact_mode: bool = False  # batch-invariant kernels on both sides (looplm.batch_invariant): expect a gap of 0
    grad: bool = False  # run the training forward with gradients enabled, as an update does
    output: str | None = "runs/parity.json"

    def check(self) -> None:
        if not self.policies:
            raise ValueError("policies is empty: give at least one depth policy to compare")
        if self.replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {self.replay_batch_size}")
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap}")


# ----------------------------------------------------------------------------------------------------------
# Set-up shared by both recipes


def init_model(config: InitConfig) -> Path:
    """Save a seeded random LoopLM of `config.size` (plus overrides) in `config.output`."""
    folder = Path(config.output)
    if (folder / "config.json").exists() and not config.overwrite:
        raise ConfigError(f"output: {folder} already holds a model (config.json); set overwrite=true to replace it")
    model = tiny_model(config.size, seed=config.seed, gate_std=config.gate_std, **config.overrides)
    model.save_pretrained(folder)
    logger.info("saved a random %s LoopLM (%.2fM parameters) in %s", config.size, _params(model) / 1e6, folder)
    return folder


def ensure_model(path: str, init: InitConfig) -> Path:
    """The folder at `path`, created from `init` first if it holds no model (for benchmarks that own it)."""
    folder = Path(path)
    if (folder / "config.json").exists():
        return folder
    return init_model(dataclasses.replace(init, output=str(folder)))


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
    path = Path(config.file)
    if not path.is_file():
        raise UserError(f"prompts.file: {path}: no such file (expected a JSONL file of prompts)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            prompts.append(_prompt_from_json(_json_line(line, f"{path}:{number}"), f"{path}:{number}"))
    if not prompts:
        raise UserError(f"{path}: no prompts in it (expected one JSON prompt per line)")
    return prompts


def _json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg}, column {err.colno}); {PROMPT_LINE}") from None


PROMPT_LINE = "expected one JSON prompt per line: a list of ids, or an object with prompt_ids / messages / prompt"


def _prompt_from_json(item: Any, where: str) -> Prompt:
    if isinstance(item, list) and item and (
        all(isinstance(t, int) and not isinstance(t, bool) for t in item) or all(isinstance(m, dict) for m in item)
    ):
        return item  # token ids, or chat messages
    if isinstance(item, dict):
        for key in ("prompt_ids", "messages", "prompt"):
            if key in item:
                return item[key]
    raise UserError(f"{where}: got {json.dumps(item)[:80]}; {PROMPT_LINE}")


def build_engine(
    kind: str, model: Path | LoopLMForCausalLM, tokenizer: Any, pool: PoolConfig, depth: DepthConfig
) -> RolloutEngine:
    """An engine over a model folder, or over an in-memory model (the pool ships it; in-process gets a copy)."""
    in_memory = isinstance(model, LoopLMForCausalLM)
    if kind == "pool":
        from rollout.pool import RolloutPool

        return RolloutPool(model if in_memory else str(model), pool, tokenizer=tokenizer, depth=depth)
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer=tokenizer, depth=depth)
    from rollout.torch_engine import TorchEngine

    options = dict(tokenizer=tokenizer, depth=depth, max_batch_size=pool.max_batch_size, compile_decode=pool.compile_decode)
    if in_memory:
        return TorchEngine(copy.deepcopy(model), **options)
    return TorchEngine.from_pretrained(model, **options)


def _close(engine: RolloutEngine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# run.py init


def run_init(config: InitConfig) -> Path:
    folder = init_model(config)
    print(f"random {config.size} LoopLM saved in {folder}")
    return folder


# ----------------------------------------------------------------------------------------------------------
# run.py rollout


def run_rollout(config: RolloutRecipeConfig) -> list[RolloutRecord]:
    folder = model_folder(config.model)
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
    folder = model_folder(config.model)
    tokenizer = load_tokenizer(folder, config.tokenizer)
    dtype = getattr(torch, config.dtype)
    trainer_model = LoopLMForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()  # the training forward
    trainer_model.config.exact_mode = config.exact_mode
    prompts = load_prompts(config.prompts, trainer_model.config.vocab_size)
    # The folder's own config says neither: the engine gets this model's (weights, dtype and switch shipped along).
    source = trainer_model if config.exact_mode or config.dtype != "float32" else folder
    engine = build_engine(config.engine, source, tokenizer, config.pool, config.policies[0])
    where = f"{config.engine}" + (f" ({config.pool.num_actors} actors)" if config.engine == "pool" else "")
    report: dict[str, Any] = {
        "model": str(folder), "parameters": _params(trainer_model), "engine": where, "dtype": config.dtype,
        "exact_mode": config.exact_mode, "grad": config.grad, "policies": {},
    }
    parts: list[TokenGaps] = []
    try:
        for depth in config.policies:
            records = engine.generate(prompts, config.sampling, depth)
            with torch.set_grad_enabled(config.grad):
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
    "InitConfig",
    "ParityRecipeConfig",
    "PromptsConfig",
    "RolloutRecipeConfig",
    "ensure_model",
    "init_model",
    "load_prompts",
    "model_folder",
    "run_init",
    "run_parity",
    "run_rollout",
]
