"""Reasoning SFT recipe: loop-aware losses in TRL's SFTTrainer, labels, saving, LoRA merge, resume, packing.

Every run uses configs/sft_tiny.yaml with overrides that shrink it (hidden 32, a few dozen synthetic rows,
a handful of steps), so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig

import looplm
from configs import ConfigError, load_config
from looplm.losses import stage1_loss
from posttrain.data import SFTData, drop_long_rows
from posttrain.evaluation import is_well_formed
from posttrain.sft_recipe import (
    ModelSection,
    SFTRecipeConfig,
    build_model_and_tokenizer,
    load_sft_data,
    make_trainer,
    run_sft,
    setup,
)
from posttrain.sft_trainer import ObjectiveSection, objective_loss
from posttrain.synthetic import SyntheticTask, to_dataset
from tests.helpers import REPO_ROOT, tiny_model, write_jsonl

TINY_YAML = REPO_ROOT / "configs" / "sft_tiny.yaml"
SHRINK = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.total_ut_steps=3",
    "model.tokenizer_vocab_size=300",
    "data.synthetic_rows=80",
    "data.eval_rows=16",
    "training.per_device_train_batch_size=8",
    "training.per_device_eval_batch_size=16",
    "training.max_length=96",
    "training.logging_steps=1",
    "training.save_strategy=no",
    "training.warmup_steps=0",
    "training.max_steps=4",
    "sample.num_prompts=0",
]


def tiny_cfg(tmp_path: Path, *overrides: str) -> SFTRecipeConfig:
    return load_config(
        SFTRecipeConfig, TINY_YAML, [*SHRINK, f"training.output_dir={tmp_path / 'out'}", *overrides]
    )


def trainer_for(tmp_path: Path, *overrides: str):
    cfg = tiny_cfg(tmp_path, *overrides)
    data, model, tokenizer = setup(cfg)
    return make_trainer(cfg, model, tokenizer, data), cfg


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


# ---------------------------------------------------------------------------------------------- configs


ON_CPU = ["training.bf16=false", "training.use_cpu=true"]  # the Ouro config assumes a GPU (bf16)


@pytest.mark.parametrize("name", ["sft_tiny.yaml", "sft_ouro_1.4b.yaml"])
def test_every_sft_config_loads_and_starts_with_its_command(name):
    path = REPO_ROOT / "configs" / name
    cfg = load_config(SFTRecipeConfig, path, None if torch.cuda.is_available() else ON_CPU)
    assert isinstance(cfg.training, SFTConfig)  # TRL's own class, not a copy of its fields
    assert path.read_text().splitlines()[0] == f"# python run.py sft --config configs/{name}"
    assert cfg.objective.kind in ("final", "stage1", "mean")


def test_ouro_config_follows_the_paper():
    path = REPO_ROOT / "configs" / "sft_ouro_1.4b.yaml"
    t = load_config(SFTRecipeConfig, path, None if torch.cuda.is_available() else ON_CPU).training
    assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.lr_scheduler_type) == (2e-5, 0.9, 0.95, "cosine")
    assert t.max_length == 32768 and t.activation_checkpointing and t.num_train_epochs == 2
    assert "  bf16: true" in path.read_text()


def test_bad_keys_fail_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match="objective.*kind"):
        tiny_cfg(tmp_path, "objective.kind=stage2")
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_cfg(tmp_path, "training.lr_warmup=3")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        tiny_cfg(tmp_path, "training.learnig_rate=3")


# ---------------------------------------------------------------------------------------------- objectives


def test_stage1_loss_hand_computed():
    # T = 3, one token: gates 0, 0 -> lambda = (1/2, 1/2) -> p = (1/2, 1/4, 1/4); CE per loop (3, 2, 1).
    # Expected CE = 1.5 + 0.5 + 0.25 = 2.25; H(p) = (1/2) ln 2 + 2 (1/4) ln 4 = 1.5 ln 2.
    ce = torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1)  # (T, B, S-1)
    # (B, S, T): the last loop's gate is never used, nor are the gates of the last position (no next token).
    gate_logits = torch.tensor([[[0.0, 0.0, 5.0], [9.0, 9.0, 9.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = stage1_loss(ce, gate_logits, mask, beta=0.1)
    assert loss.item() == pytest.approx(2.25 - 0.1 * 1.5 * math.log(2), abs=1e-6)
    assert stats["exit_entropy"].item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert stats["exit_pdf"].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)
    # Through the recipe's dispatch, and beta = 0 leaves the expected CE alone.
    stage1_no_entropy = ObjectiveSection("stage1", beta=0.0)
    assert objective_loss(stage1_no_entropy, ce, mask, gate_logits).item() == pytest.approx(2.25)
    assert objective_loss(ObjectiveSection("mean"), ce, mask, gate_logits).item() == pytest.approx(2.0)
    assert objective_loss(ObjectiveSection("final"), ce, mask, gate_logits).item() == pytest.approx(1.0)


def manual_stage1(model, batch, beta: float, normalizer) -> torch.Tensor:
    """Stage I from the model's per-loop logits and sigmoid/cumprod, independent of looplm.losses."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_loop_logits=True,
        use_cache=False,
    )
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    ce = torch.stack(
        [
            F.cross_entropy(lg[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
            for lg in out.loop_logits
        ],
        dim=-1,
    )  # (B, S-1, T)
    lam = torch.sigmoid(out.gate_logits[:, :-1])
    survive = torch.cumprod(1 - lam, dim=-1)
    p = torch.cat([lam[..., :1], lam[..., 1:-1] * survive[..., :-2], survive[..., -2:-1]], dim=-1)
    per_token = (p * ce).sum(-1) + beta * (p * p.log()).sum(-1)
    return (per_token * mask).sum() / normalizer


def test_stage1_trainer_loss_matches_an_independent_computation_and_accumulates(tmp_path):
    trainer, _ = trainer_for(tmp_path, "objective.kind=stage1", "objective.beta=0.1")
    model, batch = trainer.model.train(), first_batch(trainer)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    assert loss.item() == pytest.approx(manual_stage1(model, batch, 0.1, n_items).item(), rel=1e-5)
    # Gradient accumulation: halves normalised by the whole batch's token count sum to the whole-batch loss.
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    summed = sum(trainer.compute_loss(model, h, num_items_in_batch=n_items) for h in halves)
    assert summed.item() == pytest.approx(loss.item(), rel=1e-5)
    assert set(trainer._metrics["train"]) >= {"ce_loop1", "ce_loop3", "exit_entropy", "exit_p3"}


def test_final_objective_through_the_fused_head_is_last_loop_cross_entropy(tmp_path):
    trainer, _ = trainer_for(tmp_path, "objective.kind=final")
    model, batch = trainer.model.train(), first_batch(trainer)
    fused = trainer.compute_loss(model, dict(batch))  # TRL's fused lm-head path (model.base_model)
    loop_path, _ = trainer.loop_loss(model, dict(batch))
    assert fused.item() == pytest.approx(loop_path.item(), rel=1e-5)
    plain = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, use_cache=False).loss
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)


