"""Datasets for reasoning SFT and RL, normalised to TRL's conversational formats.

All loading goes through `datasets` (local .jsonl/.json/.parquet file, local folder, or hub name); the code
here only checks and normalises schemas, so a malformed row fails at load time, before any training, with
the source, the row index (0-based, as in `dataset[i]`) and what was expected. Every loader takes
`skipped`: pass a list and malformed rows are dropped instead, one message per row appended to it (and
their count logged). A load that leaves no rows is an error, never a silent zero-step run.

Output schemas:
- `load_sft_dataset`: inputs with `messages` or ShareGPT `conversations` -> one column `messages` (list of
  {role, content}); inputs with `prompt`/`completion` (strings or message lists) -> columns `prompt` and
  `completion`, each a list of {role, content} (TRL's conversational prompt-completion: loss on the
  completion only).
- `load_dapo_math`: `prompt` (list of {role, content}, TRL GRPO's conversational prompt), `ground_truth`
  (str), `data_source` (str), `index` (int64), one row per problem unless `dedupe=False`.
- `load_gsm8k`: `form="grpo"` -> `prompt`, `ground_truth`; `form="sft"` -> `messages`.

The answer format that SFT traces, GSM8K prompts and the rewards share lives in `rewards.answer_format`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, load_dataset
from datasets.table import InMemoryTable

from configs import UserError
from configs.inputs import hub_errors
from looplm.tokenizer import THINK_OPEN
from posttrain.synthetic import SyntheticTask, to_dataset
from rewards.answer_format import dapo_prompt, format_trace, parse_answer

logger = logging.getLogger(__name__)

Message = dict[str, str]
MESSAGES = List({"role": Value("string"), "content": Value("string")})
ERROR = "_malformed"  # the column a skipping load carries each row's problem in, dropped before returning

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ACCEPTED_SFT_SCHEMAS = (
    "'messages' (list of {role, content}); "
    "'prompt' + 'completion' (strings, or lists of {role, content}); "
    "'conversations' (ShareGPT: list of {from, value}, from in human/user, gpt/assistant, system)"
)
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# ---------------------------------------------------------------- loading


def _load_raw(source: str, split: str) -> Dataset:
    """A local file (split ignored), a local folder, or a hub dataset name, loaded by `datasets`."""
    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{source}: unsupported file type {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}")
        try:
            return load_dataset(builder, data_files={"train": str(path)}, split="train")
        except Exception as error:  # not JSON, or arrow cannot build one table from the rows
            raise UserError(_unreadable(path, error)) from error
    if path.is_dir():
        return load_dataset(str(path), split=split)
    if path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/")):
        raise UserError(f"{source}: no such file or folder (and not a hub dataset name)")
    with hub_errors("data", source):
        return load_dataset(source, split=split)


def _unreadable(path: Path, error: Exception) -> str:
    """Why `datasets` could not read a local file, naming the first line that is not a JSON object."""
    if path.stat().st_size == 0:
        return f"{path}: the file is empty (no rows)"
    if path.suffix.lower() == ".jsonl":
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{path} line {number}: not JSON ({err.msg}, column {err.colno}); expected one JSON object per line"
                if not isinstance(row, dict):
                    return f"{path} line {number}: expected a JSON object (one row), got {line.strip()[:60]!r}"
    cause = error.__cause__ or error.__context__ or error
    return f"{path}: could not be read as one table ({cause})"


def _head(dataset: Dataset, max_rows: int | None) -> Dataset:
    return dataset if max_rows is None or max_rows >= len(dataset) else dataset.select(range(max_rows))


# ---------------------------------------------------------------- SFT


def _check_messages(messages: Any, where: str, field: str, role_key: str = "role", content_key: str = "content") -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{field}' must be a non-empty list of messages, got {messages!r:.80}")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}: {field}[{j}] must be a {{{role_key}, {content_key}}} dict, got {message!r:.80}")
        for key in (role_key, content_key):
            if message.get(key) is None:
                raise UserError(f"{where}: {field}[{j}] has no '{key}'")
        if not isinstance(message[content_key], str):
            raise UserError(f"{where}: {field}[{j}]['{content_key}'] must be a string")


def _chat_messages(messages: Any, where: str, field: str) -> list[Message]:
    _check_messages(messages, where, field)
    for j, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise UserError(f"{where}: {field}[{j}] has role {message['role']!r}; expected one of {ROLES}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _sharegpt_messages(turns: Any, where: str) -> list[Message]:
    _check_messages(turns, where, "conversations", role_key="from", content_key="value")
    for j, turn in enumerate(turns):
        if turn["from"] not in SHAREGPT_ROLES:
            raise UserError(f"{where}: conversations[{j}] has from={turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _require_assistant(messages: list[Message], where: str, field: str) -> list[Message]:
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: '{field}' has no assistant message to train on")
    return messages


def _side(value: Any, role: str, where: str, field: str) -> list[Message]:
    """One side of a prompt/completion row: a string becomes a single `role` message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _chat_messages(value, where, field)


