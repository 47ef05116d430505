"""Port of cuda_backward.cu's ssd_backward in float64 (no bf16 rounding), warp by warp: every warp_mma call with the
kernel's buffers, flags and offsets (warp_mma itself was checked against ldmatrix/mma fragments in
emulate_warp_mma.py), the epilogues with the kernel's acc_row/acc_col lane mapping, the warp scans. Compared with
the float64 token loop's gradients."""
import numpy as np
import torch
import torch.nn.functional as F
from llamba.ops.ssd import ssd_loop

BT = 64

def tile(MT, NT, K, AK, BK, a, m0, b, n0, k_scale=None):
    """what warp_mma adds: A (M, K) from a ([m][k] if AK else [k][m]), B (K, N) from b ([n][k] if BK else [k][n])"""
    A = a[m0:m0 + MT * 16, :K] if AK else a[:K, m0:m0 + MT * 16].T
    if k_scale is not None:
        A = A * k_scale[None, :K]
    Bm = b[n0:n0 + NT * 8, :K].T if BK else b[:K, n0:n0 + NT * 8]
    return A @ Bm

def lanes():  # (lane, r) -> (row offset, col offset) inside an (16, 8) mma tile, as acc_row / acc_col
    for lane in range(32):
        for r in range(4):
            yield (lane >> 2) + 8 * (r >> 1), 2 * (lane & 3) + (r & 1), lane, r

