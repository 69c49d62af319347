"""LoopLM: Ouro-style looped language models as transformers models.

`import looplm` registers the classes for `model_type: "ouro"`, so `AutoConfig` and
`AutoModelForCausalLM.from_pretrained(dir)` load a LoopRL save or an Ouro checkpoint folder without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import KV_MODES, LoopKVCache
from .configuration_looplm import LoopLMConfig
from .exit_gate import exit_cdf, exit_entropy, exit_lambdas, exit_log_pdf, exit_pdf, log_survival, q_exit_step
from .modeling_looplm import LoopLMCausalLMOutput, LoopLMForCausalLM, LoopLMModel, LoopLMModelOutput

AutoConfig.register(LoopLMConfig.model_type, LoopLMConfig, exist_ok=True)
AutoModel.register(LoopLMConfig, LoopLMModel, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)

__all__ = [
    "KV_MODES",
    "LoopKVCache",
    "LoopLMCausalLMOutput",
    "LoopLMConfig",
    "LoopLMForCausalLM",
    "LoopLMModel",
    "LoopLMModelOutput",
    "exit_cdf",
    "exit_entropy",
    "exit_lambdas",
    "exit_log_pdf",
    "exit_pdf",
    "log_survival",
    "q_exit_step",
]
