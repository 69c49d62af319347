"""LoopLM: an Ouro-style looped decoder, weight-compatible with the Ouro checkpoints.

The whole stack of L layers is applied T times ("loops") with shared weights; after every loop the final
norm is applied and its output both feeds the next loop and goes to the exit gate. Positions are the same in
every loop. Parameter names follow Ouro's checkpoint keys, so loading is a checked key-by-key copy.

Per-token depth ("exit steps", 1..T) is handled inside the backbone, so that TRL's fused lm-head path, which
calls `model.base_model(...)` and reads `.last_hidden_state`, sees each token's state at its exit loop:
  * a token that exits at loop e takes its output from its state after loop e;
  * for every deeper loop t > e its K/V at each layer is its loop-e K/V ("last exited"), exactly what the
    rollout engine's cache holds, so a parallel forward replays an adaptive-depth rollout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .batch_invariant import exact_mode_aware
from .cache import LoopKVCache, SlotKVCache, keep_exited
from .configuration_looplm import LoopLMConfig
from .exits import ExitRule, ExitTracker

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward kwargs, outputs, generate()'s
# model_kwargs). The model speaks the new name; a caller's `past_key_values=` still works, with a FutureWarning
# (transformers' `deprecate_kwarg`, as on its own models). generate() on 5.23 keeps the cache under the old
# key, which the three generation hooks below translate.
GENERATE_CACHE_KEY = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"

# ----------------------------------------------------------------------------------------------------------
# Building blocks


class LoopLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (looplm.decode calls it too: the same op order keeps it close to training)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class LoopLMRotaryEmbedding(nn.Module):
    # No buffer: transformers 5 builds models on the meta device and leaves non-persistent buffers
    # uninitialised on load, and recomputing d/2 frequencies per forward costs nothing.
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.dim, self.theta = config.head_dim, float(config.rope_parameters["rope_theta"])

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=position_ids.device).float() / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, d): broadcasts over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LoopLMAttention(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, h, rope, mask, is_causal, active, last_kv, cache, loop, layer_idx):
        B, S, _ = h.shape
        q = self.q_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = self.k_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, d)
        v = self.v_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if active is not None:  # "last exited": tokens past their exit loop keep that loop's K/V
            k, v = keep_exited(k, last_kv[0], active), keep_exited(v, last_kv[1], active)
        new_kv = (k, v)
        if cache is not None:
            k, v = cache.update_loop(k, v, loop, layer_idx)  # (B, Hkv, past + S, d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), new_kv


class LoopLMMLP(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopLMDecoderLayer(GradientCheckpointingLayer):
    """Ouro's "sandwich" layer: every sub-block is normed both before and after."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.self_attn = LoopLMAttention(config)
        self.mlp = LoopLMMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = LoopLMRMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = LoopLMRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = LoopLMRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = LoopLMRMSNorm(config.hidden_size, eps)

    def forward(self, h, rope, mask, is_causal, active, last_kv, loop, layer_idx, cache=None):
        attn, new_kv = self.self_attn(
            self.input_layernorm(h), rope, mask, is_causal, active, last_kv, cache, loop, layer_idx
        )
        h = h + self.input_layernorm_2(attn)
        h = h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
        return h, new_kv


# ----------------------------------------------------------------------------------------------------------
# Positions and masks: always from lengths (the attention mask), never from comparing ids with the pad id.


