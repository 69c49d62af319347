"""posttrain.data: schema normalisation, row-level errors, overlong filtering, DAPO-Math and GSM8K loaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from configs import UserError
from posttrain.data import (
    SFTData,
    drop_overlong,
    load_dapo_math,
    load_gsm8k,
    load_rows,
    load_sft_dataset,
    split_prompt,
)
from posttrain.synthetic import SyntheticTask
from rewards.answer_format import format_trace
from tests.helpers import write_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AIME = SHARED_DATA / "dapo" / "aime-2024.parquet"
GSM8K = SHARED_DATA / "gsm8k"
needs_aime = pytest.mark.skipif(not AIME.exists(), reason=f"{AIME} not present")
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason=f"{GSM8K} not present")

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "what is 2+2"}
ASSISTANT = {"role": "assistant", "content": "Answer: 4"}



# ---------------------------------------------------------------- SFT schemas


def test_messages_schema_kept_and_extra_columns_dropped(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [SYSTEM, USER, ASSISTANT], "id": 7}] * 3)
    dataset = load_sft_dataset(source)
    assert dataset.column_names == ["messages"]
    assert len(dataset) == 3
    assert dataset[0]["messages"] == [SYSTEM, USER, ASSISTANT]


def test_prompt_completion_strings_become_message_lists(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is 2+2", "completion": "Answer: 4"}])
    row = load_sft_dataset(source)[0]
    assert row == {"prompt": [USER], "completion": [ASSISTANT]}


def test_prompt_completion_message_lists_kept(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}])
    row = load_sft_dataset(source)[0]
    assert row == {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}


def test_sharegpt_roles_mapped(tmp_path: Path) -> None:
    turns = [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "what is 2+2"},
        {"from": "gpt", "value": "Answer: 4"}, {"from": "user", "value": "and 3+3"},
        {"from": "assistant", "value": "Answer: 6"},
    ]
    row = load_sft_dataset(write_jsonl(tmp_path / "share.jsonl", [{"conversations": turns}]))[0]
    assert row["messages"] == [
        SYSTEM, USER, ASSISTANT, {"role": "user", "content": "and 3+3"}, {"role": "assistant", "content": "Answer: 6"},
    ]


def test_parquet_file_folder_and_max_rows(tmp_path: Path) -> None:
    rows = [{"messages": [USER, {"role": "assistant", "content": f"Answer: {i}"}]} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert len(load_sft_dataset(str(tmp_path / "chat.parquet"), max_rows=2)) == 2
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    assert len(load_sft_dataset(str(folder), split="train")) == 5
    assert load_sft_dataset(str(folder), split="test")[0]["messages"][1]["content"] == "Answer: 0"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [USER, {"role": "assistant"}]}, "messages[1] has no 'content'"),
        ({"messages": [USER, {"role": "robot", "content": "x"}]}, "messages[1] has role 'robot'"),
        ({"messages": [USER]}, "'messages' has no assistant message"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "conversations[1] has from='bot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "conversations[1] has no 'value'"),
        ({"prompt": "q", "completion": []}, "'completion' must be a non-empty list"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path: Path, row: dict, expected: str) -> None:
    good = {key: value for key, value in {
        "messages": [USER, ASSISTANT],
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "prompt": "q", "completion": [ASSISTANT],
    }.items() if key in row}
    source = write_jsonl(tmp_path / "bad_data.jsonl", [good, good, row, good])
    with pytest.raises(ValueError) as error:
        load_sft_dataset(source)
    assert "bad_data.jsonl row 2:" in str(error.value)
    assert expected in str(error.value)


def test_malformed_row_index_is_global_across_batches(tmp_path: Path) -> None:
    rows = [{"messages": [USER, ASSISTANT]}] * 2500
    rows[2345] = {"messages": [USER, {"role": "assistant"}]}
    with pytest.raises(ValueError, match=r"big\.jsonl row 2345: messages\[1\] has no 'content'"):
        load_sft_dataset(write_jsonl(tmp_path / "big.jsonl", rows))


def test_unknown_schema_lists_columns_and_accepted_schemas(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl: unknown SFT schema") as error:
        load_sft_dataset(source)
    message = str(error.value)
    assert "'instruction'" in message and "'output'" in message
    assert "'messages'" in message and "'conversations'" in message and "'completion'" in message


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="absent.jsonl: no such file or folder"):
        load_sft_dataset(str(tmp_path / "absent.jsonl"))


# ---------------------------------------------------------------- overlong filtering

WORDS = ["user", "assistant", "system", "what", "is", "2+2", "Answer:", "4", "w"]


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace-split; each message costs 3 tokens (start, role, end) plus one per word."""
    specials = ["[UNK]", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", additional_special_tokens=specials[1:])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    return tokenizer


def test_chatml_tokenizer_counts_as_documented() -> None:
    encoded = chatml_tokenizer().apply_chat_template([USER, ASSISTANT], tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    assert len(ids) == (3 + 3) + (3 + 2)


def test_drop_overlong_messages(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": " ".join(["w"] * k)}, ASSISTANT]} for k in (1, 5, 10, 20)]
    dataset = load_sft_dataset(write_jsonl(tmp_path / "lengths.jsonl", rows))
    # lengths: (3 + k) + 5 -> 9, 13, 18, 28
    kept, dropped = drop_overlong(dataset, chatml_tokenizer(), max_length=18)
    assert dropped == 1 and len(kept) == 3
    assert [len(row["messages"][0]["content"].split()) for row in kept] == [1, 5, 10]


def test_drop_overlong_prompt_completion_counts_both_sides(tmp_path: Path) -> None:
    rows = [{"prompt": "w w w", "completion": " ".join(["w"] * k)} for k in (1, 4)]
    dataset = load_sft_dataset(write_jsonl(tmp_path / "pc.jsonl", rows))
    # lengths: (3 + 3) + (3 + k) -> 10, 13; a prompt-only count would keep both
    kept, dropped = drop_overlong(dataset, chatml_tokenizer(), max_length=12)
    assert (len(kept), dropped) == (1, 1)


# ---------------------------------------------------------------- DAPO-Math


@needs_aime
def test_dapo_aime_dedupes_960_rows_to_30() -> None:
    dataset = load_dapo_math(str(AIME))
    assert len(dataset) == 30
    assert dataset.column_names == ["prompt", "ground_truth", "data_source", "index"]
    assert len(set(dataset["index"])) == 30
    for row in dataset:
        assert re.fullmatch(r"-?\d+", row["ground_truth"]), row["ground_truth"]
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert "Answer:" in row["prompt"][0]["content"]
        assert row["data_source"] == "math_dapo"


@needs_aime
def test_dapo_aime_without_dedupe_and_max_rows() -> None:
    assert len(load_dapo_math(str(AIME), dedupe=False)) == 960
    assert load_dapo_math(str(AIME), max_rows=5)["index"] == load_dapo_math(str(AIME))["index"][:5]


def dapo_rows(n: int) -> list[dict]:
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": f"problem {i % 3} Answer:", "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(i % 3), "style": "rule"},
            "extra_info": {"index": i % 3},
        }
        for i in range(n)
    ]


