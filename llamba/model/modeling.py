"""``LlambaForCausalLM``: Llama blocks with attention replaced by the Discrete Mamba-2 mixer, as a HF model.

Weight names follow the official ``cartesia-ai/Llamba-*`` checkpoints (``backbone.embedding``, ``backbone.layers.{i}
.mixer``, ``backbone.final_layernorm``, ``lm_head`` only when untied), so their safetensors load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from llamba.model.cache import LlambaCache
from llamba.model.config import LlambaConfig
from llamba.model.mixer import DiscreteMamba2, GateLoopMamba2, mixer_class, rope_frequencies

try:  # lets gradient_checkpointing_enable() wrap our blocks
    from transformers.modeling_layers import GradientCheckpointingLayer as _BlockBase
except ImportError:  # pragma: no cover - older transformers
    _BlockBase = nn.Module

try:  # transformers >= 5 skips re-initialising weights that were loaded from a checkpoint through these
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


class RMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in float32, weight applied in the input dtype (bit-compatible with the teacher)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32) if dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_attention_inputs(rotary, h: torch.Tensor, cache: LlambaCache | None = None, seq_idx: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None):
    """What a hybrid's attention layers need for the L new tokens of h (batch, L, d): ((cos, sin), mask, valid, pos).

    mask (batch, 1, L, cached + L), True where a token may attend: causal, never to left padding (``attention_mask``
    0, or padding the cache saw), never across documents (``seq_idx``); None for a plain causal forward (SDPA's own
    causal path). Positions (RoPE) count real tokens only, and restart at each document. A padded token attends to
    itself alone (its output is never used; this keeps its softmax finite). valid (batch, L): the real new tokens."""
    batch, length = h.shape[:2]
    device = h.device
    start = cache.seen_tokens if cache is not None else 0
    valid = (attention_mask[:, -length:].bool() if attention_mask is not None
             else torch.ones(batch, length, dtype=torch.bool, device=device))
    idx = torch.arange(length, device=device)
    same_doc = None
    if seq_idx is not None:
        if start:
            raise NotImplementedError("packed documents (seq_idx) cannot continue a hybrid's cache; prefill them alone")
        same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
        first = torch.ones_like(seq_idx, dtype=torch.bool)
        first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        pos = idx - torch.where(first, idx, 0).cummax(-1).values
    else:
        base = cache.n_valid[:, None] if start else 0
        pos = (base + valid.long().cumsum(-1) - 1).clamp(min=0)
    position_embeddings = rotary(h, pos)
    if start == 0 and same_doc is None and bool(valid.all()):
        return position_embeddings, None, valid, pos
    key_valid = torch.cat([cache.key_valid[:, :start], valid], 1) if start else valid
    keys = torch.arange(start + length, device=device)[None, :]
    queries = (start + idx)[:, None]
    mask = (keys <= queries)[None] & key_valid[:, None, :]
    if same_doc is not None:
        mask = mask & same_doc
    mask = mask | (keys == queries)[None]
    return position_embeddings, mask[:, None], valid, pos


class LlambaAttention(LlamaAttention):
    """A hybrid's softmax-attention layer: transformers' ``LlamaAttention`` (GQA, RoPE, SDPA) with the teacher's
    weights (``q_proj`` ... ``o_proj``), called like ``DiscreteMamba2``. ``attention_inputs`` comes from the model
    (once per forward); without it (a layer run alone, as in distillation stage 2) the layer builds its own."""

    def __init__(self, config: LlambaConfig, layer_idx: int, rotary: nn.Module):
        super().__init__(config.llama_attention_config(), layer_idx)
        self._rotary = (rotary,)  # the model's one rotary embedding, kept out of this module's tree

    def forward(self, u, cache=None, seq_idx=None, attention_mask=None, attention_inputs=None):
        if attention_inputs is None:
            attention_inputs = build_attention_inputs(self._rotary[0], u, cache, seq_idx, attention_mask)
        position_embeddings, mask = attention_inputs[:2]
        out, _ = super().forward(u, position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
        return out


class LlambaBlock(_BlockBase):
    """h = x + mixer(RMSNorm(x));  out = h + MLP(RMSNorm(h)). The mixer is a Discrete Mamba-2, or in a hybrid's
    ``attention_layers`` the teacher's attention."""

    def __init__(self, config: LlambaConfig, layer_idx: int, rotary: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_epsilon)
        if config.is_attention_layer(layer_idx):
            self.mixer = LlambaAttention(config, layer_idx, rotary)
        else:
            self.mixer = mixer_class(config)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mlp = SwiGLU(config.d_model, config.mlp_cfg["intermediate_size"], config.mlp_cfg["bias"])

    def forward(self, x, cache=None, seq_idx=None, attention_mask=None, attention_inputs=None):
        extra = {"attention_inputs": attention_inputs} if isinstance(self.mixer, LlambaAttention) else {}
        h = x + self.mixer(self.input_layernorm(x), cache=cache, seq_idx=seq_idx, attention_mask=attention_mask,
                           **extra)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlambaPreTrainedModel(PreTrainedModel):
    config_class = LlambaConfig
    config: LlambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["LlambaBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DiscreteMamba2):
            init.ones_(module.D)
            if module.z_bias is not None:
                init.zeros_(module.z_bias)
            init.kaiming_uniform_(module.conv1d.weight, a=5 ** 0.5)
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            if isinstance(module, GateLoopMamba2):  # after its phase_proj's nn.Linear init (children come first)
                init.zeros_(module.phase_proj.weight)
                init.copy_(module.phase_proj.bias, rope_frequencies(module.d_state).repeat(module.n_qk_heads))
        elif isinstance(module, LlamaRotaryEmbedding):
            super()._init_weights(module)  # recomputes inv_freq (a non-persistent buffer) after meta-device loading

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own constant-size cache (see prepare_inputs_for_generation)


class LlambaModel(LlambaPreTrainedModel):
    def __init__(self, config: LlambaConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        # A hybrid's one rotary embedding, shared by its attention layers (non-persistent buffers: no weight keys).
        self.rotary_emb = LlamaRotaryEmbedding(config.llama_attention_config()) if config.is_hybrid else None
        self.layers = nn.ModuleList([LlambaBlock(config, i, self.rotary_emb) for i in range(config.n_layer)])
        self.final_layernorm = RMSNorm(config.d_model, config.norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, seq_idx=None, attention_mask=None,
                output_hidden_states=False):
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        attn = None
        if self.rotary_emb is not None:
            if cache is not None:
                cache.check_room(h.shape[1])
            attn = build_attention_inputs(self.rotary_emb, h, cache, seq_idx, attention_mask)
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            h = layer(h, cache=cache, seq_idx=seq_idx, attention_mask=attention_mask, attention_inputs=attn)
        h = self.final_layernorm(h)
        if output_hidden_states:
            hidden_states.append(h)
        if cache is not None and attn is not None:  # which new positions are real tokens, and the next positions
            valid = attn[2]
            cache.key_valid[:, cache.seen_tokens:cache.seen_tokens + valid.shape[1]].copy_(valid)
            cache.n_valid.add_(valid.sum(-1))
        if cache is not None:
            cache.seen_tokens += (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        return h, tuple(hidden_states) if output_hidden_states else None


class LlambaForCausalLM(LlambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embedding.weight"}

    def __init__(self, config: LlambaConfig):
        super().__init__(config)
        self.backbone = LlambaModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.embedding

    def set_input_embeddings(self, value):
        self.backbone.embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def allocate_cache(self, batch_size: int, max_length: int | None = None) -> LlambaCache:
        """``max_length``: positions a hybrid's KV cache holds (prompt + generated); ignored by a pure student."""
        p = self.backbone.embedding.weight
        return LlambaCache(self.config, batch_size, dtype=p.dtype, device=p.device, max_length=max_length)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: LlambaCache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **unused,  # position_ids, cache_position ... that generate() passes to every model
    ) -> CausalLMOutputWithPast:
        """Logits over the real vocabulary (padding rows of the embedding are cut off). ``logits_to_keep=k``
        computes logits for the last k positions only (prefill for generation needs just one)."""
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache((input_ids if input_ids is not None else inputs_embeds).shape[0])
        h, hidden_states = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, cache=past_key_values, seq_idx=seq_idx,
            attention_mask=attention_mask, output_hidden_states=bool(output_hidden_states))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values, hidden_states=hidden_states)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """On CUDA, greedy and sampled decoding run through ``llamba.generation`` (static cache, CUDA-graph decode
        loop, on-device sampling); anything it does not support (beam search, streamers, custom processors, CPU)
        goes to transformers' generate()."""
        from llamba.generation import try_fast_generate

        out = try_fast_generate(self, inputs, generation_config, kwargs)
        if out is not None:
            return out
        ids = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not self.config.is_hybrid or ids is None:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        # A hybrid's KV cache, allocated by prepare_inputs_for_generation, holds as much as this call needs.
        gc = generation_config if generation_config is not None else self.generation_config
        new = kwargs.get("max_new_tokens", gc.max_new_tokens)
        self._generate_cache_length = ids.shape[1] + new if new is not None else kwargs.get("max_length", gc.max_length)
        try:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        finally:
            self._generate_cache_length = None

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """First call: the whole (left-padded) prompt. Later calls: only the tokens the cache has not seen."""
        if past_key_values is not None and past_key_values.seen_tokens > 0:
            return {"input_ids": input_ids[:, past_key_values.seen_tokens:], "past_key_values": past_key_values,
                    "use_cache": use_cache, "logits_to_keep": 1}
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
        batch = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        if use_cache and past_key_values is None:
            sized = {"max_length": getattr(self, "_generate_cache_length", None)} if self.config.is_hybrid else {}
            past_key_values = self.allocate_cache(batch, **sized)
        return {**inputs, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache, "logits_to_keep": 1}
