"""``CpuDecoder``: prompt prefill through the model's chunked scan, then one compiled call per generated token.

Everything a token touches is allocated once here: the recurrent cache (float32 conv and SSM state, and a
GateLoop student's phase: constant size), the kernel's workspace and the logits buffer. Resident memory therefore
does not depend on the context length; the prompt is prefilled in fixed-size pieces so that peak memory does not
either.

The C code runs Discrete Mamba-2 blocks only. Any other block (``runs_in_pytorch``) runs in PyTorch, through its
own ``LlambaBlock.step`` (the one the CUDA engine captures, tested against the model's forward), between C calls
over the runs of Discrete Mamba-2 blocks, on the same residual stream and the same ``LlambaCache``; float32 or
quantized linears alike (``QuantizedLinear`` is an ordinary module that calls the same C GEMV). Two kinds:

- a hybrid's attention layers, whose static KV cache is preallocated for ``max_length`` positions (the one memory
  that grows with the context, and only up to that bound). Attention is a few layers of a hybrid (K of 30), a step
  of it is a handful of PyTorch calls on one row, and a second attention implementation would be one more thing
  to keep equal to transformers' (RoPE scaling variants, GQA layout) for little gain.
- a GateLoop student's mixers (``ssm_cfg.mixer == 'gateloop'``), whose state lives in the frame of B and C rotated
  by a cumulative phase (``LlambaCache.phase_states``; docs/gateloop.md). A C step would need ``phase_proj``, the
  phase's running sum and wrap, and the rotation, all kept equal to ``llamba.ops.gateloop``; until decode speed on
  a CPU asks for that, the model's own step is the one definition. The embedding and head still run in C.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from llamba.generation.sampling import GREEDY, SamplingParams, seen_tokens_mask, select_tokens, stop_index
from llamba.model import LlambaCache
from llamba.model.config import DEFAULT_MIXER
from llamba.model.functional import StepOptions
from llamba.quant import kernels
from llamba.quant.modules import QuantizedEmbedding, QuantizedLinear

PREFILL_CHUNK = 512  # tokens per prefill piece: big enough for fast GEMMs, small enough to keep memory flat


def _c_linear(module: nn.Module, keep: list) -> kernels.Linear:
    if isinstance(module, QuantizedLinear):
        return module.c_linear()
    weight = module.weight.detach()
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError("the CPU runtime runs float32 or quantized students; load the model with dtype=torch.float32")
    bias = None if module.bias is None else module.bias.detach()
    keep.append(weight)
    return kernels.Linear(weight.data_ptr(), None, None, kernels.ptr(bias), 32, weight.shape[0], weight.shape[1], 0)


def _c_table(embedding: nn.Module, keep: list) -> kernels.Linear:
    if isinstance(embedding, QuantizedEmbedding):
        return embedding.table.c_linear()
    weight = embedding.weight.detach()
    keep.append(weight)
    return kernels.Linear(weight.data_ptr(), None, None, None, 32, weight.shape[0], weight.shape[1], 0)


def _f(t: torch.Tensor | None, keep: list) -> int | None:
    if t is None:
        return None
    t = t.detach()
    if t.dtype != torch.float32:
        raise ValueError(f"the CPU runtime needs float32 parameters, got {t.dtype}")
    t = t.contiguous()
    keep.append(t)
    return t.data_ptr()


class CpuDecoder:
    """Greedy or sampled generation with a (quantized or float32) Llamba student on the CPU, batch 1."""

    def __init__(self, model, threads: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 max_length: int | None = None):
        """``max_length``: the positions a hybrid's KV cache holds (prompt + new tokens; default the model's
        cache default, and ``generate`` grows it when a call needs more); ignored for a pure student."""
        self.lib = kernels.load_kernels()
        if self.lib is None:
            raise RuntimeError(f"the CPU decode kernel could not be built ({kernels.kernel_error()}); "
                               "install a C compiler (gcc or clang) or set CC")
        self.model = model.eval()
        self.config = cfg = model.config
        self.prefill_chunk = prefill_chunk
        if threads:
            torch.set_num_threads(threads)
            self.lib.llamba_set_threads(threads)
        keep: list = []  # tensors whose memory the C structs point into
        layers = (kernels.Layer * cfg.n_layer)()
        for i, block in enumerate(model.backbone.layers):
            if runs_in_pytorch(cfg, i):
                continue  # zeros: the C code never runs this layer (see _segments)
            mixer, mlp = block.mixer, block.mlp
            conv = mixer.conv1d
            layers[i] = kernels.Layer(
                _f(block.input_layernorm.weight, keep), _c_linear(mixer.in_proj, keep),
                _f(conv.weight.reshape(conv.weight.shape[0], -1), keep), _f(conv.bias, keep), _f(mixer.D, keep),
                _f(mixer.z_bias, keep), _c_linear(mixer.out_proj, keep), _f(block.post_attention_layernorm.weight, keep),
                _c_linear(mlp.gate_proj, keep), _c_linear(mlp.up_proj, keep), _c_linear(mlp.down_proj, keep))
        self.c_model = kernels.Model(
            cfg.n_layer, cfg.d_model, cfg.d_inner, cfg.n_v_heads, cfg.n_qk_heads, cfg.head_dim, cfg.d_state,
            cfg.ssm_cfg["d_conv"], cfg.mlp_cfg["intermediate_size"], cfg.norm_epsilon, layers,
            _c_table(model.backbone.embedding, keep), _f(model.backbone.final_layernorm.weight, keep),
            _c_linear(model.lm_head, keep))
        self._keep, self._layers = keep, layers
        self.workspace = torch.zeros(self.lib.llamba_workspace_floats(ctypes.byref(self.c_model)))
        self.logits_buf = torch.zeros(self.c_model.head.n)
        self.logits = self.logits_buf[: cfg.vocab_size]
        self.h = torch.zeros(cfg.d_model)  # the residual stream between the C and the PyTorch layers
        self._segments = _segments(cfg)
        self._batch_work = self._batch_logits = None  # step_batch's buffers, grown to the largest batch it sees
        self._allocate(max_length)

    def _allocate(self, max_length: int | None) -> None:
        self.cache = LlambaCache(self.config, 1, dtype=torch.float32, max_length=max_length)
        self._args = (ctypes.byref(self.c_model), kernels.fptr(self.cache.conv_states), kernels.fptr(self.cache.ssm_states),
                      kernels.fptr(self.workspace), kernels.fptr(self.logits_buf))

    @property
    def max_length(self) -> int | None:
        """How many positions a hybrid's KV cache holds (None for a pure student: any number)."""
        return self.cache.max_length

    def reset(self) -> None:
        self.cache.reset()

    def new_cache(self, max_length: int | None = None) -> LlambaCache:
        """Another batch-1 float32 cache that ``prefill`` and ``step`` can run on (``llamba serve`` keeps one per
        slot; the model weights, workspace and logits buffer are shared). ``max_length``: the positions a hybrid's
        KV cache holds (default this decoder's)."""
        return LlambaCache(self.config, 1, dtype=torch.float32, max_length=max_length or self.max_length)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache: LlambaCache | None = None) -> torch.Tensor:
        """Feed a prompt (1, L) or (L,) through the chunked scan, in pieces, continuing ``cache`` (default: this
        decoder's own); returns the last position's logits."""
        cache = self.cache if cache is None else cache
        ids = input_ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("empty prompt: give at least one token")
        cache.check_room(ids.shape[1], "build the CpuDecoder with a larger max_length (generate() grows it itself)")
        for start in range(0, ids.shape[1], self.prefill_chunk):
            piece = ids[:, start:start + self.prefill_chunk]
            out = self.model(piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.logits.copy_(out.logits[0, -1])
        return self.logits

    def step(self, token: int, cache: LlambaCache | None = None) -> torch.Tensor:
        """Feed one token to ``cache`` (default: this decoder's own, which must be float32 and contiguous, as
        ``new_cache`` makes them); returns the next-token logits (a view of a buffer that the next step overwrites)."""
        lib, (model, conv, ssm, work, logits) = self.lib, self._args
        cache = self.cache if cache is None else cache
        if cache is not self.cache:
            conv, ssm = kernels.fptr(cache.conv_states), kernels.fptr(cache.ssm_states)
        if self._segments is not None:
            return self._segmented_step(int(token), cache, conv, ssm)
        if lib.llamba_decode_step(model, int(token), conv, ssm, work, logits) != 0:
            raise ValueError(f"token id {token} outside the vocabulary ({self.c_model.embedding.n})")
        cache.seen_tokens += 1
        return self.logits

    def step_batch(self, tokens: list[int], caches: list[LlambaCache]) -> torch.Tensor:
        """Feed tokens[b] to caches[b] (each from ``new_cache``), all in one call: each weight is read about once
        for the whole batch, where ``step`` per cache reads them all again (``llamba serve``'s slots). Returns the
        (batch, vocab) next-token logits, a view of a buffer that the next call overwrites. A student with blocks
        outside C (``runs_in_pytorch``) steps the caches one after another."""
        if self._segments is not None:
            return torch.stack([self.step(token, cache).clone() for token, cache in zip(tokens, caches)])
        n = len(tokens)
        if self._batch_work is None or self._batch_work.shape[0] < n:
            self._batch_work = torch.zeros(n, self.workspace.numel())
            self._batch_logits = torch.zeros(n, self.c_model.head.n)
        pointers = (kernels.c_float_p * n)
        conv = pointers(*(kernels.fptr(cache.conv_states) for cache in caches))
        ssm = pointers(*(kernels.fptr(cache.ssm_states) for cache in caches))
        ids = (ctypes.c_int64 * n)(*(int(t) for t in tokens))
        if self.lib.llamba_decode_batch(ctypes.byref(self.c_model), n, ids, conv, ssm, kernels.fptr(self._batch_work),
                                        kernels.fptr(self._batch_logits)) != 0:
            raise ValueError(f"a token id among {list(tokens)} is outside the vocabulary ({self.c_model.embedding.n})")
        for cache in caches:
            cache.seen_tokens += 1
        return self._batch_logits[:n, : self.config.vocab_size]

    @torch.inference_mode()
    def _segmented_step(self, token: int, cache: LlambaCache, conv, ssm) -> torch.Tensor:
        """The C mixer blocks in runs, and each other block as its ``LlambaBlock.step`` (modules: float32 or
        quantized linears alike) on the same residual stream ``h``; the cache's bookkeeping as the model's step."""
        lib, (model, _, _, work, logits) = self.lib, self._args
        if cache.has_attention and cache.seen_tokens >= cache.max_length:
            raise ValueError(f"the hybrid's KV cache is full ({cache.max_length} positions): generate fewer tokens, "
                             "or build the CpuDecoder with a larger max_length")
        h = self.h
        if lib.llamba_embed(model, token, kernels.fptr(h)) != 0:
            raise ValueError(f"token id {token} outside the vocabulary ({self.c_model.embedding.n})")
        hv = h.view(1, 1, -1)
        backbone = self.model.backbone
        attention = backbone.step_attention_inputs(hv, cache) if cache.has_attention else None
        for first, last, in_pytorch in self._segments:
            if in_pytorch:
                h.copy_(backbone.layers[first].step(hv, cache, StepOptions(None), attention).reshape(-1))
            else:
                lib.llamba_mixer_blocks(model, first, last, kernels.fptr(h), conv, ssm, work)
        cache.stepped()
        lib.llamba_head(model, kernels.fptr(h), work, logits)
        return self.logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, params: SamplingParams = GREEDY,
                 eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
                 callback=None, stop_strings: list[str] | None = None, tokenizer=None) -> list[int]:
        """Prefill, then decode up to ``max_new_tokens``, each token chosen by the sampler every generation path
        shares (``llamba.generation.sampling``: repetition penalty over prompt and output, temperature, top-k,
        top-p, min-p). Stops after an ``eos_token_id`` or the token that completes one of ``stop_strings`` in the
        new tokens' text (which needs ``tokenizer``); that token is kept, as the CUDA engine keeps it.
        ``callback(token)`` streams."""
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer (pass tokenizer=...)")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        needed = input_ids.numel() + max_new_tokens
        if self.max_length is not None and needed > self.max_length:
            self._allocate(needed)  # a hybrid's KV cache, grown to what this call needs
        self.reset()
        logits = self.prefill(input_ids)
        seen = (seen_tokens_mask(input_ids.reshape(1, -1), None, self.config.vocab_size)
                if params.repetition_penalty != 1.0 else None)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = self.next_token(logits, params, seen, generator)
            out.append(token)
            if callback is not None:
                callback(token)
            if token in eos or (stop_strings and stop_index(tokenizer, out, stop_strings, len(out) - 1) is not None):
                break
            if seen is not None:
                seen[0, token] = True
            logits = self.step(token)
        return out

    def next_token(self, logits: torch.Tensor, params: SamplingParams = GREEDY, seen: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> int:
        """The token after ``logits`` (vocab,), by the shared sampler; ``seen`` (1, vocab) for the penalty."""
        return int(select_tokens(logits[None], seen, params, generator)[0])


def runs_in_pytorch(config, layer: int) -> bool:
    """Whether the CPU runtime runs this block through its ``LlambaBlock.step`` rather than the C code, which has
    the Discrete Mamba-2 mixer only: a hybrid's attention layer, or a GateLoop mixer (module docstring: why)."""
    return config.is_attention_layer(layer) or config.mixer != DEFAULT_MIXER


def _segments(config) -> list[tuple[int, int, bool]] | None:
    """The layers as runs (first, last + 1, in_pytorch): each run of C blocks is one C call, each PyTorch block one
    ``LlambaBlock.step``. None when the C code runs every block (one C call does the whole step)."""
    if not any(runs_in_pytorch(config, i) for i in range(config.n_layer)):
        return None
    runs: list[tuple[int, int, bool]] = []
    for i in range(config.n_layer):
        in_pytorch = runs_in_pytorch(config, i)
        if runs and not in_pytorch and not runs[-1][2]:
            runs[-1] = (runs[-1][0], i + 1, False)
        else:
            runs.append((i, i + 1, in_pytorch))
    return runs
