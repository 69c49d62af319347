"""Examples for gate tuning and evaluation: prompt ids, reference-completion ids and the reference answer.

Rows come from `posttrain.data.load_rows` (the synthetic arithmetic traces, or any SFT dataset: `messages` or
`prompt`/`completion`), so gate tuning reads exactly the data formats SFT reads. A row's prompt is rendered
with the tokenizer's chat template and generation prompt, exactly as the rollout engine renders it; the
completion is the rest of the rendered conversation up to and including the eos token. The answer is the
reference's `Answer:` (DAPO's scorer), None where there is none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from looplm.losses import IGNORE_INDEX
from looplm.tokenizer import apply_chat
from posttrain.data import load_rows, opens_think, reply_of, split_prompt
from posttrain.synthetic import SyntheticTask

logger = logging.getLogger(__name__)


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]  # the reference completion, ending with eos
    answer: str | None  # normalised `Answer:` of the reference, None when it has none


def load_examples(
    source: str, split: str, rows: int, seed: int, tokenizer: PreTrainedTokenizerBase, max_length: int,
    task: SyntheticTask | None = None,
) -> list[Example]:
    """Up to `rows` examples of `source` (`task`: the synthetic problems); rows longer than `max_length` tokens
    are dropped (and counted)."""
    dataset = load_rows(source, split, rows, rows, seed, task)
    examples = [encode_row(row, tokenizer, f"{source} row {i}") for i, row in enumerate(dataset)]
    kept = [e for e in examples if len(e.prompt_ids) + len(e.completion_ids) <= max_length]
    if len(kept) < len(examples):
        logger.warning("%s: dropped %d rows longer than %d tokens", source, len(examples) - len(kept), max_length)
    return kept


def encode_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str) -> Example:
    """Render a conversation row; the rendered prompt must be a prefix of the rendered conversation."""
    prompt, answer = split_prompt(row)
    reply = reply_of(row)
    prompt_ids = apply_chat(tokenizer, prompt, add_generation_prompt=True, enable_thinking=opens_think(row))
    full_ids = apply_chat(tokenizer, [*prompt, reply], add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{where}: the chat template's generation prompt is not a prefix of the conversation")
    completion = full_ids[len(prompt_ids) :]
    eos = tokenizer.eos_token_id
    if eos in completion:  # the template may add a newline after eos: the model stops at eos
        completion = completion[: len(completion) - completion[::-1].index(eos)]
    if not completion:
        raise ValueError(f"{where}: empty reference completion")
    return Example(prompt_ids, completion, answer)


def training_features(example: Example) -> dict[str, list[int]]:
    """Stage-II inputs: the whole conversation, labels on the completion only.

    Prompt positions always run all loops while decoding (prefill), so only completion positions ever use the
    gate; the per-token losses and gate targets are read there.
    """
    ids = example.prompt_ids + example.completion_ids
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(example.prompt_ids) + example.completion_ids}


class PadCollator:
    """Right-pads `input_ids` (with `pad_id`, hidden by the mask) and `labels` (with IGNORE_INDEX)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["Example", "PadCollator", "encode_row", "load_examples", "training_features"]
