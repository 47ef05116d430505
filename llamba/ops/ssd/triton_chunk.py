"""The chunked scan of ``llamba.ops.ssd.chunk.ssd_chunk`` as Triton kernels, forward and backward.

Over chunks of ``BT`` tokens:

              chunk_cumsum:    the log-decay summed within each chunk, once, for the kernels below that are not
                               fused (the fused ones sum it themselves)
    forward   chunk_states:    carry the state through the chunks (sequential over chunks, one program per
                               batch row, head and state tile), adding what each chunk writes: sum_j w_j x_j B_j^T
              chunk_output:    per chunk, y = masked (C B^T * decay) x  +  exp(cs) * S_in C
           or fused_forward:   both in one pass, chunk after chunk, the state held in registers (when batch x heads
                               fills the GPU: reads x, B and C once)
    backward  chunk_states:    reversed: the gradient of every chunk's outgoing state
              chunk_backward:  per chunk, dx, dB, dC from the recomputed intra-chunk matrices (a few small
                               programs per chunk)
           or fused_backward:  one reversed pass per P tile, the state gradient held in registers (same condition
                               as the fused forward): dx, and dB, dC when one tile holds all of P; otherwise the
                               gradient's snapshots go to chunk_backward's dB/dC programs

dlog_a needs no gradient through the states: with q_t = C_t exp(cs_t) and k_t = B_t exp(-cs_t) the scan is plain
linear attention, so the gradient of the cumulative log-decay cs_t is q_t . dq_t - k_t . dk_t = C_t . dC_t -
B_t . dB_t (plus <dS_final, S_final> at the last token), and dlog_a_k sums it over the tokens t >= k.

The carried state is float32; the per-chunk snapshots that pass between kernels (the state entering each chunk,
the gradient leaving it) are stored in bf16 for bf16 inputs: they only ever enter bf16 matrix products, so this
halves the kernels' dominant memory traffic without changing a product (float32 inputs keep float32 snapshots).
Document resets (``seq_idx``) become masks: a token reads only tokens of its own document, and a chunk's incoming
state reaches only tokens of the document it belongs to. ``chunk_size`` is accepted for interface compatibility;
the result does not depend on it, so the kernels use their own tile size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llamba.ops import indexing
from llamba.ops.ssd import cuda_backward, needs_grad
from llamba.ops.ssd.naive import state_dtype

BT = 64  # tokens per chunk (tile); the function computed does not depend on it
# Launch settings per kernel, measured on an H100 (benchmarks/bench_kernels.py, scan_small_batch.py). The carry's
# num_stages sets how many chunks ahead Triton's pipeliner loads (num_stages - 1): 4 forward, 3 reverse measured best.
LAUNCH = {"states": dict(num_warps=4, num_stages=4), "states_reverse": dict(num_warps=4, num_stages=3),
          "output": dict(num_warps=4, num_stages=2),
          "backward": dict(num_warps=4, num_stages=2), "fused_backward": dict(num_warps=4, num_stages=2)}
FUSED_MIN_PROGRAMS_PER_SM = 1  # the one-pass forward from this many (batch x head x 64-wide P tile) per SM
FORWARDS = ("auto", "fused", "two_kernel")
# The one-pass backward in CUDA (cuda_backward.py): "wide" where one Triton program cannot hold the state gradient
# (head dim past 64), "always" where it applies, or "never"
CUDA_BACKWARD = "wide"


@triton.jit
def _load_tokens(ptr, b, t, head, cols, L, W, s_b, s_t, s_h):
    """The (tokens t, columns cols) tile of a (batch, L, heads, W) tensor at batch row b and head, zeros outside."""
    return tl.load(ptr + b * s_b + t[:, None] * s_t + head * s_h + cols[None, :],
                   mask=(t[:, None] < L) & (cols[None, :] < W), other=0.0)


@triton.jit
def _load_tokens_t(ptr, b, t, head, cols, L, W, s_b, s_t, s_h):
    """``_load_tokens`` transposed: the (columns cols, tokens t) tile, for a product that contracts over tokens."""
    return tl.load(ptr + b * s_b + t[None, :] * s_t + head * s_h + cols[:, None],
                   mask=(t[None, :] < L) & (cols[:, None] < W), other=0.0)


@triton.jit
def _store_tokens(ptr, value, b, t, head, cols, L, W, s_b, s_t, s_h):
    """Stores ``value`` into the tile that ``_load_tokens`` reads, in the tensor's dtype."""
    tl.store(ptr + b * s_b + t[:, None] * s_t + head * s_h + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=(t[:, None] < L) & (cols[None, :] < W))


@triton.jit
def _load_state(ptr, b, c, h, p, n, P, N, s_b, s_c, s_h, s_p):
    """The (p, n) tile of a state, or a state gradient, of a (batch, chunks, heads, P, N) tensor (s_c = 0 and c = 0:
    of a (batch, heads, P, N) one), zeros outside."""
    return tl.load(ptr + b * s_b + c * s_c + h * s_h + p[:, None] * s_p + n[None, :],
                   mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)