def _normalise_row(schema: str, row: dict[str, Any], where: str) -> dict[str, list[Message]]:
    if schema == "messages":
        return {"messages": _require_assistant(_chat_messages(row["messages"], where, "messages"), where, "messages")}
    if schema == "conversations":
        return {"messages": _require_assistant(_sharegpt_messages(row["conversations"], where), where, "conversations")}
    completion = _require_assistant(_side(row["completion"], "assistant", where, "completion"), where, "completion")
    return {"prompt": _side(row["prompt"], "user", where, "prompt"), "completion": completion}


def _sft_schema(columns: list[str], name: str) -> str:
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise UserError(f"{name}: unknown SFT schema; columns found: {columns}; accepted: {ACCEPTED_SFT_SCHEMAS}")


def load_sft_dataset(
    source: str, split: str = "train", max_rows: int | None = None, skipped: list[str] | None = None
) -> Dataset:
    """Load a reasoning-SFT dataset and normalise it to TRL's conversational format (see module docstring).

    Raises ValueError naming the source and row for a malformed row (or, with `skipped`, drops it and appends
    the message), listing the columns found for an unknown schema, and when no rows are left.
    """
    dataset = _head(_load_raw(source, split), max_rows)
    schema = _sft_schema(dataset.column_names, source)
    if schema == "prompt_completion":
        inputs, outputs = ["prompt", "completion"], {"prompt": MESSAGES, "completion": MESSAGES}
    else:
        inputs, outputs = [schema], {"messages": MESSAGES}
    return _convert_rows(
        dataset, lambda row, where: _normalise_row(schema, row, where), inputs, outputs, source, skipped
    )


def _convert_rows(
    dataset: Dataset,
    convert: Callable[[dict[str, Any], str], dict[str, Any]],
    inputs: list[str],
    outputs: dict[str, Any],
    source: str,
    skipped: list[str] | None,
) -> Dataset:
    """`convert(row, "source row i")` on every row (batched, cached by `datasets`). A ValueError fails the load,
    or, with a `skipped` list, marks the row, which is then dropped and its message appended to the list."""
    skip = skipped is not None
    features = Features({**outputs, ERROR: Value("string")})

    def convert_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in features}
        for k, i in enumerate(indices):
            try:
                row, problem = convert({c: batch[c][k] for c in inputs}, f"{source} row {i}"), None
            except ValueError as err:
                if not skip:
                    raise
                row, problem = dict.fromkeys(outputs), str(err)
            for name in outputs:
                out[name].append(row[name])
            out[ERROR].append(problem)
        return out

    converted = dataset.map(
        convert_batch, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features
    )
    problems = [p for p in converted[ERROR] if p is not None]
    if problems:
        converted = converted.filter(lambda problem: problem is None, input_columns=ERROR)
        _record_skipped(problems, skipped, source)
    return _non_empty(converted.remove_columns(ERROR), source, len(dataset), len(problems))


def _record_skipped(problems: list[str], skipped: list[str], source: str) -> None:
    skipped.extend(problems)
    logger.warning("%s: skipped %d malformed rows (first: %s)", source, len(problems), problems[0])


def _non_empty(dataset: Dataset, source: str, read: int, skipped: int) -> Dataset:
    if len(dataset) == 0:
        reason = f"all {read} rows read were malformed and skipped" if skipped else f"{read} rows read"
        raise UserError(f"{source}: no rows left to train on ({reason})")
    return dataset


