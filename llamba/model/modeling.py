"""``LlambaForCausalLM``: Llama blocks with attention replaced by the Discrete Mamba-2 mixer, as a HF model.

Weight names follow the official ``cartesia-ai/Llamba-*`` checkpoints (``backbone.embedding``, ``backbone.layers.{i}
.mixer``, ``backbone.final_layernorm``, ``lm_head`` only when untied), so their safetensors load unchanged.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from llamba.model import functional as fn
from llamba.model.cache import LlambaCache
from llamba.model.config import LlambaConfig
from llamba.model.functional import StepOptions
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
        return fn.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.down_proj, nn.Linear) and isinstance(self.gate_proj, nn.Linear):
            return fn.swiglu(x, self.gate_proj.weight, self.gate_proj.bias, self.up_proj.weight, self.up_proj.bias,
                             self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # quantized stand-ins: their own forward


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


def _cache_argument() -> str:
    """What ``LlamaAttention.forward`` calls its KV cache: ``past_key_values`` in transformers 5.17, ``cache`` later.
    A wrong name would vanish into its ``**kwargs`` and the layer would run without its cache (the keys of one step
    only), so the name is read from the signature and anything else is refused."""
    params = inspect.signature(LlamaAttention.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ImportError(f"this transformers' LlamaAttention.forward takes no cache argument ({list(params)}); "
                      "hybrid students need transformers 5.17 or later")


CACHE_ARGUMENT = _cache_argument()


class StepAttention(NamedTuple):
    """What a hybrid's attention layers need for one decode step (``LlambaModel.step_attention_inputs``): RoPE's
    (cos, sin) at each row's position, the mask over the static KV cache (batch, 1, 1, max_length), and each
    row's slot (batch,) its new key and value go to, all device tensors."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    write: torch.Tensor


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
        out, _ = super().forward(u, position_embeddings=position_embeddings, attention_mask=mask,
                                 **{CACHE_ARGUMENT: cache})
        return out

    def step(self, u: torch.Tensor, cache: LlambaCache, inputs: StepAttention) -> torch.Tensor:
        """One token per row: u (batch, 1, d_model), the normed input, to the layer's output (batch, 1, d_model);
        what ``forward(u, cache)`` computes for one token, with fixed shapes and device-side positions, so that a
        CUDA graph replays it. The new key and value are written at ``inputs.write`` of this layer's slot of the
        static KV cache, and the query attends over the whole preallocated cache with ``inputs.mask`` (causal, no
        left padding), through ``functional.cache_attention``."""
        batch = u.shape[0]
        hd = self.head_dim
        q = self.q_proj(u).view(batch, 1, -1, hd).transpose(1, 2)
        k = self.k_proj(u).view(batch, 1, -1, hd).transpose(1, 2)
        v = self.v_proj(u).view(batch, 1, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, inputs.cos, inputs.sin)
        slot = cache.attention_slot[self.layer_idx]
        keys, values = cache.key_cache[slot], cache.value_cache[slot]  # (batch, kv heads, max_length, hd)
        at = inputs.write.view(batch, 1, 1, 1).expand(batch, k.shape[1], 1, hd)  # each row at its own position
        keys.scatter_(2, at, k)
        values.scatter_(2, at, v)
        out = fn.cache_attention(q, keys, values, inputs.mask, self.scaling)  # (batch, heads, 1, hd)
        return self.o_proj(out.reshape(batch, 1, -1))


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

    def forward(self, x, cache=None, seq_idx=None, attention_mask=None, attention_inputs=None, pieces=None):
        """``pieces`` (``llamba.model.functional``): the norms and the MLP as those functions (eager or compiled)
        instead of the modules; the same arithmetic."""
        extra = {"attention_inputs": attention_inputs} if isinstance(self.mixer, LlambaAttention) else {}
        out = self.mixer(self._norm(x, pieces), cache=cache, seq_idx=seq_idx, attention_mask=attention_mask, **extra)
        return self._tail(x, out, pieces)

    def step(self, h, cache: LlambaCache, options: StepOptions = StepOptions(), attention: StepAttention | None = None):
        """One token per row (batch, 1, d_model) through the block, its mixer's ``step`` owning its part of the
        cache; ``attention``: the step's inputs for an attention layer (``LlambaModel.step_attention_inputs``)."""
        u = self._norm(h, options.pieces)
        if isinstance(self.mixer, LlambaAttention):
            out = self.mixer.step(u, cache, attention)
        else:
            out = self.mixer.step(u, cache, options.in_proj)
        return self._tail(h, out, options.pieces)

    def _norm(self, x, pieces):
        norm = self.input_layernorm
        return norm(x) if pieces is None else pieces.rms_norm(x, norm.weight, norm.eps)

    def _tail(self, x, mixer_out, pieces):
        if pieces is None:
            h = x + mixer_out
            return h + self.mlp(self.post_attention_layernorm(h))
        return pieces.block_tail(x, mixer_out, *fn.tail_weights(self.post_attention_layernorm, self.mlp))


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
                output_hidden_states=False, pieces=None):
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states = [] if output_hidden_states else None
        h = self.run_layers(h, cache, seq_idx, attention_mask, pieces, hidden_states)
        norm = self.final_layernorm
        h = norm(h) if pieces is None else pieces.rms_norm(h, norm.weight, norm.eps)
        if output_hidden_states:
            hidden_states.append(h)
        return h, tuple(hidden_states) if output_hidden_states else None

    def run_layers(self, h, cache=None, seq_idx=None, attention_mask=None, pieces=None, hidden_states=None):
        """The layers over the embedded tokens h (batch, L, d_model), before the final norm; the cache's count and
        the hybrid's key bookkeeping advanced by L. ``hidden_states``: a list that receives each layer's input."""
        attn = None
        if self.rotary_emb is not None:
            if cache is not None:
                cache.check_room(h.shape[1])
            attn = build_attention_inputs(self.rotary_emb, h, cache, seq_idx, attention_mask)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            h = layer(h, cache=cache, seq_idx=seq_idx, attention_mask=attention_mask, attention_inputs=attn,
                      pieces=pieces)
        if cache is not None and attn is not None:  # which new positions are real tokens, and the next positions
            valid = attn[2]
            cache.key_valid[:, cache.seen_tokens:cache.seen_tokens + valid.shape[1]].copy_(valid)
            cache.n_valid.add_(valid.sum(-1))
        if cache is not None:
            cache.seen_tokens += h.shape[1]
            cache.sync_position()
        return h

    def step_attention_inputs(self, h: torch.Tensor, cache: LlambaCache) -> StepAttention:
        """A decode step's attention inputs for a hybrid, from device state only (``cache.position``, ``n_valid``,
        ``key_valid``): the new token is real and goes to each row's slot ``position[row]``; its RoPE position is the
        row's count of real tokens, so left padding takes none. The slot is clamped into the cache: a step past its end (which
        ``check_room`` and the engine refuse on the host) must not write out of bounds on the device."""
        write = cache.position.clamp(max=cache.max_length - 1)  # (batch,): each row's own slot
        cache.key_valid.scatter_(1, write[:, None], True)
        keys = torch.arange(cache.max_length, device=h.device)
        mask = (cache.key_valid & (keys[None] <= write[:, None]))[:, None, None, :]
        cos, sin = self.rotary_emb(h, cache.n_valid[:, None])
        return StepAttention(cos, sin, mask, write)


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

    def prefill(self, input_ids: torch.Tensor, cache: LlambaCache, attention_mask: torch.Tensor | None = None,
                pieces: fn.Pieces | None = fn.EAGER) -> torch.Tensor:
        """Prompts (batch, L), left-padded where ``attention_mask`` is 0, into ``cache``: the forward with
        ``pieces`` around each mixer (compiled ones fuse the norms, residuals and SwiGLU) and the final norm and
        head on the last position only. Returns its logits (batch, vocab)."""
        backbone = self.backbone
        h = backbone.run_layers(backbone.embedding(input_ids), cache, attention_mask=attention_mask, pieces=pieces)
        return self._head(h, pieces)

    def step(self, tokens: torch.Tensor, cache: LlambaCache, options: StepOptions = StepOptions()) -> torch.Tensor:
        """One decode step: tokens (batch,) after what ``cache`` has seen, to the next logits (batch, vocab); the
        model's forward for one token, with fixed shapes and every position on the device, so that the
        generation engine captures this very call in its CUDA graph (replaying it does not run the host-side
        parts: the room check and ``seen_tokens``, which the engine keeps itself). ``options``: the pieces and
        the mixers' in_proj route (``llamba.model.functional.StepOptions``)."""
        backbone = self.backbone
        cache.check_room(1)
        h = backbone.embedding(tokens[:, None])
        attn = backbone.step_attention_inputs(h, cache) if cache.has_attention else None
        for layer in backbone.layers:
            h = layer.step(h, cache, options, attn)
        cache.stepped()
        return self._head(h, options.pieces)

    def _head(self, h, pieces):
        """Last-position logits (batch, vocab) of the last layer's output h (batch, L, d_model)."""
        norm = self.backbone.final_layernorm
        if pieces is None:
            return self.lm_head(norm(h[:, -1]))[:, : self.config.vocab_size]
        return pieces.logits_head(h, norm.weight, norm.eps, self.lm_head.weight, self.lm_head.bias,
                                  self.config.vocab_size)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """On CUDA, greedy and sampled decoding run through ``llamba.generation`` (static cache, CUDA-graph decode
        loop, on-device sampling); anything it does not support (beam search, streamers, custom processors, CPU)
        goes to transformers' generate()."""
        from llamba import fast_generate  # the package root composes the layers: see its docstring

        out = fast_generate(self, inputs, generation_config, kwargs)
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