def params_of(model, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


@pytest.mark.parametrize(
    ("kind", "gate_trainable", "gate_moves"),
    [("stage1", True, True), ("stage1", False, False), ("final", True, False), ("mean", True, False)],
)
def test_gate_trains_only_under_stage1_when_trainable(tmp_path, kind, gate_trainable, gate_moves):
    trainer, _ = trainer_for(
        tmp_path,
        f"objective.kind={kind}",
        f"objective.gate_trainable={str(gate_trainable).lower()}",
        "training.max_steps=2",
    )
    gate0, mlp0 = params_of(trainer.model, "early_exit_gate"), params_of(trainer.model, "mlp.down_proj")
    trainer.train()
    gate1, mlp1 = params_of(trainer.model, "early_exit_gate"), params_of(trainer.model, "mlp.down_proj")
    assert any(not torch.equal(gate0[n], gate1[n]) for n in gate0) == gate_moves
    assert all(not torch.equal(mlp0[n], mlp1[n]) for n in mlp0)


# ------------------------------------------------------------------------------------------ data and labels



def test_labels_cover_assistant_tokens_only(tmp_path):
    trainer, _ = trainer_for(tmp_path)
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    assert trained.startswith("<think>\n") and trained.endswith("<|im_end|>") and "Answer: " in trained
    assert "Compute" not in trained and "user" not in trained


def test_prompt_completion_data_trains_on_the_completion_only(tmp_path):
    rows = [
        {"prompt": f"Compute {i}+{i}.", "completion": f"<think>\n{i}+{i}={2 * i}\n</think>\nAnswer: {2 * i}"}
        for i in range(24)
    ]
    source = write_jsonl(tmp_path / "pc.jsonl", rows)
    trainer, _ = trainer_for(tmp_path, f"data.train={source}", "data.eval_rows=4")
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    full = tok.decode(row["input_ids"])
    assert full.startswith("<|im_start|>user\nCompute") and "Compute" not in trained
    assert "</think>\nAnswer: " in trained and "<|im_end|>" in trained


def test_malformed_row_is_named_and_overlong_rows_are_counted(tmp_path):
    good = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nx\n</think>\nAnswer: 1"},
        ]
    }
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    source = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(ValueError, match="row 2"):
        load_sft_data(tiny_cfg(tmp_path, f"data.train={source}").data)
    cfg = tiny_cfg(tmp_path)
    data = load_sft_data(cfg.data)
    _, tokenizer = build_model_and_tokenizer(
        cfg.model, [m["content"] for r in data.train for m in r["messages"]]
    )
    lengths = sorted(len(tokenizer.apply_chat_template(r["messages"], return_dict=False)) for r in data.train)
    limit = lengths[len(lengths) // 2]
    kept = drop_long_rows(data, tokenizer, limit)
    assert kept.dropped["train"] == sum(n > limit for n in lengths) > 0
    assert len(kept.train) + kept.dropped["train"] == len(data.train)
    with pytest.raises(ValueError, match="no training rows left"):
        drop_long_rows(data, tokenizer, lengths[0] - 1)
    # overlong=truncate keeps every row and cuts it to max_length instead (TRL's keep_start).
    trainer, _ = trainer_for(tmp_path / "cut", "data.overlong=truncate", f"training.max_length={limit}")
    assert len(trainer.train_dataset) == len(data.train)
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == limit


def ouro_style_folder(path: Path) -> Path:
    """A checkpoint with the released Ouro quirks: bos = eos = pad = id 0, no chat template, no think tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator([], trainers.BpeTrainer(special_tokens=specials, initial_alphabet=alphabet))
    quirk = dict.fromkeys(["bos_token", "eos_token", "pad_token"], "<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **quirk)
    model = tiny_model(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_an_ouro_checkpoint_gets_the_template_the_think_tokens_and_the_bos_eos_fix(tmp_path):
    folder = ouro_style_folder(tmp_path / "ouro")
    section = ModelSection(path=str(folder), total_ut_steps=2)
    model, tok = build_model_and_tokenizer(section)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert model.generation_config.eos_token_id == 2 and model.config.total_ut_steps == 2
    think = tok.encode("<think>\nx</think>", add_special_tokens=False)
    assert think[0] == len(tok) - 2 and len(tok) - 1 in think  # added as single tokens ...
    assert model.get_input_embeddings().num_embeddings == model.lm_head.out_features == len(tok)  # ... and sized
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_well_formed_completions():
    opened, plain = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"
    assert is_well_formed("3+4=7\n</think>\nAnswer: 7", "stop", opened)
    assert is_well_formed("<think>\n3+4=7\n</think>\nAnswer: 7", "stop", plain)  # the completion opens it
    assert not is_well_formed("3+4=7\n</think>\nAnswer: 7", "length", opened)  # never stopped
    assert not is_well_formed("3+4=7\n</think>\nAnswer: 7", "stop", plain)  # closes a block never opened
    assert not is_well_formed("3+4=7\nAnswer: 7", "stop", opened)  # never closed the think block
    assert not is_well_formed("3+4=7\n</think>\n", "stop", opened)  # no answer
    assert not is_well_formed("3\n</think>\n4\n</think>\nAnswer: 7", "stop", opened)  # two closings
    # A model trained on direct answers: a stop and an Answer: line, no think block.
    assert is_well_formed("Answer: 7", "stop", plain, thinking=False)
    assert not is_well_formed("Answer: 7", "length", plain, thinking=False)
    assert not is_well_formed("7", "stop", plain, thinking=False)


def test_the_sample_check_prompts_as_the_replies_were_trained():
    """Direct-answer replies (the compose task) are sampled without the template's opening <think>."""
    direct = SFTData(Dataset.from_list([]), to_dataset(SyntheticTask(kind="compose").rows(2, 0), ["messages"]))
    traced = SFTData(Dataset.from_list([]), to_dataset(SyntheticTask().rows(2, 0), ["messages"]))
    assert not direct.replies_think() and traced.replies_think()
    assert SFTData(Dataset.from_list([]), None).replies_think()  # nothing held out: the template's default


# ---------------------------------------------------------------------------------------------- end to end


def test_run_lowers_held_out_loss_and_saves_a_loadable_folder(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "training.max_steps=12",
        "training.learning_rate=0.01",
        "sample.num_prompts=2",
        "sample.max_new_tokens=6",
    )
    results = run_sft(cfg)
    before, after = results["eval_before"]["eval_ce_loop3"], results["eval_after"]["eval_ce_loop3"]
    assert after < before - 0.5
    out = Path(cfg.training.output_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["OuroForCausalLM"] and config["model_type"] == "ouro"
    assert config["total_ut_steps"] == 3
    generation = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2) == (tok.bos_token_id, tok.eos_token_id)
    assert generation["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert (out / "sft_config.yaml").exists()
    assert json.loads((out / "sft_results.json").read_text())["global_step"] == 12
    assert results["sample"]["num_prompts"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(reloaded, looplm.LoopLMForCausalLM)


def test_lora_merged_model_matches_the_adapter_model(tmp_path):
    cfg = tiny_cfg(tmp_path, "lora.enabled=true", "lora.r=4", "training.learning_rate=0.05", "training.max_steps=3")
    results = run_sft(cfg)
    assert results["lora_adapter_max_abs_effect"] > 1e-2  # the adapter learned something to merge
    # Merged, saved and reloaded through AutoModelForCausalLM: equal up to fp32 rounding.
    assert results["lora_merge_max_abs_diff"] < 2e-5
    out = Path(cfg.training.output_dir)
    saved = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert saved and not any("lora" in k or "base_layer" in k for k in saved)


class StopAt(TrainerCallback):
    """Simulates an interruption: save a checkpoint at `step` and stop."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = control.should_training_stop = True


def step_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads(next(output_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_resume_continues_the_step_counter_and_the_data_order(tmp_path):
    common = ["training.max_steps=6", "training.save_strategy=steps", "training.save_steps=6",
              "training.save_total_limit=1", "data.eval_rows=4"]
    whole = run_sft(tiny_cfg(tmp_path / "a", *common))
    interrupted = tiny_cfg(tmp_path / "b", *common)
    run_sft(interrupted, callbacks=[StopAt(3)])
    checkpoints = Path(interrupted.training.output_dir).glob("checkpoint-*")
    assert [p.name for p in checkpoints] == ["checkpoint-3"]
    resumed = run_sft(tiny_cfg(tmp_path / "b", *common, "training.resume_from_checkpoint=latest"))
    assert whole["global_step"] == resumed["global_step"] == 6
    reference = step_losses(Path(tiny_cfg(tmp_path / "a").training.output_dir))
    continued = step_losses(Path(interrupted.training.output_dir))
    assert sorted(continued) == [1, 2, 3, 4, 5, 6]
    # Same weights, optimizer state and batches after the restart: the same loss at every later step.
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), step


def test_packing_keeps_sequences_apart(tmp_path):
    trainer, _ = trainer_for(tmp_path, "training.packing=true")
    batch = first_batch(trainer)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free rows
    starts = (batch["position_ids"][0] == 0).nonzero()[:, 0].tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 2
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits
            assert (packed[:, a:b] - alone).abs().max().item() < 1e-4
    assert trainer.compute_loss(model.train(), dict(batch)).isfinite()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for flag in ("false", "true"):
        trainer, _ = trainer_for(
            tmp_path / flag, f"training.activation_checkpointing={flag}", "objective.kind=stage1"
        )
        trainer.model.train()
        if flag == "true":  # what Trainer.train does with the flag
            trainer.model.activation_checkpointing_enable()
            assert trainer.model.model.layers[0].gradient_checkpointing
        trainer.compute_loss(trainer.model, dict(first_batch(trainer))).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
