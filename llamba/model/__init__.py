"""The Llamba model: config, mixer, cache and the HF ``LlambaForCausalLM`` (registered with the Auto classes)."""

from transformers import AutoConfig, AutoModelForCausalLM

from llamba.model.cache import LlambaCache
from llamba.model.config import LlambaConfig
from llamba.model.mixer import Z_BIAS_IDENTITY, DiscreteMamba2, GateLoopMamba2
from llamba.model.modeling import LlambaAttention, LlambaBlock, LlambaForCausalLM, LlambaModel, RMSNorm

AutoConfig.register("llamba", LlambaConfig, exist_ok=True)
AutoModelForCausalLM.register(LlambaConfig, LlambaForCausalLM, exist_ok=True)

__all__ = [
    "DiscreteMamba2", "GateLoopMamba2", "LlambaAttention", "LlambaBlock", "LlambaCache", "LlambaConfig", "LlambaForCausalLM", "LlambaModel", "RMSNorm",
    "Z_BIAS_IDENTITY",
]