def run(x, B, C, la, seq, S, dy, d_final, P, N):
    """one (batch row, head); x, dy (L, P), B, C (L, N), la (L,), seq (L padded) or None, S (chunks, P, N)"""
    L = x.shape[0]
    n_chunks = -(-L // BT)
    pad = lambda t: np.concatenate([t, np.zeros((n_chunks * BT - L,) + t.shape[1:])])
    x, B, C, dy, la = map(pad, (x, B, C, dy, la))
    dx = np.zeros_like(x); dB = np.zeros_like(B); dC = np.zeros_like(C); dla = np.zeros(n_chunks * BT)
    GM, GN, TW_P, TW_N = P // 64, N // 16, P // 32, N // 32
    # G held per warp as accumulators; here one dense (P, N) array written/read through the warps' tiles
    G = d_final.copy() if d_final is not None else np.zeros((P, N))
    sG = G.copy()
    later = 0.0
    for i in range(n_chunks):
        c = n_chunks - 1 - i; t0 = c * BT
        sX, sDY, sB, sC = x[t0:t0 + BT], dy[t0:t0 + BT], B[t0:t0 + BT], C[t0:t0 + BT]
        sS = S[c]
        # warp 0: decays (lane holds tokens 2*lane, 2*lane+1)
        a = la[t0:t0 + BT]
        pair = a[0::2] + a[1::2]
        run_ = np.cumsum(pair)            # inclusive scan over lanes
        cs = np.empty(BT); cs[1::2] = run_; cs[0::2] = run_ - a[1::2]
        last = run_[-1]
        if seq is not None:
            q = seq[t0:t0 + BT]; q_last = seq[t0 + BT - 1]; q_prev = seq[max(t0 - 1, 0)]
            start, end = q == q_prev, q == q_last
            carry = q_last == q_prev
        else:
            start = end = np.ones(BT, bool); carry = True
        e = np.where(start, np.exp(cs), 0.0); w = np.where(end, np.exp(last - cs), 0.0)
        dcs = np.zeros(BT)
        decay = np.exp(cs[BT - 1]) if carry else 0.0
        # scores, per warp
        sA = np.zeros((BT, BT)); sR = np.zeros((BT, BT))
        for warp in range(8):
            sm0, sn0 = (warp & 3) * 16, (warp >> 2) * 32
            accA = tile(1, 4, N, True, True, sC, sm0, sB, sn0)
            accR = tile(1, 4, P, True, True, sDY, sm0, sX, sn0)
            for nj in range(4):
                for hh in range(2):
                    for lane in range(32):
                        t = sm0 + (lane >> 2) + 8 * hh
                        s = sn0 + nj * 8 + 2 * (lane & 3)
                        for j in range(2):
                            keep = s + j <= t and (seq is None or seq[t0 + s + j] == seq[t0 + t])
                            m = np.exp(cs[t] - cs[s + j]) if keep else 0.0
                            sA[t, s + j] = accA[t - sm0, s + j - sn0] * m
                            sR[t, s + j] = accR[t - sm0, s + j - sn0] * m
        dcs_rows = np.zeros(BT)
        for warp in range(8):
            tm0 = (warp & 1) * 32
            n0 = (warp >> 1) * (P // 4)
            acc = tile(2, TW_P, N, True, True, sB, tm0, sG, n0)
            acc = acc * w[tm0:tm0 + 32, None]
            acc = acc + tile(2, TW_P, BT, False, False, sA, tm0, sDY, n0)
            dx[t0 + tm0:t0 + tm0 + 32, n0:n0 + TW_P * 8] = acc
            n0 = (warp >> 1) * (N // 4)
            acc = tile(2, TW_N, P, True, False, sDY, tm0, sS, n0)
            acc = acc * e[tm0:tm0 + 32, None]
            acc = acc + tile(2, TW_N, BT, True, False, sR, tm0, sB, n0)
            dC[t0 + tm0:t0 + tm0 + 32, n0:n0 + TW_N * 8] = acc
            dcs_rows[tm0:tm0 + 32] += (sC[tm0:tm0 + 32, n0:n0 + TW_N * 8] * acc).sum(1)
            acc = tile(2, TW_N, P, True, False, sX, tm0, sG, n0)
            acc = acc * w[tm0:tm0 + 32, None]
            acc = acc + tile(2, TW_N, BT, False, False, sR, tm0, sC, n0)
            dB[t0 + tm0:t0 + tm0 + 32, n0:n0 + TW_N * 8] = acc
            dcs_rows[tm0:tm0 + 32] -= (sB[tm0:tm0 + 32, n0:n0 + TW_N * 8] * acc).sum(1)
        dcs += dcs_rows
        Gn = G * decay
        for warp in range(8):
            gm0, gn0 = (warp & 3) * (P // 4), (warp >> 2) * (N // 2)
            Gn[gm0:gm0 + GM * 16, gn0:gn0 + GN * 8] += tile(GM, GN, BT, False, False, sDY, gm0, sC, gn0, e)
        G = Gn; sG = G.copy()
        # warp 0: dla
        d0, d1 = dcs[0::2], dcs[1::2]
        run_ = np.cumsum(d0 + d1); total = run_[-1]
        after1 = total - run_; after0 = after1 + d1
        dla[t0:t0 + BT:2] = later + after0 + d0
        dla[t0 + 1:t0 + BT:2] = later + after1 + d1
        later += total
    return dx[:L], dB[:L], dC[:L], dla[:L], G

def check(L, P, N, with_seq, with_dfinal, with_init):
    torch.manual_seed(L + P + N)
    b, H = 1, 1
    x = torch.randn(b, L, H, P, dtype=torch.float64, requires_grad=True)
    B = (torch.randn(b, L, H, N, dtype=torch.float64) / N ** 0.5).requires_grad_()
    C = (torch.randn(b, L, H, N, dtype=torch.float64) / N ** 0.5).requires_grad_()
    la = (-F.softplus(torch.randn(b, L, H, dtype=torch.float64))).requires_grad_()
    s0 = torch.randn(b, H, P, N, dtype=torch.float64, requires_grad=True) if with_init else None
    seq = torch.cumsum((torch.rand(b, L) < 0.03).long(), 1) if with_seq else None
    y, s = ssd_loop(x, B, C, la, initial_state=s0, seq_idx=seq)
    dy, ds = torch.randn_like(y), torch.randn_like(s) * with_dfinal
    ((y * dy).sum() + (s * ds).sum()).backward()
    # the forward's snapshots: state entering each chunk
    n_chunks = -(-L // BT)
    S = np.zeros((n_chunks, P, N))
    with torch.no_grad():
        for c in range(n_chunks):
            if c == 0:
                S[c] = s0[0, 0].numpy() if with_init else 0
            else:
                _, sc = ssd_loop(x[:, :c * BT], B[:, :c * BT], C[:, :c * BT], la[:, :c * BT], initial_state=s0,
                                 seq_idx=seq[:, :c * BT] if seq is not None else None)
                S[c] = sc[0, 0].numpy()
    seq_np = None
    if seq is not None:
        q = seq[0].numpy(); seq_np = np.concatenate([q, np.full(n_chunks * BT - L, q[-1])])
    f = lambda t: t.detach()[0, :, 0].numpy()
    dx, dB, dC, dla, d_init = run(f(x), f(B), f(C), la.detach()[0, :, 0].numpy(), seq_np, S, f(dy),
                                  ds[0, 0].numpy() if with_dfinal else None, P, N)
    # the host's terms after the kernel (triton_chunk._backward)
    if with_dfinal:
        dla = dla + (ds[0, 0] * s.detach()[0, 0]).sum().item()
    if not with_init:
        dla[0] = 0.0
    if seq is not None:
        q = seq[0].numpy(); dla[1:][q[1:] != q[:-1]] = 0.0
    errs = {name: np.abs(got - want).max() / max(np.abs(want).max(), 1e-30) for name, got, want in
            [("dx", dx, x.grad[0, :, 0].numpy()), ("dB", dB, B.grad[0, :, 0].numpy()),
             ("dC", dC, C.grad[0, :, 0].numpy()), ("dla", dla, la.grad[0, :, 0].numpy())]
            + ([("d_init", d_init, s0.grad[0, 0].numpy())] if with_init else [])}
    print(L, P, N, with_seq, with_dfinal, with_init, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-9

check(130, 128, 128, True, True, True)
check(200, 128, 64, False, False, False)
check(64, 64, 64, True, False, True)
check(1, 128, 128, False, True, True)
