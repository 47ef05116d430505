"""Fast batched generation for Llamba models: static cache, CUDA-graph decode loop, on-device sampling."""

from __future__ import annotations

import copy

import torch

from llamba.generation.engine import Decoder, GenerationOutput, generate
from llamba.generation.sampling import SamplingParams, process_logits, select_tokens
from llamba.model.config import DEFAULT_MIXER, mixer_name

# What model.generate() may pass for the fast path to take over; anything else goes to transformers.
_FAST_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "stop_strings", "tokenizer",
                "use_cache", "max_length"}


def try_fast_generate(model, inputs, generation_config, kwargs: dict):
    """``LlambaForCausalLM.generate`` on CUDA: the CUDA-graph engine when every argument is one it supports
    (greedy or sampling, single sequence per prompt), else None so that transformers' generate() runs."""
    device = model.device  # not the embedding's weight: a quantized student's embedding has none
    if device.type != "cuda" or set(kwargs) - _FAST_KWARGS:
        return None
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        return None
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for name in _FAST_KWARGS - {"input_ids", "attention_mask", "tokenizer", "use_cache"}:
        if name in kwargs:
            setattr(config, name, kwargs[name])
    if (getattr(config, "num_beams", 1) or 1) != 1 or (getattr(config, "num_return_sequences", 1) or 1) != 1:
        return None
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = (config.max_length or 20) - input_ids.shape[1]
    out = generate(
        model, input_ids, kwargs.get("attention_mask"), max_new_tokens=max(1, max_new),
        do_sample=bool(config.do_sample), temperature=config.temperature if config.temperature is not None else 1.0,
        top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0,
        min_p=config.min_p or 0.0, repetition_penalty=config.repetition_penalty or 1.0,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        stop_strings=config.stop_strings, tokenizer=kwargs.get("tokenizer"))
    return out.sequences


__all__ = ["Decoder", "GenerationOutput", "SamplingParams", "generate", "process_logits", "select_tokens",
           "try_fast_generate"]
