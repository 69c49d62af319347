from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

from looplm.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    apply_chat,
    build_tokenizer,
    fix_ouro_special_tokens,
)

CORPUS = [f"{i} + {i * 7} = {i * 8}\nThe answer is {i % 13}. héllo wörld" for i in range(2000)]
TRICKY = [
    "",
    "12345 + 67890 = 80235",
    "a  b\n\n\n  c\t\td \r\n",
    " leading and trailing  ",
    "héllo wörld 日本語 🙂 ∑ x² — ok",
    "x <think>\nreasoning</think>\nanswer <|im_end|> y",
    "3.14e-10, -0.5 . , ! ?",
]
USER, ASSISTANT, USER2 = "What is 2+3?", "<think>\n2+3=5</think>\n5", "And 4+4?"
CONV = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]
CONV_GEN = [*CONV, {"role": "user", "content": USER2}]
RENDERED = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n{ASSISTANT}<|im_end|>\n"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(CORPUS)


def ouro_like(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A tokenizer with the released checkpoints' quirk: bos = eos = pad = unk = `<|endoftext|>`, no template."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: leave the fixture untouched
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
    )


def test_special_token_ids(tok):
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in ids
    assert tok.padding_side == "left" and tok.chat_template == CHAT_TEMPLATE
    # The pad token is never produced by text, so it can't collide with a real token in a prompt.
    assert all(tok.pad_token_id not in tok.encode(s) for s in CORPUS[:50] + TRICKY)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids[:-1] or "<|im_end|>" in text  # no bos/eos added by plain encode
    assert tok.bos_token_id not in ids


def test_think_tokens_are_atomic_and_survive_skip_special(tok):
    ids = tok.encode("<think>\nx</think>\ny<|im_end|>")
    assert ids[0] == 3 and 4 in ids and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx</think>\ny"


def test_digits_split_individually(tok):
    # The corpus is full of repeated numbers: BPE would merge them if the pre-tokenizer let it.
    tokens = tok.convert_ids_to_tokens(tok.encode("12345 + 8008 = 20353"))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345800820353")
    assert len(tok) > 262  # merges did happen elsewhere


def test_training_is_deterministic():
    a = build_tokenizer(CORPUS * 2)
    b = build_tokenizer(iter(CORPUS * 2))  # any iterable, consumed once
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.get_vocab() != build_tokenizer().get_vocab()
    assert build_tokenizer().backend_tokenizer.to_str() == build_tokenizer(None).backend_tokenizer.to_str()
    assert len(build_tokenizer()) == 6 + 256


def test_vocab_size_respected_and_checked():
    words = [f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    assert len(build_tokenizer([" ".join(words)] * 3, vocab_size=300)) == 300
    with pytest.raises(ValueError):
        build_tokenizer(vocab_size=100)


@pytest.mark.parametrize(
    ("messages", "kwargs", "expected"),
    [
        (CONV, {}, RENDERED),
        (
            CONV_GEN,
            {"add_generation_prompt": True},
            RENDERED + f"<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n<think>\n",
        ),
        (
            CONV_GEN,
            {"add_generation_prompt": True, "enable_thinking": True},
            RENDERED + f"<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n<think>\n",
        ),
        (
            CONV_GEN,
            {"add_generation_prompt": True, "enable_thinking": False},
            RENDERED + f"<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n",
        ),
        (CONV, {"enable_thinking": False}, RENDERED),  # only the generation prompt depends on it
        (
            [{"role": "system", "content": "Be brief."}, *CONV],
            {},
            "<|im_start|>system\nBe brief.<|im_end|>\n" + RENDERED,
        ),
    ],
)
def test_chat_template_renders(tok, messages, kwargs, expected):
    assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_assistant_mask_covers_exactly_the_assistant_content(tok):
    out = tok.apply_chat_template(CONV_GEN[:2] + CONV, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Two assistant turns, each masked as its content + <|im_end|>, nothing else.
    span = tok.encode(ASSISTANT) + [tok.eos_token_id]
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert masked == span + span
    runs = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
    for start in runs:
        end = start + len(span)
        assert ids[start:end] == span and not mask[end]  # then the "\n", unmasked
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_prompt_is_a_token_prefix_of_prompt_plus_completion(tok):
    # TRL's prompt-completion SFT takes the completion to start where these two diverge; a thinking
    # completion's content starts with the "<think>\n" that the generation prompt already opened.
    cases = [(True, ASSISTANT, "2+3=5</think>\n5<|im_end|>\n"), (False, "5", "5<|im_end|>\n")]
    for thinking, content, generated in cases:
        prompt = apply_chat(tok, CONV[:1], enable_thinking=thinking)
        full = apply_chat(
            tok, [*CONV[:1], {"role": "assistant", "content": content}], add_generation_prompt=False
        )
        assert full[: len(prompt)] == prompt
        assert tok.decode(full[len(prompt) :]) == generated


def test_apply_chat_returns_plain_ids(tok):
    ids = apply_chat(tok, CONV_GEN)
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert ids == tok.apply_chat_template(CONV_GEN, add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(apply_chat(tok, CONV_GEN, enable_thinking=False)).endswith("assistant\n")


def test_left_padding_uses_the_pad_id(tok):
    batch = tok(["1", "1+2"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1]


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, tok.pad_token_id)
    assert loaded.padding_side == "left" and loaded.model_max_length == tok.model_max_length
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text) and loaded.decode(loaded.encode(text)) == text
    assert apply_chat(loaded, CONV_GEN) == apply_chat(tok, CONV_GEN)


def stand_in_model() -> SimpleNamespace:
    return SimpleNamespace(
        config=PretrainedConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0),
        generation_config=GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0),
    )


