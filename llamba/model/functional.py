"""The block's dense pieces as functions of tensors: the one definition of Llamba's RMSNorm, SwiGLU MLP, residual
tail and logits head. ``RMSNorm`` and ``SwiGLU`` (llamba.model.modeling) call them, the blocks' ``forward`` and
``step`` call them through a ``Pieces`` set, and the static-KV Llama baseline (llamba.bench.llama_static) reuses
them around its attention.

Because each piece takes only tensors (weights passed in, not modules), one ``torch.compile``d copy of it serves
every layer and batch size (``compiled_pieces``): the norms, residual adds and SwiGLU's elementwise work become a
few fused kernels per layer instead of a dozen eager ones, and the GEMMs stay cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in float32 (float64 for a float64 input), the weight applied in the input dtype
    (bit-compatible with the teacher's)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(u, gate_w, gate_b, up_w, up_b, down_w, down_b) -> torch.Tensor:
    return F.linear(F.silu(F.linear(u, gate_w, gate_b)) * F.linear(u, up_w, up_b), down_w, down_b)


def block_tail(h, mixer_out, norm_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b) -> torch.Tensor:
    """The block after its mixer: h + mixer_out, then the MLP's residual, ``(h + MLP(RMSNorm(h)))``."""
    h = h + mixer_out
    return h + swiglu(rms_norm(h, norm_w, eps), gate_w, gate_b, up_w, up_b, down_w, down_b)


def logits_head(h, norm_w, eps, lm_w, lm_b, vocab: int) -> torch.Tensor:
    """Last-position logits (batch, vocab) of h (batch, L, d): final norm and head on that position only, the
    embedding's padding rows cut off."""
    return F.linear(rms_norm(h[:, -1], norm_w, eps), lm_w, lm_b)[:, :vocab]


def cache_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Softmax attention of q (b, n_q, L, hd) over a static KV cache's keys / values (b, n_kv, K, hd) under a boolean
    mask (b, 1, L, K) (True: visible; every row sees at least one key); returns (b, n_q, L, hd). Query head h reads
    key/value head h // (n_q / n_kv), as transformers' ``repeat_kv``, but a group's query heads are folded into the
    query rows, so no key/value head is copied per query head: the two products are batched GEMMs, the softmax in
    at least float32. Attention over a static cache uses this rather than masked SDPA, which on Hopper may hand a
    bf16 masked GQA call to the cuDNN backend (silently wrong in some such cases upstream; a served bf16 teacher
    gave no text on an H200 with it, docs/serving.md) and which ran far off its bytes floor over a whole cache
    (llamba.bench.llama_static)."""
    b, n_q, L, hd = q.shape
    n_kv, K = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    scores = torch.matmul(q.reshape(b, n_kv, groups * L, hd), keys.transpose(-1, -2))
    scores = scores.to(torch.promote_types(q.dtype, torch.float32)).view(b, n_kv, groups, L, K) * scale
    probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs.view(b, n_kv, groups * L, K), values).view(b, n_q, L, hd)


def tail_weights(norm, mlp, eps: float | None = None) -> tuple:
    """``block_tail``'s arguments after (h, mixer_out) for one block: its post-mixer norm (``eps`` when the norm
    names it otherwise, as transformers' ``variance_epsilon``) and its SwiGLU's weights."""
    return (norm.weight, norm.eps if eps is None else eps, mlp.gate_proj.weight, mlp.gate_proj.bias,
            mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)


class Pieces(NamedTuple):
    """The functions a block's ``forward`` / ``step`` runs around its mixer: these eager ones, or their compiled
    twins (``compiled_pieces``). ``None`` in their place means the modules themselves (hooks, quantized
    stand-ins, training)."""

    rms_norm: object
    block_tail: object
    logits_head: object


EAGER = Pieces(rms_norm, block_tail, logits_head)
_COMPILED: Pieces | None = None


def compiled_pieces() -> Pieces:
    """``EAGER``'s functions compiled once per process, dynamic in the batch size and length (the mixers' Triton
    kernels and the GEMMs stay outside)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = Pieces(*(torch.compile(f, dynamic=True) for f in EAGER))
    return _COMPILED


def pieces_for(compile: bool) -> Pieces:
    return compiled_pieces() if compile else EAGER


IN_PROJ_ROUTES = ("one", "split", "kernel")


class StepOptions(NamedTuple):
    """How ``LlambaForCausalLM.step`` runs a decode step; the generation engine picks them per batch size and device.

    pieces: ``EAGER``, ``compiled_pieces()``, or None for the modules. in_proj: how a mixer runs in_proj for one
    token (``DiscreteMamba2.step``): "one" GEMM; "split", an aligned GEMM plus a tiny one for the A_log rows; or
    "kernel", the aligned GEMM with A_log computed inside the fused decode kernel from the normed input."""

    pieces: Pieces | None = None
    in_proj: str = "one"
