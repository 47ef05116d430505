"""The training path's causal depthwise convolution: forward and backward as Triton kernels, with document resets.

Distillation runs the conv on packed windows (``seq_idx``: a token sees only earlier inputs of its own document)
under autograd. ``llamba.ops.conv.causal_conv``, the PyTorch reference, does that with a transpose to channel-major,
a concat, one masked multiply-add per tap and a transpose back, each a pass over the (batch, L, channels) tensor
that autograd keeps and replays backward, and the scan then needs x, B and C copied contiguous. Here one kernel
reads ``xBC`` where in_proj wrote it and writes the convolution in the same layout, and one backward kernel gives
the input's gradient and per-tile partial sums of the weight's and bias's (summed on the host, deterministic).

    out[t, c]  = bias[c] + sum_k w[c, k] * x[t - (K-1) + k, c] * [doc(t - (K-1) + k) == doc(t)]
    dx[s, c]   = sum_k w[c, k] * dout[s + (K-1) - k, c] * [doc(s) == doc(s + (K-1) - k)]
    dw[c, k]   = sum_t dout[t, c] * x[t - (K-1) + k, c] * [same document],   dbias[c] = sum_t dout[t, c]

Sequences start fresh (no conv state, no padding): what the trainer needs. ``causal_conv_train`` falls back to the
reference wherever these kernels do not apply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamba.ops import indexing
from llamba.ops.conv.naive import causal_conv

_FWD_TILE = 32   # tokens per forward program
_BWD_TILE = 64   # tokens per backward program (one partial row of dw / dbias each; 8 warps: no spills)
_CH_TILE = 128   # channels per program


@triton.jit
def _doc(seq_ptr, b, pos, L, s_qb, HAS_SEQ: tl.constexpr):
    """The document number at positions ``pos`` (0 everywhere without resets; outside [0, L) it does not matter)."""
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * s_qb + pos, mask=(pos >= 0) & (pos < L), other=-1)
    else:
        doc = tl.zeros_like(pos)
    return doc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, L, CH, s_xb, s_xt, s_qb, s_ob, s_ot,
                     HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, K: tl.constexpr, BL: tl.constexpr,
                     BC: tl.constexpr):
    pid_c, pid_l, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BC + tl.arange(0, BC)
    t = pid_l * BL + tl.arange(0, BL)
    c_mask, t_mask = c < CH, t < L
    doc_t = _doc(seq_ptr, b, t, L, s_qb, HAS_SEQ)
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):  # tap k reads the input K-1-k steps back
        src = t - (K - 1) + k
        keep = (src >= 0) & (src < L) & (_doc(seq_ptr, b, src, L, s_qb, HAS_SEQ) == doc_t)
        u = tl.load(x_ptr + b * s_xb + src[:, None] * s_xt + c[None, :], mask=keep[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += u * tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, L, CH, n_tiles,
                     s_xb, s_xt, s_qb, s_gb, s_gt, s_db, s_dt,
                     HAS_SEQ: tl.constexpr, K: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    pid_c, pid_l, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BC + tl.arange(0, BC)
    s = pid_l * BL + tl.arange(0, BL)
    c_mask, s_mask = c < CH, s < L
    doc_s = _doc(seq_ptr, b, s, L, s_qb, HAS_SEQ)
    g_s = tl.load(dout_ptr + b * s_gb + s[:, None] * s_gt + c[None, :], mask=s_mask[:, None] & c_mask[None, :],
                  other=0.0).to(tl.float32)
    dx = tl.zeros([BL, BC], dtype=tl.float32)
    row = b * n_tiles + pid_l  # this program's row of the partial sums
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0).to(tl.float32)
        # input position s feeds output t = s + (K-1) - k through tap k
        t = s + (K - 1) - k
        to_t = s_mask & (t < L) & (_doc(seq_ptr, b, t, L, s_qb, HAS_SEQ) == doc_s)
        g_t = tl.load(dout_ptr + b * s_gb + t[:, None] * s_gt + c[None, :], mask=to_t[:, None] & c_mask[None, :],
                      other=0.0).to(tl.float32)
        dx += g_t * w_k[None, :]
        # tap k's weight gradient over this tile's outputs s: dout[s] * x[s - (K-1) + k], same document
        src = s - (K - 1) + k
        from_src = s_mask & (src >= 0) & (_doc(seq_ptr, b, src, L, s_qb, HAS_SEQ) == doc_s)
        u = tl.load(x_ptr + b * s_xb + src[:, None] * s_xt + c[None, :], mask=from_src[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        tl.store(dw_ptr + (row * CH + c) * K + k, tl.sum(g_s * u, axis=0), mask=c_mask)
    tl.store(db_ptr + row * CH + c, tl.sum(g_s, axis=0), mask=c_mask)
    tl.store(dx_ptr + b * s_db + s[:, None] * s_dt + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=s_mask[:, None] & c_mask[None, :])


def _seq_arg(seq_idx, x):
    if seq_idx is None:
        return x, 0  # never read (HAS_SEQ false): any pointer will do
    seq = seq_idx if seq_idx.dtype == torch.int32 and seq_idx.stride(-1) == 1 else seq_idx.to(torch.int32).contiguous()
    return seq, seq.stride(0)


def conv_forward(xBC, weight, bias, seq_idx):
    batch, length, channels = xBC.shape
    K = weight.shape[-1]
    w = weight.reshape(channels, K).contiguous()
    seq, s_qb = _seq_arg(seq_idx, xBC)
    out = torch.empty(batch, length, channels, device=xBC.device, dtype=xBC.dtype)
    grid = (triton.cdiv(channels, _CH_TILE), triton.cdiv(length, _FWD_TILE), batch)
    _conv_fwd_kernel[grid](xBC, w, bias if bias is not None else w, seq, out, length, channels,
                           xBC.stride(0), xBC.stride(1), s_qb, out.stride(0), out.stride(1),
                           HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, K=K, BL=_FWD_TILE, BC=_CH_TILE,
                           num_warps=4)
    return out


def conv_backward(xBC, weight, seq_idx, dout, want_bias: bool):
    batch, length, channels = xBC.shape
    K = weight.shape[-1]
    w = weight.reshape(channels, K).contiguous()
    seq, s_qb = _seq_arg(seq_idx, xBC)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    n_tiles = triton.cdiv(length, _BWD_TILE)
    dx = torch.empty_like(xBC, memory_format=torch.contiguous_format)
    dw = torch.empty(batch * n_tiles, channels, K, device=xBC.device, dtype=torch.float32)
    db = torch.empty(batch * n_tiles, channels, device=xBC.device, dtype=torch.float32)
    grid = (triton.cdiv(channels, _CH_TILE), n_tiles, batch)
    _conv_bwd_kernel[grid](xBC, w, seq, dout, dx, dw, db, length, channels, n_tiles,
                           xBC.stride(0), xBC.stride(1), s_qb, dout.stride(0), dout.stride(1), dx.stride(0),
                           dx.stride(1), HAS_SEQ=seq_idx is not None, K=K, BL=_BWD_TILE, BC=_CH_TILE, num_warps=8)
    return dx, dw.sum(0).reshape(weight.shape), db.sum(0) if want_bias else None


class _CausalConvTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xBC, weight, bias, seq_idx):
        ctx.save_for_backward(xBC, weight, seq_idx)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return conv_forward(xBC, weight, bias, seq_idx)

    @staticmethod
    def backward(ctx, dout):
        xBC, weight, seq_idx = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        dx, dw, db = conv_backward(xBC, weight, seq_idx, dout, want_b)
        return (dx if want_x else None, dw.to(weight.dtype) if want_w else None,
                db.to(ctx.bias_dtype) if want_b else None, None)


def fits(xBC: torch.Tensor) -> bool:
    """Whether one launch can index ``xBC`` in int32 and its grid stays within CUDA's limits (else the caller
    takes the PyTorch reference: the trainer's windows are far below both)."""
    batch, length, channels = xBC.shape
    return (indexing.span(xBC) <= indexing.INDEX_LIMIT and batch * length * channels <= indexing.INDEX_LIMIT
            and max(batch, triton.cdiv(length, _FWD_TILE)) <= indexing.GRID_LIMIT)


def causal_conv_train(xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """xBC (batch, L, channels), channels contiguous; weight (channels, 1, K); bias (channels,) or None; seq_idx
    (batch, L) or None. The convolution of fresh sequences (``causal_conv(xBC, weight, bias, None, seq_idx)[0]``),
    differentiable in xBC, weight and bias; computed in float32, returned in xBC's dtype."""
    if weight.shape[0] != xBC.shape[-1] or weight.shape[-1] > 8:
        raise ValueError(f"conv weight {tuple(weight.shape)} does not fit {xBC.shape[-1]} channels with kernel <= 8")
    if not fits(xBC):
        return causal_conv(xBC, weight, bias, None, seq_idx)[0]
    if xBC.stride(-1) != 1:
        xBC = xBC.contiguous()
    return _CausalConvTrain.apply(xBC, weight, bias, seq_idx)