def test_dapo_missing_ground_truth_names_row(tmp_path: Path) -> None:
    rows = dapo_rows(6)
    rows[4]["reward_model"] = {"style": "rule"}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    with pytest.raises(ValueError, match=r"dapo\.parquet row 4: reward_model has no 'ground_truth'"):
        load_dapo_math(str(tmp_path / "dapo.parquet"))


def test_dapo_missing_prompt_content_names_row(tmp_path: Path) -> None:
    rows = dapo_rows(6)
    rows[5]["prompt"] = [{"role": "user"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    with pytest.raises(ValueError, match=r"dapo\.parquet row 5: prompt\[0\] has no 'content'"):
        load_dapo_math(str(tmp_path / "dapo.parquet"))


def test_dapo_dedupes_by_prompt_text_without_index(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "extra_info"} for row in dapo_rows(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    dataset = load_dapo_math(str(tmp_path / "dapo.parquet"))
    assert dataset["ground_truth"] == ["0", "1", "2"]
    assert dataset["index"] == [0, 1, 2]  # row positions of the first occurrences


# ---------------------------------------------------------------- GSM8K


@needs_gsm8k
def test_gsm8k_grpo_rows() -> None:
    dataset = load_gsm8k(str(GSM8K / "test.jsonl"))
    assert len(dataset) == 1319
    first = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[0])
    assert dataset[0]["ground_truth"] == first["answer"].split("#### ")[-1].replace(",", "").strip()
    assert first["question"] in dataset[0]["prompt"][0]["content"]
    assert "Answer:" in dataset[0]["prompt"][0]["content"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", truth) for truth in dataset["ground_truth"])


@needs_gsm8k
def test_gsm8k_sft_traces_from_folder_split() -> None:
    dataset = load_gsm8k(str(GSM8K), split="test", form="sft")
    grpo = load_gsm8k(str(GSM8K), split="test", max_rows=50)
    assert len(dataset) == 1319
    for row, reference in zip(dataset.select(range(50)), grpo, strict=True):
        user, assistant = row["messages"]
        assert user == reference["prompt"][0]
        text = assistant["content"]
        assert "<<" not in text and ">>" not in text
        assert text.startswith("<think>\n") and "\n</think>\n" in text
        assert text.splitlines()[-1] == f"Answer: {reference['ground_truth']}"


def test_gsm8k_answer_without_marker_names_row(tmp_path: Path) -> None:
    rows = [{"question": "q", "answer": "1+1=<<1+1=2>>2\n#### 2"}, {"question": "q", "answer": "no final line"}]
    with pytest.raises(ValueError, match=r"gsm\.jsonl row 1: 'answer' must be a string ending in '#### N'"):
        load_gsm8k(write_jsonl(tmp_path / "gsm.jsonl", rows))


def test_format_trace() -> None:
    assert format_trace("1+1=2\n", "2") == "<think>\n1+1=2\n</think>\nAnswer: 2"


# ---------------------------------------------------------------- skipping malformed rows, empty loads


def test_malformed_rows_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    rows = [{"messages": [USER, ASSISTANT]}, {"messages": [USER]}, {"messages": [USER, ASSISTANT]}]
    skipped: list[str] = []
    dataset = load_sft_dataset(write_jsonl(tmp_path / "mixed.jsonl", rows), skipped=skipped)
    assert len(dataset) == 2 and dataset.column_names == ["messages"]
    assert len(skipped) == 1 and "mixed.jsonl row 1: 'messages' has no assistant message" in skipped[0]


def test_all_rows_skipped_is_an_error(tmp_path: Path) -> None:
    rows = [{"question": "q", "answer": "no marker"}] * 3
    with pytest.raises(ValueError, match=r"gsm\.jsonl: no rows left to train on \(all 3 rows read were malformed"):
        load_gsm8k(write_jsonl(tmp_path / "gsm.jsonl", rows), skipped=[])


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "the file is empty"), ('{"messages": []}\nnot json\n', r"bad\.jsonl line 2: not JSON")],
)
def test_unreadable_jsonl_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sft_dataset(str(tmp_path / "bad.jsonl"))


