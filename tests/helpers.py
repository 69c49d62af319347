"""Helpers the test modules share, in one place: test modules import from here (and conftest fixtures), never
from each other.

- tiny models and paths: `tiny_config`, `tiny_model`, `REPO_ROOT`, `SHARED_DATA`;
- `single_thread`: the body of each package's `one_thread` fixture;
- data files: `write_jsonl`;
- the RL trainer on a tiny policy: `save_policy` (the gate tests': `make_checkpoint`), `grpo_args`, `make_grpo_trainer`, `length_reward`, `logged`;
- the rollout tests' model and prompts: `small_model`, `mixed_prompts`, `ADAPTIVE`;
- the cached decode the model and parity tests compare against: `decode_incrementally`;
- the reward cases the table and hostile-input tests share: `ACCURACY_CASES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from trl import GRPOConfig

import looplm
import looplm.tiny
from looplm import LoopKVCache
from looplm.tokenizer import build_tokenizer, fix_ouro_special_tokens
from posttrain.grpo_recipe import (
    GRPODataSection,
    GRPOModelSection,
    GRPORecipeConfig,
    RolloutSection,
    load_grpo_data,
    load_policy,
    rollout_engine,
)
from posttrain.grpo_trainer import LoopGRPOTrainer, LoopRLConfig
from posttrain.synthetic import arithmetic_traces
from rollout.engine import DepthConfig
from rollout.pool import PoolConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

ADAPTIVE = DepthConfig(policy="adaptive", exit_threshold=0.6)
# fp32, hidden 32, T = 4: rollout and replay differ by rounding only (a few ulps of |logp| ~ 6 per op chain)
PARITY_MAX, PARITY_MEAN = 1e-4, 1e-6


def tiny_config(**overrides) -> looplm.LoopLMConfig:
    """hidden 32, 2 layers, vocab 99, T = 4 unless overridden (looplm.tiny's "test" size)."""
    return looplm.tiny.tiny_config("test", **overrides)


def tiny_model(seed: int = 0, **overrides) -> looplm.LoopLMForCausalLM:
    """The "test" size with a spread-out exit gate (the default init keeps lambda near 0.5 everywhere)."""
    return looplm.tiny.tiny_model("test", seed=seed, **overrides)


def single_thread() -> Iterator[None]:
    """Small models gain nothing from intra-op threads, and on a busy 2-core machine two threads make their
    tests 10-20x slower (OpenMP threads waiting on each other). Wrapped as a fixture by the conftests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """`rows` as a JSONL file at `path`; -> the path as a string (what the loaders take)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# The RL trainer on a tiny policy


def save_policy(folder: Path, rows: int = 200, seed: int = 0, **model_overrides) -> Path:
    """A random "test"-size LoopLM (seeded by `seed`, 1024 positions unless overridden) and a tokenizer trained on
    `rows` synthetic traces of `seed`, saved in `folder`."""
    traces = arithmetic_traces(rows, seed=seed)
    tokenizer = build_tokenizer([m["content"] for r in traces for m in r["messages"]], vocab_size=300)
    overrides = {"max_position_embeddings": 1024} | model_overrides
    model = looplm.tiny.tiny_model("test", seed=seed, vocab_size=len(tokenizer), **overrides)
    fix_ouro_special_tokens(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_checkpoint(folder: Path, seed: int = 0, **model_overrides) -> Path:
    """The gate tests' checkpoint: `save_policy` on 64 traces, with the "test" size's 512 positions."""
    return save_policy(folder, rows=64, seed=seed, **({"max_position_embeddings": 512} | model_overrides))


def length_reward(completions, **_) -> list[float]:
    """A reward with variance inside every group (a random model never answers right)."""
    return [float(len(c[-1]["content"]) % 7) for c in completions]


def grpo_args(tmp_path: Path, **overrides) -> GRPOConfig:
    """Two steps of 2 groups of 4 short completions, fp32 on the CPU, no checkpoints."""
    fields = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
        num_generations=4, max_completion_length=12, max_steps=2, logging_steps=1, learning_rate=1e-2,
        save_strategy="no", gradient_checkpointing=False, beta=0.0, temperature=1.0, seed=0, disable_tqdm=True,
    )
    return GRPOConfig(**(fields | overrides))


def make_grpo_trainer(
    model_dir, tmp_path, depth: DepthConfig = ADAPTIVE, loop=None, dynamic=None,
    rewards: Sequence[Callable] = (length_reward,), engine: str = "torch", rows: int = 64, exact_mode: bool = False,
    max_staleness: int = 0, lm: bool = True, gate: bool = False, **args,
) -> LoopGRPOTrainer:
    """A `LoopGRPOTrainer` wired as the recipe wires it (`load_grpo_data`, `load_policy`, `rollout_engine`);
    `args`: `GRPOConfig` overrides (see `grpo_args`)."""
    loop = loop or LoopRLConfig()
    cfg = GRPORecipeConfig(
        model=GRPOModelSection(path=str(model_dir), exact_mode=exact_mode, lm_trainable=lm, gate_trainable=gate),
        data=GRPODataSection(synthetic_rows=rows, eval_rows=8),
        rollout=RolloutSection(engine=engine, depth=depth, pool=PoolConfig(num_actors=2, num_cpus=2)),
        loop=loop,
        training=grpo_args(tmp_path, **args),
    )
    train, _ = load_grpo_data(cfg.data)
    model, tokenizer = load_policy(cfg.model)
    return LoopGRPOTrainer(
        model=model, reward_funcs=list(rewards), args=cfg.training, train_dataset=train, processing_class=tokenizer,
        engine=rollout_engine(cfg.rollout, model, str(model_dir), tokenizer), depth=depth, loop=loop,
        dynamic_sampling=dynamic, max_staleness=max_staleness,
    )


def logged(trainer: LoopGRPOTrainer, key: str) -> list[float]:
    """Every value of `key` in the trainer's log history, in step order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# ----------------------------------------------------------------------------------------------------------
# Rollouts and cached decoding


def small_model(seed: int = 0) -> looplm.LoopLMForCausalLM:
    """~0.42M parameters, T = 4, with a spread-out exit gate so Q-exit gives a mix of depths."""
    return looplm.tiny.tiny_model("small", seed=seed)


def mixed_prompts(count: int, low: int = 1, high: int = 40, vocab: int = 1024, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def decode_incrementally(model, ids, prompt_len, exit_steps=None, mode="full", num_loops=None, attention_mask=None):
    """Prefill `prompt_len` tokens, then feed the rest one by one through the cache; return all logits."""
    cache = LoopKVCache(model.config, mode=mode)

    def call(sl):
        kwargs = {} if exit_steps is None else {"exit_steps": exit_steps[:, sl]}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, : sl.stop]
        return model(ids[:, sl], cache=cache, num_loops=num_loops, **kwargs).logits

    logits = [call(slice(0, prompt_len))]
    logits += [call(slice(i, i + 1)) for i in range(prompt_len, ids.shape[1])]
    return torch.cat(logits, dim=1), cache


# ----------------------------------------------------------------------------------------------------------
# Rewards

MEGABYTE = "x" * 1_000_000

# (ground truth, completion, accuracy): equivalent forms, think blocks, several answers, no answer, big inputs.
ACCURACY_CASES = [
    ("\\frac{1}{2}", "Answer: 0.5", 1.0),
    ("0.5", "so \\boxed{\\frac{1}{2}}", 1.0),
    ("\\boxed{3}", "Answer: 3", 1.0),  # LaTeX ground truth vs plain answer
    ("3", "the answer is \\boxed{3}", 1.0),
    ("3", "\\boxed{3.0}", 1.0),
    ("\\frac{3}{4}", "<think>3/4 = 0.75</think>\nAnswer: 0.75", 1.0),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("10^{10}", "Answer: 10000000000", 1.0),
    ("72", "Answer: $72", 1.0),
    ("1,000", "Answer: 1000", 1.0),
    ("\\frac{1}{3}", "Answer: 0.5", 0.0),
    ("34", "Answer: 35", 0.0),
    ("3", "<think>it is \\boxed{3}</think> no idea", 0.0),  # only inside the think block
    ("3", "<think>it is \\boxed{3}", 0.0),  # unclosed think block
    ("5", "Answer: 3\nwait.\nAnswer: 5", 1.0),  # several Answer: lines: the last counts
    ("3", "Answer: 3\nwait.\nAnswer: 5", 0.0),
    ("3", "no answer here", 0.0),
    ("3", "", 0.0),
    ("6", MEGABYTE + "\nAnswer: 6", 1.0),  # a 1 MB completion
    ("6", "Answer: 6\n" + MEGABYTE, 0.0),  # ... whose answer is not at its end
    ("3", "\\boxed{\\frac{3}{", 0.0),  # malformed LaTeX
    ("1", "Answer: \\left(\\left(\\left(1\\right)\\right)\\right)", 1.0),
]
