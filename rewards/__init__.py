"""Rewards: completions to numbers, as plain functions with TRL's reward signature, found by name.

`REWARD_FUNCS` maps each name to its function with default options; `get_reward_funcs(names, **options)`
is what a recipe calls: it binds the options each function takes (e.g. `overlong_reward`'s
`max_completion_len` and `soft_punish_cache`, `accuracy_reward`'s `timeout_s` and `call_timeout_s`) and
fails on an unknown name or an option none of the named functions takes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from rewards.accuracy import accuracy_reward
from rewards.dapo import dapo_answer_reward, dapo_reward
from rewards.depth import depth_penalty
from rewards.inputs import GROUND_TRUTH_COLUMNS
from rewards.shaping import format_reward, overlong_reward
from rewards.verifier import MathVerifier, configure_verifier, default_verifier, verifier_stats

RewardFunc = Callable[..., list[float | None]]

REWARD_FUNCS: dict[str, RewardFunc] = {
    "accuracy_reward": accuracy_reward,
    "dapo_reward": dapo_reward,
    "depth_penalty": depth_penalty,
    "format_reward": format_reward,
    "overlong_reward": overlong_reward,
}


def reward_options(func: RewardFunc) -> list[str]:
    """The options a reward function takes: its keyword-only parameters with defaults (TRL's own hooks such
    as `log_metric` excluded)."""
    params = inspect.signature(func).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("log_metric", "log_extra")]


def get_reward_funcs(names: str | Sequence[str], **options: Any) -> list[RewardFunc]:
    """The named reward functions, in order, each with the options it takes bound (`functools.partial`, which
    TRL names after the function and which pickles). Options are checked now, by a call on an empty batch."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise KeyError(f"unknown reward function(s) {unknown}; known: {sorted(REWARD_FUNCS)}")
    taken = {n: {k: v for k, v in options.items() if k in reward_options(REWARD_FUNCS[n])} for n in names}
    unused = sorted(set(options) - {k for bound in taken.values() for k in bound})
    if unused:
        known = {n: reward_options(REWARD_FUNCS[n]) for n in names}
        raise TypeError(f"reward option(s) {unused} are taken by none of {names}; their options: {known}")
    funcs = [functools.partial(REWARD_FUNCS[n], **taken[n]) if taken[n] else REWARD_FUNCS[n] for n in names]
    for func in funcs:
        func(prompts=[], completions=[], completion_ids=[])  # raises on a bad option value
    if "accuracy_reward" in names:
        default_verifier().start()  # the first training step should not pay the workers' start
    return funcs


__all__ = [
    "GROUND_TRUTH_COLUMNS",
    "REWARD_FUNCS",
    "MathVerifier",
    "accuracy_reward",
    "configure_verifier",
    "dapo_answer_reward",
    "dapo_reward",
    "default_verifier",
    "format_reward",
    "get_reward_funcs",
    "overlong_reward",
    "reward_options",
    "verifier_stats",
]