def _token_count(tokenizer: Any, messages: list[Message]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def drop_overlong(dataset: Dataset, tokenizer: Any, max_length: int) -> tuple[Dataset, int]:
    """Drop rows whose chat-templated length exceeds `max_length` tokens; return (kept, number dropped)."""

    def conversation(row: dict[str, Any]) -> list[Message]:
        return row["messages"] if "messages" in row else list(row["prompt"]) + list(row["completion"])

    kept = dataset.filter(lambda row: _token_count(tokenizer, conversation(row)) <= max_length)
    return kept, len(dataset) - len(kept)


# ---------------------------------------------------------------- the SFT recipe's train/eval rows


@dataclass
class SFTData:
    train: Dataset  # only the columns TRL reads: `messages`, or `prompt` + `completion`
    eval: Dataset | None
    dropped: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})  # over-length rows

    def eval_prompts(self, n: int) -> tuple[list[list[Message]], list[str | None]]:
        """Up to `n` held-out prompts (chat messages) and their reference answers (text after "Answer:")."""
        rows = self.eval.select(range(min(n, len(self.eval)))) if self.eval is not None else []
        pairs = [split_prompt(row) for row in rows]
        return [p for p, _ in pairs], [a for _, a in pairs]

    def replies_think(self) -> bool:
        """Whether the held-out replies open a think block (`opens_think` on the first): a model trained on direct
        answers is prompted without the opening `<think>`."""
        return opens_think(self.eval[0]) if self.eval is not None and len(self.eval) else True


def load_rows(
    source: str,
    split: str = "train",
    max_rows: int | None = None,
    synthetic_rows: int = 1024,
    seed: int = 0,
    task: SyntheticTask | None = None,
) -> Dataset:
    """SFT rows from `source`: "synthetic" (`task`'s problems, generated in code, no download) or anything
    `load_sft_dataset` reads; normalised to `messages`, or `prompt` + `completion` (message lists)."""
    if source == "synthetic":
        n = synthetic_rows if max_rows is None else min(max_rows, synthetic_rows)
        return to_dataset((task or SyntheticTask()).rows(n, seed), columns=["messages"])
    return load_sft_dataset(source, split=split, max_rows=max_rows)


def drop_long_rows(data: SFTData, tokenizer: Any, max_length: int) -> SFTData:
    """`drop_overlong` on both splits; the counts are logged and kept in `SFTData.dropped`."""
    train, n_train = drop_overlong(data.train, tokenizer, max_length)
    evals, n_eval = drop_overlong(data.eval, tokenizer, max_length) if data.eval is not None else (None, 0)
    if n_train or n_eval:
        logger.warning("dropped rows longer than max_length=%d tokens: train %d, eval %d", max_length, n_train, n_eval)
    if len(train) == 0:
        raise UserError(f"no training rows left: all {n_train} are longer than training.max_length={max_length}")
    return SFTData(train, evals, {"train": n_train, "eval": n_eval})


def reply_of(row: dict[str, Any]) -> Message:
    """The turn a conversation row trains on: its last assistant message, or its completion's last message."""
    if "messages" in row:
        return [m for m in row["messages"] if m["role"] == "assistant"][-1]
    return row["completion"][-1]


def opens_think(row: dict[str, Any]) -> bool:
    """Whether the row's reply opens a think block: its prompt is then rendered with the chat template's opening
    `<think>` (the generation prompt), as in training; a direct answer's prompt without it."""
    return reply_of(row)["content"].startswith(THINK_OPEN)


