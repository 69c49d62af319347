"""`run.py rollout`: a model folder + prompts file -> JSONL of rollout records; and the set-up it shares with
`run.py parity` (the prompts, the folder's tokenizer, the engine).

rollout and parity take an existing model folder only: a mistyped path is an error, never a new random
model (`run.py init` makes one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from configs import UserError, save_config
from configs.inputs import model_folder
from looplm import LoopLMConfig, LoopLMForCausalLM
from posttrain.recipe_parts import build_engine, close_engine, load_tokenizer
from rollout.engine import DepthConfig, Prompt, RolloutEngine, RolloutRecord, SamplingConfig
from rollout.pool import PoolConfig
from rollout.vllm_engine import check_vllm_depth


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



# ----------------------------------------------------------------------------------------------------------
# Set-up shared with run.py parity


def folder_tokenizer(model: Path, tokenizer: str | None) -> Any:
    """The `tokenizer` folder, else the model folder's tokenizer, else None (a random `init` folder has none:
    prompts are then token ids)."""
    path = Path(tokenizer) if tokenizer else model
    if tokenizer is None and not (path / "tokenizer_config.json").exists():
        return None
    return load_tokenizer(path, "tokenizer" if tokenizer else "model")


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


def engine_for(kind: str, model: Path | LoopLMForCausalLM, tokenizer: Any, pool: PoolConfig, depth: DepthConfig) -> RolloutEngine:
    """An engine over a model folder, or over an in-memory model (the pool ships it; in-process gets a copy)."""
    return build_engine(kind, model, tokenizer, depth, pool, max_batch_size=pool.max_batch_size,
                        compile_decode=pool.compile_decode)



# ----------------------------------------------------------------------------------------------------------
# run.py rollout


def run_rollout(config: RolloutRecipeConfig) -> list[RolloutRecord]:
    folder = model_folder(config.model)
    tokenizer = folder_tokenizer(folder, config.tokenizer)
    prompts = load_prompts(config.prompts, LoopLMConfig.from_pretrained(str(folder)).vocab_size)
    engine = engine_for(config.engine, folder, tokenizer, config.pool, config.depth)
    try:
        start = time.perf_counter()
        records = engine.generate(prompts, config.sampling, config.depth)
        seconds = time.perf_counter() - start
    finally:
        close_engine(engine)
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



__all__ = ["PromptsConfig", "RolloutRecipeConfig", "engine_for", "folder_tokenizer", "load_prompts", "run_rollout"]