@triton.jit
def _store_state(ptr, value, b, c, h, p, n, P, N, s_b, s_c, s_h, s_p):
    """Stores ``value`` into the tile that ``_load_state`` reads, in the tensor's dtype."""
    tl.store(ptr + b * s_b + c * s_c + h * s_h + p[:, None] * s_p + n[None, :], value.to(ptr.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _chunk_cumsum_kernel(la_ptr, cs_ptr, L, H, s_lab, s_lat, s_csb, BT: tl.constexpr, BH: tl.constexpr):
    """One chunk of ``_chunk_cumsum`` for all heads of one sequence."""
    c, b = tl.program_id(0), tl.program_id(1)
    t = c * BT + tl.arange(0, BT)
    hh = tl.arange(0, BH)
    la = tl.load(la_ptr + b * s_lab + t[:, None] * s_lat + hh[None, :], mask=(t[:, None] < L) & (hh[None, :] < H),
                 other=0.0)
    tl.store(cs_ptr + b * s_csb + t[:, None] * H + hh[None, :], tl.cumsum(la.to(tl.float32), axis=0),
             mask=hh[None, :] < H)


@triton.jit
def _chunk_decays(la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT: tl.constexpr, HAS_SEQ: tl.constexpr,
                  CUMULATIVE: tl.constexpr):
    """Chunk c's tokens, their cumulative log-decays (and its last token's), document ids and document masks. With
    CUMULATIVE, ``la_ptr`` holds the sums already (``_chunk_cumsum``: the two-kernel route, where the scan sat on
    each sequential step of the carry); otherwise the log-decay, summed here (the one-pass kernels, whose steps are
    long, measured slower loading the sums)."""
    t = c * BT + tl.arange(0, BT)
    if CUMULATIVE:
        cs = tl.load(la_ptr + b * s_lab + t * s_lat + h)
        cs_last = tl.load(la_ptr + b * s_lab + (c * BT + BT - 1) * s_lat + h)
    else:
        la = tl.load(la_ptr + b * s_lab + t * s_lat + h, mask=t < L, other=0.0).to(tl.float32)
        cs = tl.cumsum(la, axis=0)
        cs_last = tl.sum(la, axis=0)
    if HAS_SEQ:
        seq = tl.load(seq_ptr + b * s_sqb + t)
        seq_last = tl.load(seq_ptr + b * s_sqb + c * BT + BT - 1)
        prev = tl.load(seq_ptr + b * s_sqb + tl.maximum(c * BT - 1, 0))
        to_end = seq == seq_last
        from_start = seq == prev
        carry = seq_last == prev
    else:
        seq = tl.zeros([BT], dtype=tl.int32)
        to_end = t >= 0
        from_start = t >= 0
        carry = True
    return t, cs, cs_last, seq, to_end, from_start, carry


@triton.jit
def _initial_state(init_ptr, b, h, p, n, P, N, s_ib, s_ih, s_ip, HAS_INIT: tl.constexpr, BP: tl.constexpr,
                   BN: tl.constexpr):
    """The (BP, BN) tile of the state a sequence starts from, float32 (zeros without one)."""
    if HAS_INIT:
        state = _load_state(init_ptr, b, 0, h, p, n, P, N, s_ib, 0, s_ih, s_ip).to(tl.float32)
    else:
        state = tl.zeros([BP, BN], dtype=tl.float32)
    return state


@triton.jit
def _chunk_weights(cs, cs_last, to_end, from_start, carry):
    """e_i = exp(cs_i)[from_start] (incoming state -> token i), w_j = exp(cs_last - cs_j)[to_end] (token j ->
    outgoing state), and the chunk's decay of the state passing through."""
    e = tl.where(from_start, tl.exp(cs), 0.0)
    w = tl.where(to_end, tl.exp(cs_last - cs), 0.0)
    decay = tl.where(carry, tl.exp(cs_last), 0.0)
    return e, w, decay


@triton.jit
def _decay_matrix(cs, seq, HAS_SEQ: tl.constexpr, BT: tl.constexpr):
    """M_ij = exp(cs_i - cs_j) for j <= i in the same document, else 0 (cheap to recompute: it is kept nowhere)."""
    ii = tl.arange(0, BT)
    keep = ii[:, None] >= ii[None, :]
    if HAS_SEQ:
        keep = keep & (seq[:, None] == seq[None, :])
    return tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))