def split_prompt(row: dict[str, Any]) -> tuple[list[Message], str | None]:
    """-> (the messages before the last assistant turn, the reference answer after "Answer:" if any)."""
    if "messages" in row:
        messages = list(row["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, target = messages[:last], messages[last]["content"]
    else:
        prompt, target = list(row["prompt"]), row["completion"][-1]["content"]
    return prompt, parse_answer(target)


def corpus_of(dataset: Dataset) -> list[str]:
    """Every message text (to train the tiny model's BPE on)."""
    columns = ["messages"] if "messages" in dataset.column_names else ["prompt", "completion"]
    return [m["content"] for row in dataset.select_columns(columns) for c in columns for m in row[c]]


# ---------------------------------------------------------------- DAPO-Math (vectorised: 1.79M rows on the hub)


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    hits = np.flatnonzero(np.asarray(pc.fill_null(mask, True)))
    return int(hits[0]) if hits.size else None


def _first_row(column: pa.ChunkedArray, bad: Callable[[Any], bool]) -> int:
    """The first row whose value fails the schema, found in Python (only on the error path): arrow reads a
    column whose rows disagree in shape as JSON text, so the row that breaks the schema is found row by row."""
    for i, value in enumerate(column.to_pylist()):
        if bad(_decoded(value)):
            return i
    return 0  # every row fits on its own; the column's type as a whole is what is wrong


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _chunks(column: pa.ChunkedArray) -> list[tuple[int, pa.Array]]:
    """(offset of the chunk's first row, chunk) pairs."""
    starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    return list(zip(starts.tolist(), column.chunks, strict=False))


def _check_prompt_chunk(chunk: pa.Array, offset: int, name: str) -> None:
    bad = _first_true(pc.less(pc.list_value_length(chunk), 1))
    if bad is not None:
        raise UserError(f"{name} row {offset + bad}: 'prompt' must be a non-empty list of {{role, content}} messages")
    flat, parents = pc.list_flatten(chunk), pc.list_parent_indices(chunk)
    for key in ("role", "content"):
        missing = _first_true(pc.or_(pc.is_null(flat), pc.is_null(pc.struct_field(flat, key))))
        if missing is not None:
            row = parents[missing].as_py()
            position = missing - (chunk.offsets[row].as_py() - chunk.offsets[0].as_py())
            raise UserError(f"{name} row {offset + row}: prompt[{position}] has no '{key}'")


def _struct_field(table: pa.Table, column: str, key: str, name: str, expected: str) -> pa.ChunkedArray:
    """`table[column][key]`, with errors naming the first row where it is missing."""
    if column not in table.column_names:
        raise UserError(f"{name}: no '{column}' column (expected {expected}); columns found: {table.column_names}")
    values = table.column(column)
    if not pa.types.is_struct(values.type) or values.type.get_field_index(key) < 0:
        row = _first_row(values, lambda v: not isinstance(v, dict) or v.get(key) is None)
        raise UserError(
            f"{name} row {row}: {column} has no '{key}' (expected {expected}; the column reads as {values.type})"
        )
    field = pc.struct_field(values, key)
    bad = _first_true(pc.or_(pc.is_null(values), pc.is_null(field)))
    if bad is not None:
        raise UserError(f"{name} row {bad}: {column} has no '{key}' (expected {expected})")
    return field


def _has_key(table: pa.Table, column: str, key: str) -> bool:
    return column in table.column_names and pa.types.is_struct(table.column(column).type) \
        and table.column(column).type.get_field_index(key) >= 0


def _check_prompts(table: pa.Table, name: str) -> pa.ChunkedArray:
    if "prompt" not in table.column_names:
        raise UserError(f"{name}: no 'prompt' column; columns found: {table.column_names}")
    prompts = table.column("prompt")
    item = prompts.type.value_type if pa.types.is_list(prompts.type) or pa.types.is_large_list(prompts.type) else None
    if item is None or not pa.types.is_struct(item) or {"role", "content"} - {f.name for f in item}:
        row = _first_row(prompts, lambda v: not (
            isinstance(v, list) and v and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in v)
        ))
        raise UserError(
            f"{name} row {row}: 'prompt' must be a non-empty list of {{role, content}} messages "
            f"(the column reads as {prompts.type})"
        )
    for offset, chunk in _chunks(prompts):
        _check_prompt_chunk(chunk, offset, name)
    return prompts


def _ground_truths(table: pa.Table, name: str) -> pa.ChunkedArray:
    truths = _struct_field(table, "reward_model", "ground_truth", name, "{ground_truth, style}")
    if not (pa.types.is_string(truths.type) or pa.types.is_large_string(truths.type) or pa.types.is_integer(truths.type)):
        raise UserError(f"{name}: reward_model.ground_truth must be a string or an integer, found type {truths.type}")
    truths = pc.cast(truths, pa.string())
    empty = _first_true(pc.equal(pc.utf8_trim_whitespace(truths), ""))
    if empty is not None:
        raise UserError(f"{name} row {empty}: reward_model.ground_truth is empty")
    return truths


def _prompt_keys(prompts: pa.ChunkedArray) -> pa.ChunkedArray:
    """One string per row: the prompt's role/content pairs joined (the dedupe key without an index)."""
    keys = []
    for _, chunk in _chunks(prompts):
        flat = pc.list_flatten(chunk)
        pairs = pc.binary_join_element_wise(pc.struct_field(flat, "role"), pc.struct_field(flat, "content"), "\x1e")
        offsets = pc.subtract(chunk.offsets, chunk.offsets[0])
        keys.append(pc.binary_join(pa.ListArray.from_arrays(offsets, pairs), "\x1f"))
    return pa.chunked_array(keys, type=pa.string())


def _first_occurrences(keys: pa.ChunkedArray) -> np.ndarray:
    """Sorted positions of the first row of each distinct key (an arrow hash group-by, no Python loop)."""
    positions = pa.table({"key": keys, "pos": pa.array(np.arange(len(keys), dtype=np.int64))})
    firsts = positions.group_by("key", use_threads=False).aggregate([("pos", "min")]).column("pos_min")
    return np.sort(firsts.to_numpy())


def load_dapo_math(source: str, split: str = "train", dedupe: bool = True, max_rows: int | None = None) -> Dataset:
    """Load a DAPO-Math-17k-schema dataset: columns `prompt`, `ground_truth`, `data_source`, `index`.

    De-duplicates by `extra_info.index` when that key exists, else by prompt text, keeping the first row of
    each problem; `max_rows` caps the output rows (after de-duplication). Schema errors name the row and key.
    """
    table = _load_raw(source, split).data.table  # memory-mapped arrow, no indices mapping after a load
    prompts, truths = _check_prompts(table, source), _ground_truths(table, source)
    if _has_key(table, "extra_info", "index"):
        index = pc.cast(_struct_field(table, "extra_info", "index", source, "{index, ...}"), pa.int64())
        keys = index
    else:
        index = pa.chunked_array([pa.array(np.arange(len(table), dtype=np.int64))])
        keys = _prompt_keys(prompts) if dedupe else index
    keep = _first_occurrences(keys) if dedupe else np.arange(len(table), dtype=np.int64)
    keep = pa.array(keep[:max_rows] if max_rows is not None else keep)
    if "data_source" in table.column_names:
        sources = pc.cast(table.column("data_source").take(keep), pa.string())
    else:
        sources = pa.repeat(pa.scalar(source), len(keep))
    out = pa.table({
        "prompt": prompts.take(keep),
        "ground_truth": truths.take(keep),
        "data_source": sources,
        "index": index.take(keep),
    })
    return Dataset(InMemoryTable(out))


# ---------------------------------------------------------------- GSM8K

CALCULATOR = re.compile(r"<<[^>]*>>")


def _gsm8k_parts(question: Any, answer: Any, where: str) -> tuple[str, str, str]:
    """(question, worked steps without calculator annotations, final number without commas)."""
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(answer, str) or "####" not in answer:
        raise UserError(f"{where}: 'answer' must be a string ending in '#### N', got {answer!r:.80}")
    steps, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise UserError(f"{where}: 'answer' has nothing after '####'")
    return question, CALCULATOR.sub("", steps).strip(), final


def _gsm8k_row(form: str, parts: tuple[str, str, str]) -> dict[str, Any]:
    question, steps, final = parts
    user = {"role": "user", "content": dapo_prompt(question)}
    if form == "grpo":
        return {"prompt": [user], "ground_truth": final}
    return {"messages": [user, {"role": "assistant", "content": format_trace(steps, final)}]}


def load_gsm8k(
    source: str,
    split: str = "train",
    form: Literal["grpo", "sft"] = "grpo",
    max_rows: int | None = None,
    skipped: list[str] | None = None,
) -> Dataset:
    """GSM8K (`question`, `answer` ending in `#### N`) as GRPO rows (`prompt`, `ground_truth`) or SFT rows
    (`messages`: the DAPO-style prompt, then the worked steps in a think block and `Answer: N`).

    `source` is a .jsonl file, a folder holding train.jsonl/test.jsonl (pick with `split`), or a hub name.
    Malformed rows fail the load naming the row, or are dropped into `skipped` (see `load_sft_dataset`).
    """
    if form not in ("grpo", "sft"):
        raise ValueError(f"form must be 'grpo' or 'sft', got {form!r}")
    dataset = _head(_load_raw(source, split), max_rows)
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise UserError(f"{source}: not GSM8K; missing {sorted(missing)}; columns found: {dataset.column_names}")
    outputs = {"prompt": MESSAGES, "ground_truth": Value("string")} if form == "grpo" else {"messages": MESSAGES}
    return _convert_rows(
        dataset,
        lambda row, where: _gsm8k_row(form, _gsm8k_parts(row["question"], row["answer"], where)),
        ["question", "answer"],
        outputs,
        source,
        skipped,
    )


__all__ = [
    "SFTData", "corpus_of", "drop_long_rows", "drop_overlong", "load_dapo_math", "load_gsm8k", "load_rows",
    "load_sft_dataset", "opens_think", "reply_of", "split_prompt",
]
