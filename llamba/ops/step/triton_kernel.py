"""One fused Triton kernel for a decoding step of the Discrete Mamba-2 mixer (after in_proj, before out_proj).

One program per (batch row, query/key group): it convolves the group's B and C channels once (they are shared
by the group's value heads, so only this program may shift their conv state), then for each of the group's heads
convolves x, updates the float32 SSM state in place, reads it with C, adds D x and applies the gate. Per token the
kernel reads and writes each state once, which is the bytes floor of the step.

The kernel can also compute A_log, the last few rows of in_proj (one per head), from the normed input row: as
rows of their own GEMM they leave cuBLAS a tiny, slow product, and as part of the main GEMM an output width that
is not a multiple of 8 (see ``llamba.model.mixer.split_in_proj``).

A GateLoop mixer (``ROTATE``) also advances its cumulative phase by theta and rotates B and C by it after the conv
(state pair j is dims j and j + N/2, as in ``llamba.ops.gateloop``): the conv and the rotation work on the two
halves of B and C as separate vectors, so the rotation needs no shuffle between lanes, and the rotated vectors go
through a small scratch row so that the state update is Discrete Mamba-2's, on whole state rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamba.ops import indexing


@triton.jit
def _conv_channels(xbc_ptr, cs_ptr, w_ptr, bias_ptr, b, ch, mask, s_xb, s_cb, s_cc, HAS_BIAS: tl.constexpr):
    """Width-4 causal conv of channels ``ch`` for one token; shifts their conv state in place. Returns float32,
    rounded to the model dtype like the reference's conv output."""
    row = cs_ptr + b * s_cb + ch * s_cc
    s0 = tl.load(row + 0, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(row + 1, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(row + 2, mask=mask, other=0.0).to(tl.float32)
    u_raw = tl.load(xbc_ptr + b * s_xb + ch, mask=mask, other=0.0)
    u = u_raw.to(tl.float32)
    out = (s0 * tl.load(w_ptr + ch * 4 + 0, mask=mask, other=0.0).to(tl.float32)
           + s1 * tl.load(w_ptr + ch * 4 + 1, mask=mask, other=0.0).to(tl.float32)
           + s2 * tl.load(w_ptr + ch * 4 + 2, mask=mask, other=0.0).to(tl.float32)
           + u * tl.load(w_ptr + ch * 4 + 3, mask=mask, other=0.0).to(tl.float32))
    if HAS_BIAS:
        out += tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    # Small vectors are replicated across warps: every replica must have read the old window before any
    # thread overwrites it, or a late replica computes with the shifted state.
    tl.debug_barrier()
    tl.store(row + 0, s1.to(cs_ptr.dtype.element_ty), mask=mask)
    tl.store(row + 1, s2.to(cs_ptr.dtype.element_ty), mask=mask)
    tl.store(row + 2, u_raw.to(cs_ptr.dtype.element_ty), mask=mask)
    return out.to(xbc_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _projected_rows(u_ptr, w_ptr, bias_ptr, b, rows, row_mask, K, s_ub, s_w, HAS_BIAS: tl.constexpr,
                    BR: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, UNROLL: tl.constexpr = True):
    """float32 (BR,): the dots of the normed input row u_b (K wide) with the weight ``rows``, plus their bias: the
    kernel's side of ``llamba.ops.step.naive.projected_rows`` (A_log, a GateLoop mixer's theta). ``UNROLL``: the
    K loop unrolled, so its loads are all in flight at once (a few programs, each latency-bound); else a loop (a
    grid that fills the GPU, where the registers unrolled loads hold bound how many programs an SM runs)."""
    acc = tl.zeros([BR, BK], dtype=tl.float32)
    if UNROLL:
        for i in tl.static_range(NK):
            acc += _rows_times_u(u_ptr, w_ptr, b, rows, row_mask, i * BK + tl.arange(0, BK), K, s_ub, s_w)
    else:
        for i in range(NK):
            acc += _rows_times_u(u_ptr, w_ptr, b, rows, row_mask, i * BK + tl.arange(0, BK), K, s_ub, s_w)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    return out


@triton.jit
def _rows_times_u(u_ptr, w_ptr, b, rows, row_mask, k, K, s_ub, s_w):
    """float32 (rows, k): the weight ``rows`` times u_b, elementwise, over columns k (summed by the caller)."""
    u = tl.load(u_ptr + b * s_ub + k, mask=k < K, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows[:, None] * s_w + k[None, :], mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
    return u[None, :] * w.to(tl.float32)


@triton.jit
def _group_a_log(alog_ptr, u_ptr, aw_ptr, ab_ptr, b, g, HPG, K, s_ab, s_ub, s_aw, A_FROM_U: tl.constexpr,
                 HAS_A_BIAS: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr):
    """A_log of group g's heads for batch row b, float32 (BH,): loaded, or (A_FROM_U) the dots of the normed input
    row u_b with in_proj's A_log rows, plus their bias. Done first and for all the group's heads at once, as
    straight-line code, so that its loads overlap the conv's instead of stalling each head."""
    hh = tl.arange(0, BH)
    heads = g * HPG + hh
    if A_FROM_U:
        A_log = _projected_rows(u_ptr, aw_ptr, ab_ptr, b, heads, hh < HPG, K, s_ub, s_aw, HAS_A_BIAS, BH, BK, NK)
    else:
        A_log = tl.load(alog_ptr + b * s_ab + heads, mask=hh < HPG, other=0.0).to(tl.float32)
    return A_log


@triton.jit
def _rotated_pair(lo, hi, cos, sin, dtype):
    """(lo, hi) halves of a B or C vector turned by the phase, rounded to the model dtype as the reference's."""
    return (lo * cos - hi * sin).to(dtype).to(tl.float32), (hi * cos + lo * sin).to(dtype).to(tl.float32)


@triton.jit
def _mixer_step_kernel(
    xbc_ptr, z_ptr, alog_ptr, u_ptr, aw_ptr, ab_ptr, conv_ptr, ssm_ptr, w_ptr, cbias_ptr, d_ptr, zbias_ptr, out_ptr,
    theta_ptr, phase_ptr, tu_ptr, tw_ptr, tbias_ptr, scratch_ptr,
    G, HPG, P, N, d_inner, K, KT,
    s_xb, s_zb, s_ab, s_ub, s_aw, s_cb, s_cc, s_sb, s_sh, s_sp, s_ob, s_tb, s_tg, s_fb, s_fg, s_tub, s_tw,
    HAS_CONV_BIAS: tl.constexpr, HAS_Z_BIAS: tl.constexpr, A_FROM_U: tl.constexpr, HAS_A_BIAS: tl.constexpr,
    ROTATE: tl.constexpr, THETA_FROM_U: tl.constexpr, HAS_T_BIAS: tl.constexpr, T_UNROLL: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr, BKT: tl.constexpr,
    NKT: tl.constexpr,
):
    b, g = tl.program_id(0), tl.program_id(1)
    A_logs = _group_a_log(alog_ptr, u_ptr, aw_ptr, ab_ptr, b, g, HPG, K, s_ab, s_ub, s_aw, A_FROM_U, HAS_A_BIAS,
                          BH, BK, NK)
    n = tl.arange(0, BN)
    n_mask = n < N
    if ROTATE:  # B and C turned by the phase: pair j is dims j and j + N/2, so the conv runs on the halves
        half = N // 2
        j = tl.arange(0, BN // 2)
        j_mask = j < half
        B = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + g * N + j, j_mask, s_xb, s_cb, s_cc,
                           HAS_CONV_BIAS)
        B2 = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + g * N + half + j, j_mask, s_xb, s_cb,
                            s_cc, HAS_CONV_BIAS)
        C = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + (G + g) * N + j, j_mask, s_xb, s_cb,
                           s_cc, HAS_CONV_BIAS)
        C2 = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + (G + g) * N + half + j, j_mask, s_xb,
                            s_cb, s_cc, HAS_CONV_BIAS)
        if THETA_FROM_U:  # theta from u_b and phase_proj's rows of this group's pairs
            theta = _projected_rows(tu_ptr, tw_ptr, tbias_ptr, b, g * half + j, j_mask, KT, s_tub, s_tw, HAS_T_BIAS,
                                    BN // 2, BKT, NKT, T_UNROLL)
        else:
            theta = tl.load(theta_ptr + b * s_tb + g * s_tg + j, mask=j_mask, other=0.0)
        fp = phase_ptr + b * s_fb + g * s_fg + j
        phi = tl.load(fp, mask=j_mask, other=0.0) + theta
        phi = phi + 3.141592653589793  # wrapped to [-pi, pi) as torch.remainder(phi + pi, 2 pi) - pi
        phi = phi - 6.283185307179586 * tl.floor(phi / 6.283185307179586) - 3.141592653589793
        tl.store(fp, phi, mask=j_mask)
        cos, sin = tl.cos(phi), tl.sin(phi)
        B, B2 = _rotated_pair(B, B2, cos, sin, xbc_ptr.dtype.element_ty)
        C, C2 = _rotated_pair(C, C2, cos, sin, xbc_ptr.dtype.element_ty)
        # Through a scratch row and back as whole vectors: the head loop below then holds B and C as Discrete
        # Mamba-2's does, one (BP, N) state tile at a time. Held as four half vectors through the loop, they
        # took the kernel from 80 to 158 registers a thread (half the programs an SM runs at once).
        row = scratch_ptr + (b * G + g) * 2 * N
        tl.store(row + j, B, mask=j_mask)
        tl.store(row + half + j, B2, mask=j_mask)
        tl.store(row + N + j, C, mask=j_mask)
        tl.store(row + N + half + j, C2, mask=j_mask)
        tl.debug_barrier()  # the whole program's stores before any thread's loads
        B = tl.load(row + n, mask=n_mask, other=0.0)
        C = tl.load(row + N + n, mask=n_mask, other=0.0)
    else:
        B = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + g * N + n, n_mask, s_xb, s_cb, s_cc,
                           HAS_CONV_BIAS)
        C = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, d_inner + (G + g) * N + n, n_mask, s_xb, s_cb,
                           s_cc, HAS_CONV_BIAS)
    for hh in range(HPG):
        h = g * HPG + hh
        A_log = tl.sum(tl.where(tl.arange(0, BH) == hh, A_logs, 0.0), axis=0)
        log_a = -tl.where(A_log > 20.0, A_log, tl.log(1.0 + tl.exp(A_log)))  # -softplus, torch's threshold
        a = tl.exp(log_a)
        D = tl.load(d_ptr + h).to(tl.float32)
        for p0 in range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            p_mask = p < P
            ch = h * P + p
            x = _conv_channels(xbc_ptr, conv_ptr, w_ptr, cbias_ptr, b, ch, p_mask, s_xb, s_cb, s_cc, HAS_CONV_BIAS)
            sp = ssm_ptr + b * s_sb + h * s_sh + p[:, None] * s_sp + n[None, :]
            pn_mask = p_mask[:, None] & n_mask[None, :]
            state = tl.load(sp, mask=pn_mask, other=0.0) * a + x[:, None] * B[None, :]
            tl.store(sp, state, mask=pn_mask)
            y = tl.sum(state * C[None, :], axis=1)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + D * x
            z = tl.load(z_ptr + b * s_zb + ch, mask=p_mask, other=0.0).to(tl.float32)
            if HAS_Z_BIAS:
                z += tl.load(zbias_ptr + ch, mask=p_mask, other=0.0).to(tl.float32)
            y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(out_ptr + b * s_ob + ch, y.to(out_ptr.dtype.element_ty), mask=p_mask)