def _dapo_row(i: int, **change) -> dict:
    row = {"data_source": "x", "prompt": [{"role": "user", "content": f"What is {i}+1?"}], "ability": "MATH",
           "reward_model": {"ground_truth": str(i + 1), "style": "rule"}, "extra_info": {"index": i}}
    return row | change


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (_dapo_row(1, reward_model={"style": "rule"}), r"row 1: reward_model has no 'ground_truth'"),
        (_dapo_row(1, prompt="What is 1+1?"), r"row 1: 'prompt' must be a non-empty list of \{role, content\}"),
        (_dapo_row(1, reward_model="2"), r"row 1: reward_model has no 'ground_truth'"),
    ],
    ids=["missing ground truth", "prompt not a message list", "reward_model not a dict"],
)
def test_dapo_rows_of_the_wrong_shape_are_named(tmp_path: Path, bad_row: dict, message: str) -> None:
    """Rows whose shape differs make arrow read the whole column as JSON text: the bad row is still named."""
    path = tmp_path / "dapo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_dapo_row(0), bad_row, _dapo_row(2)]))
    with pytest.raises(ValueError, match=message):
        load_dapo_math(str(path))


# ---------------------------------------------------------------- the SFT recipe's rows


def test_split_prompt_takes_the_turns_before_the_last_answer_and_its_reference():
    messages = {"messages": [SYSTEM, USER, {"role": "assistant", "content": format_trace("2+2=4", "4")}]}
    assert split_prompt(messages) == ([SYSTEM, USER], "4")
    pair = {"prompt": [USER], "completion": [{"role": "assistant", "content": "no final line"}]}
    assert split_prompt(pair) == ([USER], None)


def test_synthetic_rows_are_seeded_and_held_out_prompts_carry_their_answers(tmp_path):
    task = SyntheticTask(operators="+", modulus=10)
    rows = load_rows("synthetic", synthetic_rows=12, seed=3, task=task)
    assert rows["messages"] == load_rows("synthetic", synthetic_rows=12, seed=3, task=task)["messages"]
    assert rows["messages"] != load_rows("synthetic", synthetic_rows=12, seed=4, task=task)["messages"]
    assert len(load_rows("synthetic", max_rows=5, synthetic_rows=12, seed=3, task=task)) == 5
    prompts, answers = SFTData(rows, rows.select(range(4))).eval_prompts(10)
    assert len(prompts) == len(answers) == 4 and all(p[-1]["role"] == "user" for p in prompts)
    assert all(a is not None and 0 <= int(a) < 10 for a in answers)  # mod 10