def position_ids_from_mask(attention_mask: torch.Tensor | None, past_len: int, q: int, device) -> torch.Tensor:
    """(B, q) positions: real tokens count from 0 whatever the left padding, as in the rollout engine."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]


def build_attention_mask(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor, q: int, past_len: int
) -> tuple[torch.Tensor | None, bool]:
    """-> (boolean mask (B, 1, q, past + q) or None, is_causal) for SDPA.

    Handles padding (a 2-D 0/1 mask over past + q positions) and packed rows (no mask, positions that restart
    at 0, as TRL's padding-free SFT passes them): tokens then attend within their own sequence only.
    """
    device = position_ids.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    packed = attention_mask is None and past_len == 0 and q > 1 and bool((position_ids[:, 1:] == 0).any())
    if not padded and not packed and (past_len == 0 or q == 1):  # a chunk after a cache needs the offset mask
        return None, past_len == 0 and q > 1
    rows = torch.arange(past_len, past_len + q, device=device)[:, None]
    cols = torch.arange(past_len + q, device=device)[None, :]
    mask = (cols <= rows)[None, None]  # (1, 1, q, kv)
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if packed:
        segment = (position_ids == 0).cumsum(-1)  # (B, q)
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    # A query that may see nothing (a pad position) would make SDPA return NaN: let it see itself.
    return mask | (cols == rows)[None, None], False


# ----------------------------------------------------------------------------------------------------------
# Models


@dataclass
class LoopLMModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None  # (B, S, D) each token's state at its exit loop
    cache: LoopKVCache | None = None
    exit_steps: torch.LongTensor | None = None  # (B, S) in 1..num_loops
    gate_logits: torch.FloatTensor | None = None  # (B, S, loops run) exit-gate logits per loop
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None  # per loop (B, S, D), if asked for


@dataclass
class LoopLMCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # (B, S, V) from each token's exit loop
    cache: LoopKVCache | None = None
    exit_steps: torch.LongTensor | None = None
    gate_logits: torch.FloatTensor | None = None
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    loop_logits: torch.FloatTensor | None = None  # (loops, B, S, V), if asked for


class LoopLMPreTrainedModel(PreTrainedModel):
    config_class = LoopLMConfig
    config: LoopLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LoopLMDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, made strict: a missing, unexpected or mis-shaped tensor is an error naming it.

        (transformers would only warn and leave a randomly initialised weight behind.)
        """
        want_info = kwargs.pop("output_loading_info", False)
        where = Path(str(pretrained_model_name_or_path))
        # transformers raises on a size mismatch but names the tensor only in a logged report: load with
        # mismatches allowed and raise below with the names.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {
            "missing": sorted(info.get("missing_keys") or []),
            "unexpected": sorted(info.get("unexpected_keys") or []),
            "mis-shaped": sorted(_describe_mismatch(k) for k in info.get("mismatched_keys") or []),
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            details = "; ".join(f"{kind} tensor(s): {keys}" for kind, keys in problems.items())
            raise ValueError(f"{where}: checkpoint does not match {cls.__name__} ({details})")
        return (model, info) if want_info else model


def _describe_mismatch(entry) -> str:
    """transformers lists a mismatch as (key, checkpoint shape, model shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, found, expected = entry
        return f"{key} {tuple(found)} in checkpoint, {tuple(expected)} expected"
    return str(entry)


class LoopLMModel(LoopLMPreTrainedModel):
    """The backbone: embeddings, the looped layer stack, the final norm and the exit gate."""

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LoopLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LoopLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.rotary_emb = LoopLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @exact_mode_aware  # config.exact_mode: batch-invariant kernels (looplm.batch_invariant)
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as transformers' own models do
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopKVCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        exit_steps: torch.LongTensor | None = None,
        exit_threshold: float | torch.Tensor | None = None,
        output_loop_states: bool = False,
        exit_hidden_eps: float | None = None,
        exit_temperature: float = 1.0,
        **kwargs,
    ) -> LoopLMModelOutput:
        """Args beyond transformers' usual ones:
        num_loops: run this many loops instead of `config.total_ut_steps`.
        exit_steps: (B, S) LongTensor in 1..num_loops, each token's exit loop (replays a rollout).
        exit_threshold: Q-exit threshold q decided on the fly per token (the rollout engine's adaptive depth), or a
            (B, S) tensor of per-token thresholds (sampled exits, gate logits divided by `exit_temperature`).
        exit_hidden_eps: exit a token once its state's relative change between loops is below eps (see ExitTracker).
        output_loop_states: also return every loop's (normed) hidden states.
        """
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        B, S, _ = h.shape
        n_loops = self._check_depth_args(num_loops, exit_steps, exit_threshold, B, S, exit_hidden_eps)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = LoopKVCache(self.config)
        if cache is not None:
            cache.start_forward(n_loops)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len, S, h.device)
        mask, is_causal = build_attention_mask(attention_mask, position_ids, S, past_len)
        rope = self.rotary_emb(position_ids, h.dtype)

        exits = ExitTracker((B, S), n_loops, exit_steps, exit_threshold, h.device, exit_hidden_eps, exit_temperature)
        last_kv: list = [None] * len(self.layers)  # per layer: each token's K/V at its latest loop
        gate_logits, loop_states = [], []
        for loop in range(n_loops):
            active = exits.active
            for i, layer in enumerate(self.layers):
                h, last_kv[i] = layer(
                    h, rope, mask, is_causal, active, last_kv[i], loop, i, cache=cache
                )
            h = self.norm(h)  # the normed state feeds the next loop and the gate
            gate_logits.append(self.early_exit_gate(h).squeeze(-1))  # (B, S)
            if output_loop_states:
                loop_states.append(h)
            exits.step(loop, h, gate_logits)
            if exits.all_exited and loop + 1 < n_loops:
                if cache is not None:
                    cache.fill_exited(last_kv, loop + 1)
                break
        if cache is not None:
            cache.commit()
        return LoopLMModelOutput(
            last_hidden_state=exits.output,
            cache=cache,
            exit_steps=exits.steps,
            gate_logits=torch.stack(gate_logits, dim=-1),
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
        )

    def _check_depth_args(self, num_loops, exit_steps, exit_threshold, B: int, S: int, hidden_eps=None) -> int:
        n_loops = self.config.total_ut_steps if num_loops is None else int(num_loops)
        ExitRule(n_loops, exit_steps, exit_threshold, hidden_eps).check((B, S))
        return n_loops


class LoopLMForCausalLM(LoopLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # vLLM and Ouro's remote code know the architecture by this name; ours is registered for model_type "ouro".
    checkpoint_architecture = "OuroForCausalLM"

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.model = LoopLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @exact_mode_aware
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopKVCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        exit_steps: torch.LongTensor | None = None,
        exit_threshold: float | torch.Tensor | None = None,
        output_loop_states: bool = False,
        output_loop_logits: bool = False,
        exit_hidden_eps: float | None = None,
        exit_temperature: float = 1.0,
        **kwargs,
    ) -> LoopLMCausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            exit_steps=exit_steps,
            exit_threshold=exit_threshold,
            output_loop_states=output_loop_states or output_loop_logits,
            exit_hidden_eps=exit_hidden_eps,
            exit_temperature=exit_temperature,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])  # (B, S', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        loop_logits = None
        if output_loop_logits:
            loop_logits = torch.stack([self.lm_head(s[:, keep]) for s in out.loop_hidden_states])
        return LoopLMCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            exit_steps=out.exit_steps,
            gate_logits=out.gate_logits,
            loop_hidden_states=out.loop_hidden_states if output_loop_states else None,
            loop_logits=loop_logits,
        )

    def decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache, **depth):
        """One decode step of the rollout engine: `looplm.decode.decode_step`, whose module holds the fast path."""
        from .decode import decode_step  # imported here: looplm.decode builds on this module

        return decode_step(self, tokens, slots, cache, **depth)


    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(GENERATE_CACHE_KEY) is None and generation_config.use_cache is not False:
            model_kwargs[GENERATE_CACHE_KEY] = LoopKVCache(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if GENERATE_CACHE_KEY != "cache" and GENERATE_CACHE_KEY in inputs:  # transformers 5.23
            inputs["cache"] = inputs.pop(GENERATE_CACHE_KEY)
        if is_first_iteration:
            inputs.pop("exit_threshold", None)  # the prompt's prefill always runs at full depth
            inputs.pop("exit_hidden_eps", None)
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.cache is not None:  # transformers 5.23 looks for `outputs.past_key_values` only
            model_kwargs[GENERATE_CACHE_KEY] = outputs.cache
        return model_kwargs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with the architecture named as vLLM and Ouro's code know it.

        `auto_map` (an Ouro folder's pointer to remote code we don't ship) is dropped: `import looplm` loads it.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "config.json"
        saved = json.loads(config_file.read_text())
        saved["architectures"] = [self.checkpoint_architecture]
        saved["rope_theta"] = self.config.rope_parameters["rope_theta"]  # where pre-v5 readers (vLLM) look
        saved.pop("auto_map", None)
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


__all__ = [
    "ExitTracker",
    "LoopLMCausalLMOutput",
    "LoopLMForCausalLM",
    "LoopLMModel",
    "LoopLMModelOutput",
    "LoopLMPreTrainedModel",
    "build_attention_mask",
    "position_ids_from_mask",
]