def _sm_count(device: torch.device) -> int:
    """The GPU's SM count; an H100's (132) where there is none (the interpreter, the register report)."""
    return indexing.cuda_sm_count(device.index or torch.cuda.current_device()) if device.type == "cuda" else 132


def _projection(proj, n_rows: int, what: str, why: str):
    """(u (b, d_model), weight (n_rows, d_model), bias (n_rows,) or None), checked, u and weight contiguous in their
    last dimension: rows the kernel computes itself (``_projected_rows``)."""
    u, weight, bias = proj
    if weight.shape != (n_rows, u.shape[-1]) or (bias is not None and bias.shape != (n_rows,)):
        raise ValueError(f"{what}: u {tuple(u.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}; want a ({n_rows}, d_model) weight{why}")
    u, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, weight))
    return u, weight, bias


def mixer_step_triton(xBC, z, A_log, conv_state, ssm_state, conv_weight, conv_bias, D, z_bias, n_qk_heads,
                      phase=None):
    """Same contract as ``llamba.ops.step.mixer_step_torch``: xBC (b, conv_dim), z (b, d_inner); A_log (b, H),
    or (u (b, d_model), weight (H, d_model), bias (H,) or None) to compute it here as u @ weight.T + bias;
    conv_state (b, conv_dim, 3) and ssm_state (b, H, P, N) float32 updated in place; ``phase``: a GateLoop
    mixer's (theta (b, G, N/2), or (u, weight (G * N/2, d_model), bias or None) to compute it here in float32 as
    u @ weight.T + bias; phase state (b, G, N/2) float32, updated in place). Returns (b, d_inner)."""
    batch, n_heads, head_dim, d_state = ssm_state.shape
    d_inner = n_heads * head_dim
    if conv_weight.shape[-1] != 4 or conv_state.shape[-1] != 3:
        raise ValueError(f"the fused decode kernel handles d_conv=4 only (got {conv_weight.shape[-1]})")
    if ssm_state.dtype != torch.float32 or ssm_state.stride(-1) != 1 or conv_state.stride(-1) != 1:
        raise ValueError("ssm_state must be float32 and the states contiguous in their last dimension")
    if xBC.stride(-1) != 1 or z.stride(-1) != 1:
        xBC, z = xBC.contiguous(), z.contiguous()
    if max(indexing.span(t) for t in (xBC, z, conv_state, ssm_state)) > indexing.INDEX_LIMIT:
        raise ValueError(f"a decode batch of {batch} addresses 2^31 or more elements of one tensor, past what the "
                         "kernel's int32 offsets reach: decode in smaller batches")
    a_from_u = isinstance(A_log, tuple)
    if a_from_u:
        u, a_weight, a_bias = _projection(A_log, n_heads, "A_log's projection", "")
        A_log = u  # stands in for the pointer the kernel then never reads
    else:
        u = a_weight = a_bias = A_log  # likewise
    theta_from_u = phase is not None and isinstance(phase[0], tuple)
    tu = tw = t_bias = ssm_state  # stand in for pointers the kernel then never reads
    if phase is not None:
        theta, phase_state = phase
        want = (batch, n_qk_heads, d_state // 2)
        if theta_from_u:  # theta's projection (u, weight, bias), computed in the kernel
            tu, tw, t_bias = _projection(theta, n_qk_heads * (d_state // 2), "theta's projection",
                                         " (one angle per group and state pair)")
            theta = tu  # stands in for the theta pointer, never read
        elif tuple(theta.shape) != want:
            raise ValueError(f"phase: theta {tuple(theta.shape)} must be {want} (one angle per group and state "
                             "pair; d_state even)")
        if d_state % 2 or tuple(phase_state.shape) != want:
            raise ValueError(f"phase: the phase state {tuple(phase_state.shape)} must be {want} (one angle per group "
                             "and state pair; d_state even)")
        if phase_state.dtype != torch.float32 or phase_state.stride(-1) != 1:
            raise ValueError("the phase state must be float32 and contiguous in its last dimension")
        if not theta_from_u:
            theta = theta.to(torch.float32)
            theta = theta if theta.stride(-1) == 1 else theta.contiguous()
    else:
        theta = phase_state = ssm_state  # likewise
    weight = conv_weight.reshape(-1, 4)
    weight = weight if weight.is_contiguous() else weight.contiguous()
    out = torch.empty(batch, d_inner, device=xBC.device, dtype=xBC.dtype)
    BN = max(32 if phase is not None else 16, triton.next_power_of_2(d_state))  # (a rotating mixer's halves: 16+)
    BP = min(32, triton.next_power_of_2(head_dim))
    K = u.shape[-1] if a_from_u else 1
    BH = triton.next_power_of_2(n_heads // n_qk_heads)
    BK = min(triton.next_power_of_2(K), max(16, 4096 // BH))  # a (BH, BK) float32 tile: 32 registers a thread
    KT = tu.shape[-1] if theta_from_u else 1
    # theta's (BN / 2, BKT) tile: wide and unrolled while the grid leaves SMs idle, narrow in a loop once it fills
    # them (unrolled, 128 wide, it held 168 registers a thread against Discrete Mamba-2's 80; narrow: 72)
    t_unroll = batch * n_qk_heads < _sm_count(xBC.device)
    BKT = min(triton.next_power_of_2(KT), max(16, (8192 if t_unroll else 2048) // BN))
    _mixer_step_kernel[(batch, n_qk_heads)](
        xBC, z, A_log, u, a_weight, a_bias if a_bias is not None else a_weight, conv_state, ssm_state, weight,
        conv_bias if conv_bias is not None else weight, D, z_bias if z_bias is not None else D, out,
        theta, phase_state, tu, tw, t_bias if t_bias is not None else tw,
        # the rotated B and C of each (row, group), float32: see the kernel
        torch.empty(batch * n_qk_heads * 2 * d_state if phase is not None else 1, device=xBC.device,
                    dtype=torch.float32),
        n_qk_heads, n_heads // n_qk_heads, head_dim, d_state, d_inner, K, KT,
        xBC.stride(0), z.stride(0), A_log.stride(0), u.stride(0), a_weight.stride(0), conv_state.stride(0),
        conv_state.stride(1), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), out.stride(0),
        theta.stride(0), theta.stride(1), phase_state.stride(0), phase_state.stride(1),
        tu.stride(0), tw.stride(0),
        HAS_CONV_BIAS=conv_bias is not None, HAS_Z_BIAS=z_bias is not None, A_FROM_U=a_from_u,
        HAS_A_BIAS=a_from_u and a_bias is not None, ROTATE=phase is not None, THETA_FROM_U=theta_from_u,
        HAS_T_BIAS=theta_from_u and t_bias is not None, T_UNROLL=t_unroll, BP=BP, BN=BN, BH=BH, BK=BK,
        NK=triton.cdiv(K, BK), BKT=BKT,
        NKT=triton.cdiv(KT, BKT), num_warps=4)
    return out