def ids_of(model: SimpleNamespace) -> list[tuple[int, int, int]]:
    return [(c.bos_token_id, c.eos_token_id, c.pad_token_id) for c in (model.config, model.generation_config)]


def test_fix_ouro_special_tokens(tok):
    quirky, model = ouro_like(tok), stand_in_model()
    assert (quirky.bos_token_id, quirky.eos_token_id, quirky.pad_token_id) == (0, 0, 0)
    assert quirky.chat_template is None
    for _ in range(2):  # idempotent
        fix_ouro_special_tokens(quirky, model)
        assert [quirky.bos_token, quirky.eos_token, quirky.pad_token] == [
            "<|im_start|>",
            "<|im_end|>",
            ENDOFTEXT,
        ]
        assert (quirky.bos_token_id, quirky.eos_token_id, quirky.pad_token_id) == (1, 2, 0)
        assert ids_of(model) == [(1, 2, 0), (1, 2, 0)]
        assert quirky.chat_template == CHAT_TEMPLATE
    # A model alone gets Ouro's ids; a model without generation_config is fine.
    model = stand_in_model()
    fix_ouro_special_tokens(model=model)
    assert ids_of(model) == [(1, 2, 0), (1, 2, 0)]
    bare = SimpleNamespace(config=PretrainedConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0))
    fix_ouro_special_tokens(model=bare)
    assert (bare.config.bos_token_id, bare.config.eos_token_id, bare.config.pad_token_id) == (1, 2, 0)


def test_fix_keeps_a_distinct_pad_and_an_existing_template(tok):
    fixed, model = ouro_like(tok), stand_in_model()
    fixed.pad_token, fixed.chat_template = "<|pad|>", "custom"
    fix_ouro_special_tokens(fixed, model)
    assert fixed.pad_token_id == 5 and fixed.chat_template == "custom"
    assert ids_of(model) == [(1, 2, 5), (1, 2, 5)]  # the model follows the tokenizer


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_fix_replaces_a_pad_that_is_unset_or_the_new_eos(tok, pad):
    quirky = ouro_like(tok)
    quirky.pad_token = pad
    fix_ouro_special_tokens(quirky)
    assert quirky.pad_token == ENDOFTEXT and quirky.pad_token_id == 0


def test_fix_fails_on_a_tokenizer_without_chat_tokens():
    backend = Tokenizer(models.WordLevel({ENDOFTEXT: 0, "a": 1}, unk_token=ENDOFTEXT))
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=ENDOFTEXT)
    assert plain.convert_tokens_to_ids("<|im_start|>") == 0  # what a lookup through the unk would give
    with pytest.raises(ValueError, match="im_start"):
        fix_ouro_special_tokens(plain)
