"""Reading what TRL passes a reward function: completions, prompts and the ground-truth column.

TRL calls `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`; completions are strings,
or message lists in conversational mode. The ground truth lives under whatever column the dataset has.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

# Looked up in this order; DAPO-Math's `reward_model` holds {"ground_truth": ..., "style": ...} per row.
GROUND_TRUTH_COLUMNS = ("ground_truth", "reward_model", "answer", "solution")


def message_text(message: Any) -> str:
    """A string, or the text of a chat message (`content` as a string or as a list of text parts)."""
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    if isinstance(message, dict):
        content = message.get("content")
        if isinstance(content, list):  # multimodal form: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)
    raise TypeError(f"expected a string or a chat message, got {type(message).__name__}")


def completion_text(completion: Any) -> str:
    """TRL passes completions as strings, or as message lists in conversational mode (the last one counts).
    None (no completion) reads as empty text, which has no answer."""
    if isinstance(completion, list):
        return message_text(completion[-1]) if completion else ""
    return message_text(completion)


def prompt_text(prompt: Any) -> str | None:
    """The prompt as text when it is a string; for a message list, the text of an assistant prefill (its last
    message) if there is one. None when the text the model continues from is not known (the chat template
    renders it), so a think block the template opens cannot be seen."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        return message_text(prompt[-1])
    return None


def prompt_texts(prompts: Sequence[Any] | None, n: int) -> list[str | None]:
    """One `prompt_text` per completion (all None when the caller passed no prompts)."""
    if prompts is None:
        return [None] * n
    if len(prompts) != n:
        raise ValueError(f"{n} completions but {len(prompts)} prompts")
    return [prompt_text(p) for p in prompts]


def ground_truths(columns: dict[str, Any], n: int) -> list[str | None]:
    """The ground truth of each of the n rows, from the first accepted column present; None for a row
    without one (None, empty, or a `reward_model` dict without `ground_truth`)."""
    name = next((c for c in GROUND_TRUTH_COLUMNS if columns.get(c) is not None), None)
    if name is None:
        raise KeyError(
            f"no ground-truth column among the reward function's inputs {sorted(columns)}: expected one of "
            f"{list(GROUND_TRUTH_COLUMNS)} (DAPO's `reward_model` as {{'ground_truth': ...}} dicts)"
        )
    values = columns[name]
    if len(values) != n:
        raise ValueError(f"{n} completions but {len(values)} ground truths in column {name!r}")
    return [_truth(value, name, row) for row, value in enumerate(values)]


def _truth(value: Any, column: str, row: int) -> str | None:
    if column == "reward_model" and value is not None:
        if not isinstance(value, dict):
            raise TypeError(f"row {row}: column 'reward_model' must hold {{'ground_truth': ...}} dicts, got {type(value).__name__}")
        value = value.get("ground_truth")
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):  # pandas' NaN for a gap
        return None
    if isinstance(value, bool) or not isinstance(value, str | numbers.Real):  # Real: numpy's ints too
        raise TypeError(
            f"row {row}: ground truth in column {column!r} must be a string or a number, got {type(value).__name__}"
        )
    return str(value).strip() or None  # DAPO-Math stores integers; parquet may hand them back as ints