@triton.jit
def _chunk_states_kernel(
    v_ptr, k_ptr, la_ptr, seq_ptr, init_ptr, states_ptr, final_ptr,
    L, H, HPG, P, N, n_chunks,
    s_vb, s_vt, s_vh, s_kb, s_kt, s_kh, s_lab, s_lat, s_sqb,
    s_sb, s_sc, s_sh, s_sp, s_ib, s_ih, s_ip, s_fb, s_fh, s_fp,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """One (BP, BN) tile of the state, carried through the chunks: cur <- decay_c * cur + local_c.

    Forward (v = x, k = B, chunks in order): local_c = sum_j exp(cs_last - cs_j)[to_end] x_j B_j^T, and
    ``states[c]`` receives the state entering chunk c. Reverse (v = dy, k = C, chunks backwards):
    local_c = sum_i exp(cs_i)[from_start] dy_i C_i^T, and ``states[c]`` receives the gradient of the state
    leaving chunk c. ``final`` gets the last state (forward) or the initial state's gradient (reverse)."""
    pid_p, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // HPG
    p = pid_p * BP + tl.arange(0, BP)
    n = pid_n * BN + tl.arange(0, BN)
    cur = _initial_state(init_ptr, b, h, p, n, P, N, s_ib, s_ih, s_ip, HAS_INIT, BP, BN)
    # The carry is a chain of short steps, so a step must not wait a memory latency for its own inputs. The loads
    # below depend only on the loop index: Triton's pipeliner issues them num_stages - 1 chunks ahead, straight into
    # shared memory (it beat loading a chunk ahead by hand into registers once nothing in the step scanned the
    # log-decay: results/scan-small-batch-h100.md).
    for i in range(n_chunks):
        c = n_chunks - 1 - i if REVERSE else i
        t, cs, cs_last, seq, to_end, from_start, carry = _chunk_decays(
            la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT, HAS_SEQ, CUMULATIVE=True)
        vT = _load_tokens_t(v_ptr, b, t, h, p, L, P, s_vb, s_vt, s_vh)  # (BP, BT): the product needs no transpose
        k = _load_tokens(k_ptr, b, t, g, n, L, N, s_kb, s_kt, s_kh)
        e, w, decay = _chunk_weights(cs, cs_last, to_end, from_start, carry)
        local = tl.dot((vT.to(tl.float32) * (e if REVERSE else w)[None, :]).to(k.dtype), k, input_precision=PREC)
        _store_state(states_ptr, cur, b, c, h, p, n, P, N, s_sb, s_sc, s_sh, s_sp)
        cur = decay * cur + local
    _store_state(final_ptr, cur, b, 0, h, p, n, P, N, s_fb, 0, s_fh, s_fp)


@triton.jit
def _chunk_y(Cb, Bb, xp, S_in, cs, seq, from_start, HAS_SEQ: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """One chunk's output (BT, BP): masked (C B^T * decay) x from inside the chunk, plus exp(cs) * S_in C."""
    scores = tl.dot(Cb, tl.trans(Bb), input_precision=PREC) * _decay_matrix(cs, seq, HAS_SEQ, BT)  # C_i . B_j
    y = tl.dot(scores.to(xp.dtype), xp, input_precision=PREC)
    inter = tl.dot(Cb, tl.trans(S_in.to(Cb.dtype)), input_precision=PREC)  # (BT, BP): S_in C_i
    return y + tl.where(from_start, tl.exp(cs), 0.0)[:, None] * inter


@triton.jit
def _skip_and_gate(y, xp, d_ptr, z_ptr, zb_ptr, b, h, t, p, L, P, s_zb, s_zt, HAS_Z_BIAS: tl.constexpr):
    """(y + D_h x) * silu(z + z_bias): the mixer's skip and output gate, applied while y is still in registers
    (inference: it saves the mixer five elementwise passes over (batch, T, d_inner))."""
    zz = _load_tokens(z_ptr, b, t, h, p, L, P, s_zb, s_zt, P).to(tl.float32)  # z: (batch, T, H * P)
    if HAS_Z_BIAS:
        zz += tl.load(zb_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)[None, :]
    skip = tl.load(d_ptr + h).to(tl.float32)
    return (y + skip * xp.to(tl.float32)) * zz * tl.sigmoid(zz)


@triton.jit
def _chunk_output_kernel(
    x_ptr, b_ptr, c_ptr, la_ptr, seq_ptr, states_ptr, y_ptr, d_ptr, z_ptr, zb_ptr,
    L, H, HPG, P, N,
    s_xb, s_xt, s_xh, s_bb, s_bt, s_bh, s_cb, s_ct, s_ch, s_lab, s_lat, s_sqb,
    s_sb, s_sc, s_sh, s_sp, s_yb, s_yt, s_yh, s_zb, s_zt,
    GATED: tl.constexpr, HAS_Z_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_p, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // HPG
    t, cs, cs_last, seq, to_end, from_start, carry = _chunk_decays(
        la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT, HAS_SEQ, CUMULATIVE=True)
    n = tl.arange(0, BN)
    p = pid_p * BP + tl.arange(0, BP)
    Cb = _load_tokens(c_ptr, b, t, g, n, L, N, s_cb, s_ct, s_ch)
    Bb = _load_tokens(b_ptr, b, t, g, n, L, N, s_bb, s_bt, s_bh)
    xp = _load_tokens(x_ptr, b, t, h, p, L, P, s_xb, s_xt, s_xh)
    S_in = _load_state(states_ptr, b, c, h, p, n, P, N, s_sb, s_sc, s_sh, s_sp)
    y = _chunk_y(Cb, Bb, xp, S_in, cs, seq, from_start, HAS_SEQ, BT, PREC)
    if GATED:
        y = _skip_and_gate(y, xp, d_ptr, z_ptr, zb_ptr, b, h, t, p, L, P, s_zb, s_zt, HAS_Z_BIAS)
    _store_tokens(y_ptr, y, b, t, h, p, L, P, s_yb, s_yt, s_yh)


@triton.jit
def _fused_forward_kernel(
    x_ptr, b_ptr, c_ptr, la_ptr, seq_ptr, init_ptr, states_ptr, final_ptr, y_ptr, d_ptr, z_ptr, zb_ptr,
    L, H, HPG, P, N, n_chunks,
    s_xb, s_xt, s_xh, s_bb, s_bt, s_bh, s_cb, s_ct, s_ch, s_lab, s_lat, s_sqb,
    s_sb, s_sc, s_sh, s_sp, s_ib, s_ih, s_ip, s_fb, s_fh, s_fp, s_yb, s_yt, s_yh, s_zb, s_zt,
    GATED: tl.constexpr, HAS_Z_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    STORE_STATES: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """The whole forward in one pass: chunk by chunk, the output from the carried state (kept in registers), then
    the state carried on. x, B and C are read once and nothing passes between kernels; the snapshots are stored
    only when a backward will need them."""
    pid_p, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // HPG
    p = pid_p * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    cur = _initial_state(init_ptr, b, h, p, n, P, N, s_ib, s_ih, s_ip, HAS_INIT, BP, BN)
    for c in range(n_chunks):
        t, cs, cs_last, seq, to_end, from_start, carry = _chunk_decays(
            la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT, HAS_SEQ, CUMULATIVE=False)
        Cb = _load_tokens(c_ptr, b, t, g, n, L, N, s_cb, s_ct, s_ch)
        Bb = _load_tokens(b_ptr, b, t, g, n, L, N, s_bb, s_bt, s_bh)
        xp = _load_tokens(x_ptr, b, t, h, p, L, P, s_xb, s_xt, s_xh)
        if STORE_STATES:
            _store_state(states_ptr, cur, b, c, h, p, n, P, N, s_sb, s_sc, s_sh, s_sp)
        y = _chunk_y(Cb, Bb, xp, cur, cs, seq, from_start, HAS_SEQ, BT, PREC)
        if GATED:
            y = _skip_and_gate(y, xp, d_ptr, z_ptr, zb_ptr, b, h, t, p, L, P, s_zb, s_zt, HAS_Z_BIAS)
        _store_tokens(y_ptr, y, b, t, h, p, L, P, s_yb, s_yt, s_yh)
        _, w, decay = _chunk_weights(cs, cs_last, to_end, from_start, carry)
        local = tl.dot(tl.trans((xp.to(tl.float32) * w[:, None]).to(Bb.dtype)), Bb, input_precision=PREC)
        cur = decay * cur + local
    _store_state(final_ptr, cur, b, 0, h, p, n, P, N, s_fb, 0, s_fh, s_fp)


@triton.jit
def _dx_tile(A_t, Bb, dyp, Gp, w, PREC: tl.constexpr):
    """dx for one P tile of a chunk: A^T dy from inside the chunk, plus w_j G B_j through the state it writes."""
    BG = tl.dot(Bb, tl.trans(Gp.to(Bb.dtype)), input_precision=PREC)  # (BT, BP)
    return tl.dot(A_t, dyp, input_precision=PREC) + w[:, None] * BG


@triton.jit
def _dC_tile(dyS, RM, Cb, Bb, e, PREC: tl.constexpr):
    """dC = e * (dy S_in) + RM B (RM = M * dy x^T, the gradient of C B^T), and its share C_i . dC_i of dcs_i."""
    dC = dyS * e[:, None] + tl.dot(RM, Bb, input_precision=PREC)
    return dC, tl.sum(Cb.to(tl.float32) * dC, axis=1)


@triton.jit
def _dB_tile(xG, RM, Cb, Bb, w, PREC: tl.constexpr):
    """dB = w * (x G) + RM^T C, and its share -B_j . dB_j of dcs_j."""
    dB = xG * w[:, None] + tl.dot(tl.trans(RM), Cb, input_precision=PREC)
    return dB, -tl.sum(Bb.to(tl.float32) * dB, axis=1)


@triton.jit
def _chunk_backward_kernel(
    x_ptr, b_ptr, c_ptr, la_ptr, seq_ptr, sin_ptr, g_ptr, dy_ptr,
    dx_ptr, db_ptr, dc_ptr, dcs_ptr,
    L, H, HPG, P, N, n_p_tiles,
    s_xb, s_xt, s_xh, s_bb, s_bt, s_bh, s_cb, s_ct, s_ch, s_lab, s_lat, s_sqb,
    s_sb, s_sc, s_sh, s_sp, s_dyb, s_dyt, s_dyh, s_dxb, s_dxt, s_dxh, s_dbb, s_dbt, s_dbh, s_dcsk, s_dcsb, s_dcst,
    HAS_SEQ: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, FULL_P: tl.constexpr,
    FULL_N: tl.constexpr, PREC: tl.constexpr,
):
    """All gradients of one chunk, given S_in (the state entering it) and G (the gradient of the state leaving it):

        dx = A^T dy + w (B G^T)          with A = (C B^T) * M
        dC = (M * dy x^T) B + e (dy S_in)     dB = (M * dy x^T)^T C + w (x G)
        dcs_t = C_t . dC_t - B_t . dB_t   (the gradient of the cumulative log-decay)

    spread over small programs: programs 0 .. n_p_tiles-1 write one P tile of dx each, the next ones one N tile of
    dB and dC each, and that tile's share of dcs summed over the chunk's later tokens (its own row of ``dcs``).
    The programs of one chunk run side by side, so the inputs they share come from L2, and each is small enough
    for several to share an SM (one program per chunk with the same math needs 150-230 registers and ran 5-10%
    slower: results/scan-backward-h100.md)."""
    k, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // HPG
    t, cs, cs_last, seq, to_end, from_start, carry = _chunk_decays(
        la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT, HAS_SEQ, CUMULATIVE=True)
    e, w, decay = _chunk_weights(cs, cs_last, to_end, from_start, carry)
    M = _decay_matrix(cs, seq, HAS_SEQ, BT)
    if k < n_p_tiles:  # dx = A^T dy + w (B G^T) for P tile k; A over all of N
        nf = tl.arange(0, FULL_N)
        Cf = _load_tokens(c_ptr, b, t, g, nf, L, N, s_cb, s_ct, s_ch)
        Bf = _load_tokens(b_ptr, b, t, g, nf, L, N, s_bb, s_bt, s_bh)
        A_t = tl.trans(tl.dot(Cf, tl.trans(Bf), input_precision=PREC) * M).to(Cf.dtype)
        p = k * BP + tl.arange(0, BP)
        dyp = _load_tokens(dy_ptr, b, t, h, p, L, P, s_dyb, s_dyt, s_dyh).to(Cf.dtype)
        Gp = _load_state(g_ptr, b, c, h, p, nf, P, N, s_sb, s_sc, s_sh, s_sp)
        _store_tokens(dx_ptr, _dx_tile(A_t, Bf, dyp, Gp, w, PREC), b, t, h, p, L, P, s_dxb, s_dxt, s_dxh)
    else:  # dB, dC for N tile k - n_p_tiles: RM = M * dy x^T over all of P
        n = (k - n_p_tiles) * BN + tl.arange(0, BN)
        pf = tl.arange(0, FULL_P)
        xf = _load_tokens(x_ptr, b, t, h, pf, L, P, s_xb, s_xt, s_xh)
        dyf = _load_tokens(dy_ptr, b, t, h, pf, L, P, s_dyb, s_dyt, s_dyh).to(xf.dtype)
        RM = (M * tl.dot(dyf, tl.trans(xf), input_precision=PREC)).to(xf.dtype)
        Sn = _load_state(sin_ptr, b, c, h, pf, n, P, N, s_sb, s_sc, s_sh, s_sp)
        Gn = _load_state(g_ptr, b, c, h, pf, n, P, N, s_sb, s_sc, s_sh, s_sp)
        Cn = _load_tokens(c_ptr, b, t, g, n, L, N, s_cb, s_ct, s_ch)
        Bn = _load_tokens(b_ptr, b, t, g, n, L, N, s_bb, s_bt, s_bh)
        dC, dcs_C = _dC_tile(tl.dot(dyf, Sn.to(xf.dtype), input_precision=PREC), RM, Cn, Bn, e, PREC)
        _store_tokens(dc_ptr, dC, b, t, h, n, L, N, s_dbb, s_dbt, s_dbh)
        dB, dcs_B = _dB_tile(tl.dot(xf, Gn.to(xf.dtype), input_precision=PREC), RM, Cn, Bn, w, PREC)
        _store_tokens(db_ptr, dB, b, t, h, n, L, N, s_dbb, s_dbt, s_dbh)
        dcs = dcs_C + dcs_B
        tl.store(dcs_ptr + (k - n_p_tiles) * s_dcsk + b * s_dcsb + t * s_dcst + h,
                 tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs)


@triton.jit
def _fused_backward_kernel(
    x_ptr, b_ptr, c_ptr, la_ptr, seq_ptr, sin_ptr, dfinal_ptr, dy_ptr,
    dx_ptr, db_ptr, dc_ptr, dla_ptr, dinit_ptr, gout_ptr,
    L, H, HPG, P, N, n_chunks,
    s_xb, s_xt, s_xh, s_bb, s_bt, s_bh, s_cb, s_ct, s_ch, s_lab, s_lat, s_sqb,
    s_sb, s_sc, s_sh, s_sp, s_dyb, s_dyt, s_dyh, s_dxb, s_dxt, s_dxh, s_dbb, s_dbt, s_dbh,
    s_fb, s_fh, s_fp,
    ALL_P: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr,
):
    """The backward in one reversed pass per (P tile, head): G, the gradient of the state leaving the chunk, stays
    in registers and is carried back as decay * G + sum_i e_i dy_i C_i^T, so the reversed state pass and its
    reads disappear. Per chunk, the math of ``_chunk_backward_kernel``. dx needs only this P tile of G. dB, dC
    and dcs sum over all of P: with ALL_P (one tile holds P) they are computed here too, and going backwards the
    running sum of dcs turns into dlog_a; otherwise G's snapshots go to ``gout`` for the per-chunk dB/dC
    programs."""
    pid_p, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // HPG
    p = pid_p * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    G = _initial_state(dfinal_ptr, b, h, p, n, P, N, s_fb, s_fh, s_fp, HAS_DFINAL, BP, BN)
    later = 0.0  # sum of dcs over the chunks already done (all later tokens)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t, cs, cs_last, seq, to_end, from_start, carry = _chunk_decays(
            la_ptr, seq_ptr, b, h, c, L, s_lab, s_lat, s_sqb, BT, HAS_SEQ, CUMULATIVE=False)
        Cb = _load_tokens(c_ptr, b, t, g, n, L, N, s_cb, s_ct, s_ch)
        Bb = _load_tokens(b_ptr, b, t, g, n, L, N, s_bb, s_bt, s_bh)
        dyp = _load_tokens(dy_ptr, b, t, h, p, L, P, s_dyb, s_dyt, s_dyh).to(Cb.dtype)
        e, w, decay = _chunk_weights(cs, cs_last, to_end, from_start, carry)
        M = _decay_matrix(cs, seq, HAS_SEQ, BT)
        A_t = tl.trans(tl.dot(Cb, tl.trans(Bb), input_precision=PREC) * M).to(Cb.dtype)
        _store_tokens(dx_ptr, _dx_tile(A_t, Bb, dyp, G, w, PREC), b, t, h, p, L, P, s_dxb, s_dxt, s_dxh)
        if ALL_P:
            xp = _load_tokens(x_ptr, b, t, h, p, L, P, s_xb, s_xt, s_xh)
            RM = (M * tl.dot(dyp, tl.trans(xp), input_precision=PREC)).to(Cb.dtype)
            dB, dcs_B = _dB_tile(tl.dot(xp, G.to(Cb.dtype), input_precision=PREC), RM, Cb, Bb, w, PREC)
            _store_tokens(db_ptr, dB, b, t, h, n, L, N, s_dbb, s_dbt, s_dbh)
            Sp = _load_state(sin_ptr, b, c, h, p, n, P, N, s_sb, s_sc, s_sh, s_sp)
            dC, dcs_C = _dC_tile(tl.dot(dyp, Sp.to(Cb.dtype), input_precision=PREC), RM, Cb, Bb, e, PREC)
            _store_tokens(dc_ptr, dC, b, t, h, n, L, N, s_dbb, s_dbt, s_dbh)
            dcs = dcs_C + dcs_B
            tl.store(dla_ptr + b * s_lab + t * s_lat + h,
                     later + tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs, mask=t < L)
            later += tl.sum(dcs, axis=0)
        else:
            _store_state(gout_ptr, G, b, c, h, p, n, P, N, s_sb, s_sc, s_sh, s_sp)
        G = decay * G + tl.dot(tl.trans((dyp.to(tl.float32) * e[:, None]).to(Cb.dtype)), Cb, input_precision=PREC)
    _store_state(dinit_ptr, G, b, 0, h, p, n, P, N, s_fb, 0, s_fh, s_fp)


def _tile(n: int, most: int | None = None) -> int:
    """A power-of-two tile width covering n (at least 16, the smallest tl.dot operand), at most ``most``."""
    width = max(16, triton.next_power_of_2(n))
    return width if most is None else min(most, width)


def _output_tiles(P: int, N: int) -> tuple[int, int]:
    return _tile(P, 64), _tile(N)  # P = 96: two tiles, the second half masked


def _fused_tiles(P: int, N: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BP, BN) of the one-pass kernels: a (BP, all of N) tile of the state, or of its gradient, in registers."""
    BN = _tile(N)
    BP = 32 if dtype.itemsize == 4 and BN > 64 else _tile(P, 64)  # float32 operands double the shared memory
    return BP, BN


@dataclass(frozen=True)
class Dispatch:
    """How the scan chooses its kernels. The default reads the device; a benchmark forces one forward route
    (``forward``: "fused" one-pass or "two_kernel"), and the register report tiles for a target GPU it is not
    running on (``sm_count``), by passing their own instead of patching module state."""

    forward: str = "auto"
    sm_count: int | None = None
    cuda_backward: str | None = None  # "wide", "always" or "never"; None: CUDA_BACKWARD

    def __post_init__(self):
        if self.forward not in FORWARDS:
            raise ValueError(f"forward={self.forward!r}: choose one of {FORWARDS}")
        if self.cuda_backward not in (None, "wide", "always", "never"):
            raise ValueError(f"cuda_backward={self.cuda_backward!r}: choose 'wide', 'always' or 'never'")

    def sms(self, device: torch.device) -> int:
        """Streaming multiprocessors to fill; 1 for the CPU interpreter, where any tiling works."""
        if self.sm_count is not None:
            return self.sm_count
        return indexing.cuda_sm_count(device.index or 0) if device.type == "cuda" else 1

    def fused_forward(self, batch_heads: int, P: int, device: torch.device) -> bool:
        """The one-pass forward reads its inputs once but runs every chunk of a sequence in turn: it wins once
        batch x heads fills the GPU; below that the two-kernel forward spreads the output over all chunks at once."""
        if self.forward != "auto":
            return self.forward == "fused"
        return batch_heads * triton.cdiv(P, 64) >= FUSED_MIN_PROGRAMS_PER_SM * self.sms(device)


AUTO = Dispatch()


def _state_tiles(batch_heads: int, P: int, N: int, device: torch.device, dispatch: Dispatch) -> tuple[int, int]:
    """The carry kernels run one program per state tile through every chunk. A wide tile reads each chunk's
    inputs once; narrower tiles re-read them but put more programs to work when batch x heads is small."""
    BP, BN = _tile(P, 64), _tile(N, 64)
    if batch_heads * triton.cdiv(P, BP) * triton.cdiv(N, BN) < 2 * dispatch.sms(device):
        BP = min(BP, 32)
    return BP, BN


def _snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 snapshots feed bf16 products only; float16's range is too narrow for a state, float32 stays exact
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _padded_seq(seq_idx: torch.Tensor | None, length: int, n_chunks: int) -> torch.Tensor | None:
    """int32 (b, n_chunks*BT): the tail continues the last document, so it never looks like a boundary."""
    if seq_idx is None:
        return None
    pad = n_chunks * BT - length
    seq = seq_idx.to(torch.int32)
    if pad:
        seq = torch.cat([seq, seq[:, -1:].expand(-1, pad)], dim=1)
    return seq.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_states(v, k, cs, seq, init, n_chunks, H, HPG, reverse, dispatch: Dispatch):
    """(the state entering each chunk, final state); reversed: (the gradient of the state leaving each chunk,
    the initial state's gradient), from v = dy and k = C. ``cs``: ``_chunk_cumsum`` of the log-decay."""
    batch, length, _, P = v.shape
    N = k.shape[-1]
    BP, BN = _state_tiles(batch * H, P, N, v.device, dispatch)
    states = torch.empty(batch, n_chunks, H, P, N, device=v.device, dtype=_snapshot_dtype(v.dtype))
    final = torch.empty(batch, H, P, N, device=v.device, dtype=torch.float32)
    init_ = init if init is not None else final
    grid = (triton.cdiv(P, BP), triton.cdiv(N, BN), batch * H)
    _chunk_states_kernel[grid](
        v, k, cs, seq if seq is not None else cs, init_, states, final,
        length, H, HPG, P, N, n_chunks,
        v.stride(0), v.stride(1), v.stride(2), k.stride(0), k.stride(1), k.stride(2), cs.stride(0), cs.stride(1),
        seq.stride(0) if seq is not None else 0,
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        init_.stride(0), init_.stride(1), init_.stride(2), final.stride(0), final.stride(1), final.stride(2),
        REVERSE=reverse, HAS_INIT=init is not None, HAS_SEQ=seq is not None, BT=BT, BP=BP, BN=BN,
        PREC=_precision(v.dtype), **LAUNCH["states_reverse" if reverse else "states"])
    return states, final


def _gate_args(gate, dummy: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """Pointers, strides and flags of the output kernels' skip and gate; ``gate`` is (D, z, z_bias) or None."""
    if gate is None:
        return (dummy, dummy, dummy), (0, 0), dict(GATED=False, HAS_Z_BIAS=False)
    D, z, z_bias = gate
    return ((D, z, z_bias if z_bias is not None else D), (z.stride(0), z.stride(1)),
            dict(GATED=True, HAS_Z_BIAS=z_bias is not None))


def _forward(x, B, C, la, seq, init, keep_states=True, gate=None, dispatch: Dispatch = AUTO):
    """(y, final state, per-chunk state snapshots for the backward). The two-kernel path needs the snapshots
    itself, so ``keep_states=False`` only saves their writes in the fused one (which then returns None). With
    ``gate`` = (D, z (batch, T, H*P), z_bias or None), y is (y + D x) * silu(z + z_bias)."""
    batch, length, H, P = x.shape
    gate_ptrs, gate_strides, gate_flags = _gate_args(gate, la)
    if dispatch.fused_forward(batch * H, P, x.device):
        return _fused_forward(x, B, C, la, seq, init, keep_states, gate_ptrs, gate_strides, gate_flags)
    G, N = B.shape[2], B.shape[3]
    HPG = H // G
    n_chunks = triton.cdiv(length, BT)
    cs = _chunk_cumsum(la, n_chunks)
    states, final = _chunk_states(x, B, cs, seq, init, n_chunks, H, HPG, reverse=False,  # state entering each chunk
                                  dispatch=dispatch)
    y = torch.empty(batch, length, H, P, device=x.device, dtype=x.dtype)
    BP, BN = _output_tiles(P, N)
    grid = (n_chunks, triton.cdiv(P, BP), batch * H)
    _chunk_output_kernel[grid](
        x, B, C, cs, seq if seq is not None else cs, states, y, *gate_ptrs,
        length, H, HPG, P, N,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1),
        C.stride(2), cs.stride(0), cs.stride(1), seq.stride(0) if seq is not None else 0,
        states.stride(0), states.stride(1), states.stride(2), states.stride(3), y.stride(0), y.stride(1), y.stride(2),
        *gate_strides, **gate_flags, HAS_SEQ=seq is not None, BT=BT, BP=BP, BN=BN, PREC=_precision(x.dtype),
        **LAUNCH["output"])
    return y, final, states


def _fused_forward(x, B, C, la, seq, init, keep_states, gate_ptrs, gate_strides, gate_flags):
    batch, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    n_chunks = triton.cdiv(length, BT)
    BP, BN = _fused_tiles(P, N, x.dtype)
    y = torch.empty(batch, length, H, P, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    states = (torch.empty(batch, n_chunks, H, P, N, device=x.device, dtype=_snapshot_dtype(x.dtype))
              if keep_states else final[:, None])
    init_ = init if init is not None else final
    _fused_forward_kernel[(triton.cdiv(P, BP), batch * H)](
        x, B, C, la, seq if seq is not None else la, init_, states, final, y, *gate_ptrs,
        length, H, H // G, P, N, n_chunks,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1),
        C.stride(2), la.stride(0), la.stride(1), seq.stride(0) if seq is not None else 0,
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        init_.stride(0), init_.stride(1), init_.stride(2), final.stride(0), final.stride(1), final.stride(2),
        y.stride(0), y.stride(1), y.stride(2), *gate_strides, **gate_flags,
        HAS_INIT=init is not None, HAS_SEQ=seq is not None, STORE_STATES=keep_states, BT=BT, BP=BP, BN=BN,
        PREC=_precision(x.dtype), num_warps=4, num_stages=3 if BN <= 64 else 2)  # (measured: B8 T4096 H32 D64/D128)
    return y, final, states if keep_states else None


def _sum_over_later_chunks(within: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, n_chunks, BT, H) sums of dcs over the later tokens of the same chunk -> (batch, length, H) sums over
    all later tokens. A chunk's first token holds its total."""
    totals = within[:, :, 0]
    later = totals.flip(1).cumsum(1).flip(1) - totals  # over a few dozen chunks: the token-level scan is not cheap
    return (within + later[:, :, None]).flatten(1, 2)[:, :length]


def _backward(x, B, C, la, seq, states_in, dy, d_final, final, has_init, dispatch: Dispatch = AUTO):
    """Gradients of x, B, C, log_a and the initial state. log_a's comes from the identity
    dcs_t = C_t . dC_t - B_t . dB_t (+ <dS_final, S_final> at the last token) for the gradient of the cumulative
    log-decay, summed over all later tokens: no kernel needs the decay gradients through the states."""
    batch, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    HPG = H // G
    n_chunks = triton.cdiv(length, BT)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # One head per group: its B/C gradients are final, written in the input dtype. Otherwise per head in float32,
    # summed over the group below.
    grad_dtype = x.dtype if HPG == 1 else torch.float32
    dB_h = torch.empty(batch, length, H, N, device=x.device, dtype=grad_dtype)
    dC_h = torch.empty_like(dB_h)
    seq_ = seq if seq is not None else la

    def in_strides(decay):  # decay: log_a for the one-pass kernel, its chunk sums for the per-chunk programs
        return (x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), C.stride(0),
                C.stride(1), C.stride(2), decay.stride(0), decay.stride(1), seq.stride(0) if seq is not None else 0,
                states_in.stride(0), states_in.stride(1), states_in.stride(2), states_in.stride(3),
                dy.stride(0), dy.stride(1), dy.stride(2))
    dx_strides = (dx.stride(0), dx.stride(1), dx.stride(2))
    db_strides = (dB_h.stride(0), dB_h.stride(1), dB_h.stride(2))
    meta = dict(HAS_SEQ=seq is not None, BT=BT, PREC=_precision(x.dtype))

    def reversed_pass(BP, BN, grads_out=None, dla=None):
        """``_fused_backward_kernel``; returns the initial state's gradient."""
        d_init = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
        _fused_backward_kernel[(triton.cdiv(P, BP), batch * H)](
            x, B, C, la, seq_, states_in, d_final if d_final is not None else d_init, dy, dx, dB_h, dC_h,
            dla if dla is not None else d_init, d_init, grads_out if grads_out is not None else d_init,
            length, H, HPG, P, N, n_chunks, *in_strides(la), *dx_strides, *db_strides,
            d_init.stride(0), d_init.stride(1), d_init.stride(2),
            ALL_P=BP >= P, HAS_DFINAL=d_final is not None, BP=BP, BN=BN, **meta, **LAUNCH["fused_backward"])
        return d_init

    fused = dispatch.fused_forward(batch * H, P, x.device)  # the backward pairs with the forward's route
    BP, BN = _fused_tiles(P, N, x.dtype)
    cuda_route = dispatch.cuda_backward or CUDA_BACKWARD
    use_cuda = cuda_route == "always" or (cuda_route == "wide" and BP < P)
    if fused and use_cuda and cuda_backward.supports(x, B, C, dy, states_in, HPG):
        # the single reversed pass below as a CUDA kernel, whose block holds all of the state gradient
        dla = torch.empty(batch, length, H, device=x.device, dtype=torch.float32)
        d_init = cuda_backward.backward(x, B, C, la, seq, states_in, dy, d_final, dx, dB_h, dC_h, dla)
    elif fused and BP >= P:  # everything in one reversed pass per head
        dla = torch.empty(batch, length, H, device=x.device, dtype=torch.float32)
        d_init = reversed_pass(BP, BN, dla=dla)
    else:
        cs = _chunk_cumsum(la, n_chunks)
        if fused:  # dx in one reversed pass per P tile, which leaves the state gradient's snapshots to dB and dC
            grads_out = torch.empty_like(states_in)
            d_init = reversed_pass(BP, BN, grads_out=grads_out)
        else:  # the state gradient's snapshots from their own pass; dx in small programs per chunk too
            grads_out, d_init = _chunk_states(dy, C, cs, seq, d_final, n_chunks, H, HPG, reverse=True,
                                              dispatch=dispatch)
        BP, BN = _tile(P, 64), _tile(N, 64)
        n_dx, n_n = (0 if fused else triton.cdiv(P, BP)), triton.cdiv(N, BN)
        dcs = torch.empty(n_n, batch, n_chunks, BT, H, device=x.device, dtype=torch.float32)
        _chunk_backward_kernel[(n_dx + n_n, n_chunks, batch * H)](
            x, B, C, cs, seq_, states_in, grads_out, dy, dx, dB_h, dC_h, dcs, length, H, HPG, P, N, n_dx,
            *in_strides(cs), *dx_strides, *db_strides, dcs.stride(0), dcs.stride(1), dcs.stride(3), BP=BP, BN=BN,
            FULL_P=_tile(P), FULL_N=_tile(N), **meta, **LAUNCH["backward"])
        dla = _sum_over_later_chunks(dcs.sum(0) if n_n > 1 else dcs[0], length)
    if d_final is not None:  # the final state is exp(cs_last) times the rest
        dla += (d_final * final).sum((-2, -1))[:, None, :]
    # The decay of a token that starts a document with no state coming in multiplies nothing: its gradient is
    # exactly zero, which the sum above reaches only up to rounding.
    if not has_init:
        dla[:, 0] = 0.0
    if seq is not None and length > 1:
        dla[:, 1:].masked_fill_((seq[:, 1:length] != seq[:, :length - 1])[..., None], 0.0)
    if HPG == 1:
        return dx, dB_h, dC_h, dla, d_init
    dB = dB_h.view(batch, length, G, HPG, N).sum(3)
    dC = dC_h.view(batch, length, G, HPG, N).sum(3)
    return dx, dB, dC, dla, d_init


def _chunk_cumsum(log_a: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """float32 (batch, n_chunks * BT, H): log_a summed from the first token of each chunk up to each token (the
    padded tail repeats the last chunk's total). Computed once here for the two-kernel route: inside the carry
    kernels' sequential loops the scan was part of every step (benchmarks/scan_small_batch.py: the B8 T2048 H9
    forward went from 0.074 to 0.069 ms, its backward from 0.144 to 0.125 ms)."""
    batch, length, H = log_a.shape
    log_a = _last_dim_contiguous(log_a)
    cs = torch.empty(batch, n_chunks * BT, H, device=log_a.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(n_chunks, batch)](log_a, cs, length, H, log_a.stride(0), log_a.stride(1), cs.stride(0),
                                            BT=BT, BH=_tile(H))
    return cs


def _kernel_inputs(x, B, C, log_a, initial_state, seq_idx):
    """What the kernels read: x, B, C with unit last stride, contiguous float32 log-decay and initial state, int32
    document ids padded to whole chunks."""
    xc, Bc, Cc = (_last_dim_contiguous(t) for t in (x, B, C))
    la = log_a.to(torch.float32).contiguous()  # contiguous: dlog_a is written with its strides
    seq = _padded_seq(seq_idx, x.shape[1], triton.cdiv(x.shape[1], BT))
    init = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    return xc, Bc, Cc, la, seq, init


class _SSDChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, C, log_a, initial_state, seq_idx, dispatch):
        xc, Bc, Cc, la, seq, init = _kernel_inputs(x, B, C, log_a, initial_state, seq_idx)
        backward_ahead = any(ctx.needs_input_grad[:5])
        y, final, states = _forward(xc, Bc, Cc, la, seq, init, keep_states=backward_ahead, dispatch=dispatch)
        ctx.dispatch = dispatch
        ctx.save_for_backward(xc, Bc, Cc, la, seq, states, final)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        ctx.dtypes = (log_a.dtype, initial_state.dtype if initial_state is not None else None)
        ctx.has_init = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, d_final):
        xc, Bc, Cc, la, seq, states, final = ctx.saved_tensors
        dy = _last_dim_contiguous(dy.to(xc.dtype)) if dy is not None else torch.zeros_like(xc)
        if indexing.span(dy) > indexing.INDEX_LIMIT:  # a view into a larger gradient (of a tensor cut in pieces)
            dy = dy.contiguous()
        d_final = d_final.to(torch.float32).contiguous() if d_final is not None else None
        dx, dB, dC, dla, d_init = _backward(xc, Bc, Cc, la, seq, states, dy, d_final, final, ctx.has_init,
                                            ctx.dispatch)
        la_dtype, init_dtype = ctx.dtypes
        d_init = d_init.to(init_dtype) if ctx.has_init else None
        return dx, dB.to(Bc.dtype), dC.to(Cc.dtype), dla.to(la_dtype), d_init, None, None


def _piece_fits(x, B, C, z, rows: int, tokens: int) -> bool:
    """Whether the kernels can index every tensor of a (rows, tokens) piece of the scan in int32 (its inputs as
    they lie in memory, and what the kernels allocate: y and dx, the per-head dB and dC, the state snapshots), and
    whether their grids' batch x heads and chunk axes stay within CUDA's limit."""
    H, P, N = x.shape[2], x.shape[3], B.shape[3]
    inputs = (x, B, C) if z is None else (x, B, C, z)
    n_chunks = triton.cdiv(tokens, BT)
    made = (rows * tokens * H * max(P, N), rows * n_chunks * H * P * N)
    return (max(indexing.span(t, rows, tokens) for t in inputs) <= indexing.INDEX_LIMIT
            and max(made) <= indexing.INDEX_LIMIT and max(rows * H, n_chunks) <= indexing.GRID_LIMIT)


def _by_pieces(x, B, C, log_a, initial_state, seq_idx, gate, rows: int, tokens: int, dispatch: Dispatch):
    """``ssd_chunk_triton`` piece by piece (``llamba.ops.indexing``): groups of rows apart, spans of tokens in turn,
    each span starting from the state the previous one left (dropped for a row whose document ends there)."""

    def step(rs: slice, ts: slice, state):
        if seq_idx is not None and ts.start > 0 and state is not None:
            state = state * (seq_idx[rs, ts.start] == seq_idx[rs, ts.start - 1]).to(state.dtype)[:, None, None, None]
        piece_gate = None if gate is None else (gate[0], gate[1][rs, ts], gate[2])
        return ssd_chunk_triton(x[rs, ts], B[rs, ts], C[rs, ts], log_a[rs, ts], state,
                                seq_idx[rs, ts] if seq_idx is not None else None, gate=piece_gate, dispatch=dispatch)

    return indexing.by_pieces(*x.shape[:2], rows, tokens,
                              lambda rs: initial_state[rs] if initial_state is not None else None, step)


def ssd_chunk_triton(
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    log_a: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int = 128,
    gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    dispatch: Dispatch = AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same function as ``ssd_chunk``: returns (y like x, final_state (batch, H, P, N) float32). Differentiable in
    x, B, C, log_a and initial_state.

    ``gate`` = (D (H,), z (batch, T, H*P), z_bias (H*P,) or None) makes y the mixer's output before out_proj,
    (y + D x) * silu(z + z_bias), computed by the output kernel. Inference only: it has no backward.
    ``dispatch``: how the kernels are chosen (``Dispatch``; the default reads the device)."""
    batch, length, H, P = x.shape
    G = B.shape[2]
    if H % G:
        raise ValueError(f"value heads ({H}) must be a multiple of query/key groups ({G})")
    if B.shape != C.shape or B.shape[:2] != (batch, length) or log_a.shape != (batch, length, H):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, "
                         f"log_a {tuple(log_a.shape)}")
    if x.dtype == torch.float64:
        raise ValueError("ssd_chunk_triton runs float16/bfloat16/float32; use ssd_chunk for float64")
    if length == 0:
        state = torch.zeros(batch, H, P, B.shape[-1], device=x.device, dtype=state_dtype(x.dtype))
        return x.clone(), state if initial_state is None else state + initial_state.float()
    B, C = B.to(x.dtype), C.to(x.dtype)
    z = gate[1] if gate is not None else None
    rows, tokens = indexing.piece_sizes(batch, length, functools.partial(_piece_fits, x, B, C, z), BT)
    if (rows, tokens) != (batch, length):
        return _by_pieces(x, B, C, log_a, initial_state, seq_idx, gate, rows, tokens, dispatch)
    if gate is None:
        return _SSDChunk.apply(x, B, C, log_a, initial_state, seq_idx, dispatch)
    D, z, z_bias = gate
    if needs_grad(x, B, C, log_a, initial_state, *gate):
        raise ValueError("the fused skip and gate have no backward: apply them outside ssd_chunk_triton to train")
    if z.shape != (batch, length, H * P) or D.shape != (H,) or (z_bias is not None and z_bias.shape != (H * P,)):
        raise ValueError(f"gate shapes: D {tuple(D.shape)}, z {tuple(z.shape)}, z_bias "
                         f"{None if z_bias is None else tuple(z_bias.shape)}; want ({H},), {(batch, length, H * P)}, "
                         f"({H * P},)")
    xc, Bc, Cc, la, seq, init = _kernel_inputs(x, B, C, log_a, initial_state, seq_idx)
    gate = (D.contiguous(), _last_dim_contiguous(z), z_bias.contiguous() if z_bias is not None else None)
    y, final, _ = _forward(xc, Bc, Cc, la, seq, init, keep_states=False, gate=gate, dispatch=dispatch)
    return y, final
