"""Loading Ouro-layout checkpoint folders and LoopRL saves through the Auto classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import looplm
from tests.helpers import tiny_model

# The public Ouro-1.4B config.json, as its authors ship it (transformers 4.x field names, remote-code auto_map).
OURO_1_4B_CONFIG = {
    "architectures": ["OuroForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_ouro.OuroConfig",
        "AutoModel": "modeling_ouro.OuroModel",
        "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
    },
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "layer_types": ["full_attention"] * 24,
    "max_position_embeddings": 65536,
    "max_window_layers": 24,
    "model_type": "ouro",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "transformers_version": "4.55.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 49152,
}


def ouro_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors under Ouro's checkpoint keys, written out independently of our module tree."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    weights = {
        "model.embed_tokens.weight": rand(v, d),
        "model.norm.weight": 1 + rand(d),
        "model.early_exit_gate.weight": rand(1, d),
        "model.early_exit_gate.bias": rand(1),
        "lm_head.weight": rand(v, d),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(nh * hd, d),
            p + "self_attn.k_proj.weight": rand(nkv * hd, d),
            p + "self_attn.v_proj.weight": rand(nkv * hd, d),
            p + "self_attn.o_proj.weight": rand(d, nh * hd),
            p + "mlp.gate_proj.weight": rand(f, d),
            p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
        }
        for norm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            weights[p + norm + ".weight"] = 1 + rand(d)
    return weights


def tiny_ouro_config() -> dict:
    return OURO_1_4B_CONFIG | {
        "hidden_size": 32, "intermediate_size": 48, "head_dim": 8, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2,
        "max_window_layers": 2, "vocab_size": 64, "torch_dtype": "float32",
    }


def write_folder(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: t.contiguous() for k, t in weights.items()}, str(path / "model.safetensors"))
    return path


def test_ouro_folder_loads_through_auto_classes_without_remote_code(tmp_path):
    config, weights = tiny_ouro_config(), ouro_weights(tiny_ouro_config())
    folder = write_folder(tmp_path / "ouro", config, weights)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, looplm.LoopLMForCausalLM)
    assert model.config.total_ut_steps == 4 and model.config.rope_parameters["rope_theta"] == 1e6
    state = model.state_dict()
    assert set(state) == set(weights)
    for key, tensor in weights.items():
        assert torch.equal(state[key], tensor), key
    # ... and a LoopRL save of it loads back to the same function.
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["model_type"] == "ouro" and saved["architectures"] == ["OuroForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_real_ouro_configs_load_with_their_sizes():
    for layers, billions in ((24, 1.4), (48, 2.6)):
        raw = OURO_1_4B_CONFIG | {"num_hidden_layers": layers, "layer_types": ["full_attention"] * layers}
        config = AutoConfig.for_model(**raw)
        assert isinstance(config, looplm.LoopLMConfig)
        assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (2048, 128, 16)
        with torch.device("meta"):
            model = looplm.LoopLMForCausalLM(config)
        params = sum(p.numel() for p in model.parameters()) / 1e9
        assert abs(params - billions) < 0.2, params
        # A full (loop, layer) cache is T times a plain model's: 4 x 24 x 2 x 16 x 128 x 2 bytes in bf16.
        assert looplm.LoopKVCache.bytes_per_token(config, "full", dtype=torch.bfloat16) == 4 * layers * 2 * 2048 * 2


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 99, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_tensor_is_an_error_naming_the_key(tmp_path):
    weights = ouro_weights(tiny_ouro_config())
    del weights["model.layers.1.input_layernorm_2.weight"]
    folder = write_folder(tmp_path / "m", tiny_ouro_config(), weights)
    with pytest.raises(ValueError, match=r"missing tensor\(s\).*model\.layers\.1\.input_layernorm_2\.weight"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_misshaped_tensor_is_an_error_naming_the_key(tmp_path):
    weights = ouro_weights(tiny_ouro_config())
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 32)
    folder = write_folder(tmp_path / "m", tiny_ouro_config(), weights)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight \(47, 32\) in checkpoint, \(48, 32\)"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_unexpected_tensor_is_an_error_naming_the_key(tmp_path):
    weights = ouro_weights(tiny_ouro_config()) | {"model.extra_head.weight": torch.zeros(2, 2)}
    folder = write_folder(tmp_path / "m", tiny_ouro_config(), weights)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*model\.extra_head\.weight"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_unknown_model_type_is_an_error_naming_it(tmp_path):
    config = tiny_ouro_config() | {"model_type": "ouroboros"}
    del config["auto_map"]  # with remote code named, transformers asks to trust it instead
    folder = write_folder(tmp_path / "m", config, {})
    with pytest.raises(ValueError, match="ouroboros"):
        AutoModelForCausalLM.from_pretrained(folder)
    folder = write_folder(tmp_path / "q", tiny_ouro_config() | {"model_type": "qwen2"}, {})
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        looplm.LoopLMForCausalLM.from_pretrained(folder)
