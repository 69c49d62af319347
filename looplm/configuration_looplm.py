"""LoopLMConfig: the Ouro checkpoint config (`model_type: "ouro"`), Qwen2-style sizes plus the loop fields.

A real Ouro `config.json` (Ouro-1.4B / 2.6B, and their Thinking variants) loads into this class unchanged:
its extra Qwen2 fields (`layer_types`, `sliding_window`, `max_window_layers`, ...) are kept as attributes
and ignored by the model, which has no sliding window.
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


class LoopLMConfig(PreTrainedConfig):
    r"""
    Defaults are a tiny CPU model; `LoopLMConfig.from_pretrained(ouro_dir)` gives the real sizes
    (hidden 2048, FFN 5632, 16 heads of 128, vocab 49,152, rope theta 1e6, 24 or 48 layers, T = 4).

    Loop fields:
        total_ut_steps: T, how many times the whole layer stack is applied ("loops").
        early_exit_threshold: default Q-exit threshold q in [0, 1]; 1.0 always runs all T loops.
        exact_mode: batch-invariant kernels (`looplm.batch_invariant`): a position's logits do not depend on
            what else is computed with it, so the rollout engine's decode step and the training forward agree
            bit for bit. Slower; off by default. Not a checkpoint property: set it where the model is used.
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 1_000_000.0  # Ouro's final checkpoints; transformers moves `rope_theta` into `rope_parameters`

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    total_ut_steps: int = 4
    early_exit_threshold: float = 1.0
    exact_mode: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # transformers only warns when a folder's model_type is another architecture's; loading its weights
        # into a LoopLM would then fail later, or worse, not at all.
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        found = config_dict.get("model_type")
        if found != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has model_type {found!r}; "
                f"a LoopLM checkpoint needs model_type {cls.model_type!r}"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _check(self) -> None:
        if self.total_ut_steps < 1:
            raise ValueError(f"total_ut_steps must be >= 1, got {self.total_ut_steps}")
        if not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ValueError(f"early_exit_threshold must be in [0, 1], got {self.early_exit_threshold}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' (SwiGLU, as in Ouro) is supported, got {self.hidden_act!r}")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters: only rope_type 'default' is supported, got {rope_type!r}")


__all__ = ["LoopLMConfig"]
