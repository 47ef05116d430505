"""Drop-in quantized replacements for a student's ``nn.Linear`` and ``nn.Embedding`` modules.

A few rows (decoding) go through the compiled kernel; many rows (prefill, perplexity) dequantize the weight once
per call and use PyTorch's float32 GEMM, which is faster than any per-row kernel for large batches.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from llamba.quant import kernels
from llamba.quant.reference import QuantizedWeight, dequantize, quantize_weight

KERNEL_MAX_ROWS = 8  # up to this many rows the kernel beats dequantize + GEMM (measured: bench/cpu.py --micro)


class QuantizedLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits = qw.bits
        self.out_features, self.in_features = qw.shape
        self.register_buffer("data", qw.data)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("min", qw.min)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "QuantizedLinear":
        return cls(quantize_weight(linear.weight, bits, group_size), linear.bias)

    @property
    def weight_q(self) -> QuantizedWeight:
        return QuantizedWeight(self.data, self.scale, self.min, self.bits)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[1]

    def c_linear(self) -> kernels.Linear:
        return kernels.Linear(self.data.data_ptr(), self.scale.data_ptr(), self.min.data_ptr(), kernels.ptr(self.bias),
                              self.bits, self.out_features, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        lib = kernels.load_kernels() if rows <= KERNEL_MAX_ROWS and x.dtype == torch.float32 else None
        if lib is None or torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, dequantize(self.weight_q, x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(rows, self.in_features).contiguous()
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        xsum = torch.empty(self.in_features // 32 + 1, dtype=torch.float32)
        lib.llamba_linear_rows(ctypes.byref(self.c_linear()), kernels.fptr(x2), rows, kernels.fptr(y), kernels.fptr(xsum))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """An embedding table stored like a quantized linear (one row per token); tied models share the head's table."""

    def __init__(self, table: QuantizedLinear):
        super().__init__()
        self.table = table

    @property
    def weight_q(self) -> QuantizedWeight:
        return self.table.weight_q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.weight_q, torch.float32, rows=flat).reshape(*ids.shape, self.table.in_features)


# The linears of a block that quantization replaces, by kind of layer (the artifact loads the same names). A GateLoop
# mixer's phase_proj stays float32: its output is summed along the sequence, so a rounding error in it would turn
# every later position's angle (docs/gateloop.md, Precision).
MIXER_LINEARS = {"mixer": ("in_proj", "out_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = (*MIXER_LINEARS["mixer"], *MIXER_LINEARS["attention"], *MLP_LINEARS)


def check_linear_bits(linear_bits: dict[str, int]) -> None:
    unknown = sorted(set(linear_bits) - set(LINEAR_NAMES))
    if unknown:
        raise ValueError(f"bits for {unknown}: no such projection in a block; choose from {', '.join(LINEAR_NAMES)}")
    bad = {k: b for k, b in linear_bits.items() if b not in (4, 8, 32)}
    if bad:
        raise ValueError(f"bits {bad}: choose 4, 8 or 32 for each projection")


def block_linear_bits(model, bits: int, mlp_bits: int | None = None,
                      linear_bits: dict[str, int] | None = None) -> list[tuple[nn.Module, str, int]]:
    """(parent module, attribute name, bits) of every linear in the blocks: the mixers' (or a hybrid attention
    layer's) projections at ``bits``, the MLPs' at ``mlp_bits`` (None: ``bits``), ``linear_bits`` over both by name.
    32 bits: the linear stays float32. What ``quantize_model`` replaces and what ``llamba.quant.awq`` scales for."""
    mlp_bits = bits if mlp_bits is None else mlp_bits
    linear_bits = dict(linear_bits or {})
    check_linear_bits(linear_bits)
    plan = []
    for i, layer in enumerate(model.backbone.layers):
        mixer, mlp = layer.mixer, layer.mlp
        # a hybrid's attention layer: its projections at the mixers' bits (the runtime runs them in PyTorch)
        mixing = MIXER_LINEARS["attention" if model.config.is_attention_layer(i) else "mixer"]
        for parent, name, b in (*((mixer, n, bits) for n in mixing), *((mlp, n, mlp_bits) for n in MLP_LINEARS)):
            plan.append((parent, name, linear_bits.get(name, b)))
    return plan


def quantize_model(model, bits: int, group_size: int = 32, head_bits: int | None = None,
                   mlp_bits: int | None = None, linear_bits: dict[str, int] | None = None) -> None:
    """Replace the student's linears (in place) by quantized ones. ``head_bits``: bits for the head and embedding
    (None: same as ``bits``; 32: keep them float32). ``mlp_bits``: bits for the MLPs (None: same as ``bits``).
    ``linear_bits``: bits by projection name in every block (e.g. ``{"in_proj": 8}``), over both: mixed formats
    in the manner of llama.cpp's, where the projections a model is most sensitive to keep more bits. The artifact
    stores each linear's own width, so any mix loads. A tied model keeps one shared table for head and embedding."""
    head_bits = bits if head_bits is None else head_bits
    for parent, name, b in block_linear_bits(model, bits, mlp_bits, linear_bits):
        if b < 32:
            setattr(parent, name, QuantizedLinear.from_linear(getattr(parent, name), b, group_size))
    if head_bits == 32:
        return
    tied = model.lm_head.weight is model.backbone.embedding.weight
    head = QuantizedLinear.from_linear(model.lm_head, head_bits, group_size)
    model.lm_head = head
    if tied:
        model.backbone.embedding = QuantizedEmbedding(head)
    else:
        emb = model.backbone.embedding
        model.backbone.embedding = QuantizedEmbedding(QuantizedLinear(quantize_weight(emb.weight, head_bits, group_size)))
