"""The prefill's causal depthwise convolution as one Triton kernel, fused with what surrounds it in the mixer.

``llamba.ops.conv.causal_conv`` works channel-major (``F.conv1d`` wants (batch, channels, length)): it transposes
and concatenates its input with the conv state, and its output comes back transposed, so x, B and C must be copied
once more before the scan can read them. This kernel reads ``xBC`` (batch, L, channels) where in_proj wrote it and
writes the convolution in the same layout, so x, B and C are plain views (the split is free). It also applies the
left-padding mask on both sides (padded inputs read as zeros, padded x outputs are zero) and returns the new conv
state, all in one pass. Inference only (no autograd); document resets (``seq_idx``) stay with the PyTorch path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llamba.ops import indexing

_TOKEN_TILE = 32  # tokens per program


@triton.jit
def _tap(xbc_ptr, keep_ptr, state_ptr, b, src, L, c, c_mask, s_xb, s_xt, s_kb, s_sb, s_sc,
         HAS_KEEP: tl.constexpr, HAS_STATE: tl.constexpr, K1: tl.constexpr):
    """Raw inputs at positions ``src`` (BL,) for channels ``c`` (BC,); negative positions come from the conv state,
    positions past the end (the last tile's tail) read as zeros."""
    inside = (src >= 0) & (src < L)
    u = tl.load(xbc_ptr + b * s_xb + src[:, None] * s_xt + c[None, :],
                mask=inside[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b * s_kb + src, mask=inside, other=0).to(tl.float32)
        u = u * keep[:, None]
    if HAS_STATE:
        hist = tl.load(state_ptr + b * s_sb + c[None, :] * s_sc + (src[:, None] + K1),
                       mask=(src[:, None] < 0) & (src[:, None] + K1 >= 0) & c_mask[None, :], other=0.0)
        u += hist.to(tl.float32)
    return u


@triton.jit
def _causal_conv_kernel(
    xbc_ptr, w_ptr, bias_ptr, keep_ptr, state_ptr, out_ptr, new_state_ptr,
    L, CH, X_CH,
    s_xb, s_xt, s_kb, s_sb, s_sc, s_ob, s_ot, s_nb, s_nc,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_STATE: tl.constexpr,
    K: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    pid_c, pid_l, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BC + tl.arange(0, BC)
    t = pid_l * BL + tl.arange(0, BL)
    c_mask = c < CH
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):  # tap k reads the input K-1-k steps back
        u = _tap(xbc_ptr, keep_ptr, state_ptr, b, t - (K - 1) + k, L, c, c_mask, s_xb, s_xt, s_kb, s_sb, s_sc,
                 HAS_KEEP, HAS_STATE, K - 1)
        acc += u * tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    t_mask = t < L
    if HAS_KEEP:  # a padded position's x is zero: it writes nothing to the SSM state
        keep_t = tl.load(keep_ptr + b * s_kb + t, mask=t_mask, other=0)
        acc = tl.where((keep_t[:, None] == 0) & (c[None, :] < X_CH), 0.0, acc)
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ot + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & c_mask[None, :])
    if pid_l == tl.num_programs(1) - 1:  # the last K-1 raw inputs are the next conv state
        j = tl.arange(0, 4)  # K - 1 <= 3 slots, padded to a power of two
        src = L - (K - 1) + j
        last = _tap(xbc_ptr, keep_ptr, state_ptr, b, src, L, c, c_mask, s_xb, s_xt, s_kb, s_sb, s_sc,
                    HAS_KEEP, HAS_STATE, K - 1)
        tl.store(new_state_ptr + b * s_nb + c[None, :] * s_nc + j[:, None], last.to(new_state_ptr.dtype.element_ty),
                 mask=(j[:, None] < K - 1) & c_mask[None, :])


def causal_conv_triton(
    xBC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    x_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """xBC (batch, L, channels), channels contiguous; weight (channels, 1, K) with K <= 4; conv_state
    (batch, channels, K-1) or None (zeros); attention_mask (batch, L), 0 on left padding, or None.

    Returns (out (batch, L, channels), new conv_state (batch, channels, K-1) in conv_state's dtype, else xBC's).
    Equals ``causal_conv(xBC * mask, ...)`` with the first ``x_channels`` output channels zeroed where the mask is 0.
    """
    batch, length, channels = xBC.shape
    K = weight.shape[-1]
    if K > 4 or weight.shape[0] != channels:
        raise ValueError(f"conv weight {tuple(weight.shape)} does not fit {channels} channels with kernel <= 4")
    rows, tokens = indexing.piece_sizes(batch, length, functools.partial(_piece_fits, xBC), _TOKEN_TILE)
    if (rows, tokens) != (batch, length):
        return _by_pieces(xBC, weight, bias, conv_state, attention_mask, x_channels, rows, tokens)
    if xBC.stride(-1) != 1:
        xBC = xBC.contiguous()
    if conv_state is not None and conv_state.stride(-1) != 1:
        conv_state = conv_state.contiguous()  # the kernel steps through a channel's window one element at a time
    w = weight.reshape(channels, K)
    w = w if w.is_contiguous() else w.contiguous()
    out = torch.empty(batch, length, channels, device=xBC.device, dtype=xBC.dtype)
    state_dtype = conv_state.dtype if conv_state is not None else xBC.dtype
    new_state = torch.empty(batch, channels, K - 1, device=xBC.device, dtype=state_dtype)
    keep = attention_mask[:, -length:] if attention_mask is not None else None
    if keep is not None and keep.stride(-1) != 1:
        keep = keep.contiguous()
    state = conv_state if conv_state is not None else new_state
    BL, BC = _TOKEN_TILE, 128
    grid = (triton.cdiv(channels, BC), max(1, triton.cdiv(length, BL)), batch)
    _causal_conv_kernel[grid](
        xBC, w, bias if bias is not None else w, keep if keep is not None else xBC, state, out, new_state,
        length, channels, x_channels,
        xBC.stride(0), xBC.stride(1), keep.stride(0) if keep is not None else 0, state.stride(0), state.stride(1),
        out.stride(0), out.stride(1), new_state.stride(0), new_state.stride(1),
        HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, HAS_STATE=conv_state is not None,
        K=K, BL=BL, BC=BC, num_warps=4)
    return out, new_state


def _piece_fits(xBC: torch.Tensor, rows: int, tokens: int) -> bool:
    """Whether the kernel can index a (rows, tokens) piece in int32 (the input as it lies, the output it allocates)
    and its grid's token-tile and row axes stay within CUDA's limit."""
    return (indexing.span(xBC, rows, tokens) <= indexing.INDEX_LIMIT
            and rows * tokens * xBC.shape[2] <= indexing.INDEX_LIMIT
            and max(rows, triton.cdiv(tokens, _TOKEN_TILE)) <= indexing.GRID_LIMIT)


def _by_pieces(xBC, weight, bias, conv_state, attention_mask, x_channels, rows: int, tokens: int):
    """``causal_conv_triton`` piece by piece (``llamba.ops.indexing``): groups of rows apart, spans of tokens in
    turn, each span starting from the conv state (the last raw inputs) the previous one left."""
    keep = attention_mask[:, -xBC.shape[1]:] if attention_mask is not None else None

    def step(rs: slice, ts: slice, state):
        return causal_conv_triton(xBC[rs, ts], weight, bias, state, keep[rs, ts] if keep is not None else None,
                                  x_channels)

    return indexing.by_pieces(*xBC.shape[:2], rows, tokens,
                              lambda rs: conv_state[rs] if conv_state is not None else None, step)
