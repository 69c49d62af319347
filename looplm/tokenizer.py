"""Tokenizer side of an Ouro-style LoopLM: a ChatML chat template, an offline byte-level BPE stand-in with
Ouro's special-token ids, and the fix for the released checkpoints' bos/eos/pad quirk.

Ouro's ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`. The released checkpoints set bos, eos and
pad all to 0; the chat format needs bos = 1 and eos = 2 (looplm-facts.md, "Known quirk").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE, PAD = "<think>", "</think>", "<|pad|>"
# Order = ids: the first three match Ouro's vocabulary; the rest follow (Ouro has its own ids for them).
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK_OPEN, THINK_CLOSE, PAD]
MODEL_MAX_LENGTH = 4096

# ChatML. Every emitted string goes through `{{- ... }}` so the template's own layout adds no whitespace.
# `{% generation %}` covers the assistant content and its `<|im_end|>` (the model must learn to stop), not the
# header or the trailing newline: that span is what `return_assistant_tokens_mask=True` (TRL's
# `assistant_only_loss`) marks. Thinking variants expect `<think>` opened at the start of the assistant turn,
# so the generation prompt opens it unless `enable_thinking=false`; a thinking completion then starts right
# after it, and SFT data for it starts its content with "<think>\n" so prompt ids stay a prefix.
CHAT_TEMPLATE = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is not defined or enable_thinking %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on `corpus` (no corpus: the 256-byte alphabet, no merges).

    Deterministic: the BPE trainer sorts its alphabet and breaks merge ties by pair, so the same corpus gives
    the same vocab in any process. Ids: `SPECIAL_TOKENS` first (0..5), then the bytes, then the merges.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold {len(SPECIAL_TOKENS)} special tokens + 256 bytes"
        )
    tok = Tokenizer(models.BPE())
    # No normalizer: every string must round-trip exactly. Digits are split one by one before the byte-level
    # split so numbers tokenize the same way wherever they occur (arithmetic tasks).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else [], trainer=trainer)
    # `<think>`/`</think>` stay single tokens but are not "special", as in Qwen3: decoding with
    # skip_special_tokens=True keeps them, so reward code can still find the end of the reasoning.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # No unk token: byte-level BPE never needs one, and with one set `convert_tokens_to_ids` maps any unknown
    # string to it silently.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,  # never produced by text: a pad id can't hide real tokens (looplm-facts.md)
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",  # prompts are left-padded for generation
        # Cleanup rewrites " ." as "." and breaks the round trip (5.23 skips it for BPE, with a warning).
        clean_up_tokenization_spaces=False,
    )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    # Look up in the vocab rather than `convert_tokens_to_ids`, which returns the unk id (0 = `<|endoftext|>`
    # in Ouro's tokenizer) for a missing token instead of failing.
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"{token!r} is not in the tokenizer's vocabulary")
    return vocab[token]


def fix_ouro_special_tokens(tokenizer: PreTrainedTokenizerBase | None = None, model: Any = None) -> None:
    """Set bos = `<|im_start|>`, eos = `<|im_end|>` (and pad = `<|endoftext|>` when pad is unset or would equal
    eos) on the tokenizer, and the same ids on `model.config` and `model.generation_config`. Idempotent.

    Ids come from the tokenizer's vocab when one is given, else Ouro's 1/2/0. Also installs CHAT_TEMPLATE on a
    tokenizer that has no chat template.
    """
    bos_id, eos_id, pad_id = 1, 2, 0
    if tokenizer is not None:
        bos_id, eos_id = _token_id(tokenizer, IM_START), _token_id(tokenizer, IM_END)
        tokenizer.bos_token, tokenizer.eos_token = IM_START, IM_END
        if tokenizer.pad_token is None or tokenizer.pad_token_id == eos_id:
            _token_id(tokenizer, ENDOFTEXT)  # fail loudly rather than set a pad the vocab lacks
            tokenizer.pad_token = ENDOFTEXT
        pad_id = tokenizer.pad_token_id
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHAT_TEMPLATE
    if model is not None:
        # generate() reads generation_config, the loss and our code read config: they must agree.
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = bos_id, eos_id, pad_id


def apply_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
) -> list[int]:
    """Token ids of one rendered conversation, as a plain list.

    In transformers 5 `apply_chat_template(..., tokenize=True)` returns a BatchEncoding by default
    (`return_dict=True`); rollout code needs the bare ids, ready for a generation prompt.
    """
    ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)
