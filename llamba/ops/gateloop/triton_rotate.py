"""The GateLoop rotation of B and C by their cumulative phase as one Triton kernel (inference: no autograd).

``phase.rotate_by_phase`` in PyTorch is a float64 cumsum, a gather of each document's start, a wrap, cos / sin and
two rotations, each a pass over (batch, L, G, N/2) or (batch, L, G, N) in memory. Here one program owns a block of
state pairs of one group and one sequence, walks the tokens in tiles and carries the phase from tile to tile: the
segmented sum (restarting at each new document of ``seq_idx``) in float64 as in PyTorch, wrapped to [-pi, pi),
then cos / sin and both rotations in float32, reading B and C where the conv wrote them. Its twin is
``phase.rotate_by_phase`` (tests/test_kernels.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llamba.ops.gateloop.phase import check_theta
from llamba.ops.ssd.naive import state_dtype

_TOKEN_TILE = 32
_PAIR_TILE = 32


@triton.jit
def _segmented_sum(a_value, a_reset, b_value, b_reset):
    """Combine of a running sum that restarts where a reset flag is set (the later element's reset wins)."""
    return tl.where(b_reset != 0, b_value, a_value + b_value), a_reset | b_reset


@triton.jit
def _rotate(t_ptr, o_ptr, b, t, g, j, t_mask, j_mask, cos, sin, s_b, s_t, s_g, o_b, o_t, o_g, N2):
    """t (one of B, C): each pair (j, j + N/2) times e^{i phi}, stored to o in o's dtype."""
    base = b * s_b + t[:, None] * s_t + g * s_g
    mask = t_mask[:, None] & j_mask[None, :]
    t1 = tl.load(t_ptr + base + j[None, :], mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(t_ptr + base + (j + N2)[None, :], mask=mask, other=0.0).to(tl.float32)
    out = o_ptr + b * o_b + t[:, None] * o_t + g * o_g
    tl.store(out + j[None, :], (t1 * cos - t2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(out + (j + N2)[None, :], (t2 * cos + t1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_kernel(
    b_ptr, c_ptr, theta_ptr, init_ptr, seq_ptr, bo_ptr, co_ptr, final_ptr,
    L, N2,
    sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sth_b, sth_t, sth_g, si_b, si_g, ss_b, so_b, so_t, so_g, sf_b, sf_g,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr,
    PI: tl.constexpr = math.pi, TWO_PI: tl.constexpr = 2 * math.pi,
):
    pid_j, g, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = pid_j * BJ + tl.arange(0, BJ)
    j_mask = j < N2
    carry = tl.zeros([BJ], dtype=tl.float64)
    if HAS_INIT:  # the first token's document continues the initial phase
        carry += tl.load(init_ptr + b * si_b + g * si_g + j, mask=j_mask, other=0.0).to(tl.float64)
    rows = tl.arange(0, BT)
    for t0 in range(0, L, BT):
        t = t0 + rows
        t_mask = t < L
        theta = tl.load(theta_ptr + b * sth_b + t[:, None] * sth_t + g * sth_g + j[None, :],
                        mask=t_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float64)
        reset = tl.zeros([BT], dtype=tl.int32)
        if HAS_SEQ:  # token t > 0 starts a document where seq_idx changes
            here = tl.load(seq_ptr + b * ss_b + t, mask=t_mask, other=0)
            before = tl.load(seq_ptr + b * ss_b + t - 1, mask=t_mask & (t > 0), other=0)
            reset = ((here != before) & (t > 0) & t_mask).to(tl.int32)
        flags = tl.broadcast_to(reset[:, None], [BT, BJ])
        phi, seen = tl.associative_scan((theta, flags), 0, _segmented_sum)
        phi = tl.where(seen != 0, phi, phi + carry[None, :])  # rows before this tile's first reset continue it
        phi = phi - TWO_PI * tl.floor((phi + PI) / TWO_PI)  # wrapped to [-pi, pi), as phase.wrap_phase
        last = tl.minimum(L - t0, BT) - 1
        carry = tl.sum(tl.where((rows == last)[:, None], phi, 0.0), axis=0)
        phi32 = phi.to(tl.float32)
        cos, sin = tl.cos(phi32), tl.sin(phi32)
        _rotate(b_ptr, bo_ptr, b, t, g, j, t_mask, j_mask, cos, sin, sb_b, sb_t, sb_g, so_b, so_t, so_g, N2)
        _rotate(c_ptr, co_ptr, b, t, g, j, t_mask, j_mask, cos, sin, sc_b, sc_t, sc_g, so_b, so_t, so_g, N2)
    tl.store(final_ptr + b * sf_b + g * sf_g + j, carry.to(final_ptr.dtype.element_ty), mask=j_mask)


def rotate_by_phase_triton(B: torch.Tensor, C: torch.Tensor, theta: torch.Tensor,
                           initial_phase: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None):
    """``phase.rotate_by_phase`` in one kernel: (B', C', final phase), B' and C' contiguous in B's dtype, the final
    phase in the state dtype. B and C may be strided views (the conv's output split), with unit stride along N."""
    check_theta(theta, B)
    if B.shape != C.shape:
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must have the same shape")
    batch, L, G, N = B.shape
    N2 = N // 2
    final = torch.zeros(batch, G, N2, device=B.device, dtype=state_dtype(theta.dtype))
    if L == 0:
        if initial_phase is not None:
            final.copy_(initial_phase)
        return B.clone(), C.clone(), final
    B, C, theta = (x if x.stride(-1) == 1 else x.contiguous() for x in (B, C, theta))
    B_out, C_out = (torch.empty(B.shape, device=B.device, dtype=B.dtype) for _ in range(2))
    # absent, either is a stand-in the kernel never reads (HAS_INIT / HAS_SEQ off)
    init = initial_phase.contiguous() if initial_phase is not None else final
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else final
    grid = (triton.cdiv(N2, _PAIR_TILE), G, batch)
    _rotate_kernel[grid](
        B, C, theta, init, seq, B_out, C_out, final,
        L, N2,
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        theta.stride(0), theta.stride(1), theta.stride(2),
        init.stride(0), init.stride(1), seq.stride(0),
        B_out.stride(0), B_out.stride(1), B_out.stride(2), final.stride(0), final.stride(1),
        HAS_INIT=initial_phase is not None, HAS_SEQ=seq_idx is not None, BT=_TOKEN_TILE, BJ=_PAIR_TILE,
    )
    return B_out, C_out, final

