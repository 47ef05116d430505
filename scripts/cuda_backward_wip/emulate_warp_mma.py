"""Emulates cuda_backward.cu's warp_mma (its ldmatrix address formulas, literally) with ldmatrix and mma.sync as the
PTX ISA defines their fragments, and checks it computes A @ B for all four storage orders."""
import numpy as np

def ldmatrix_x4(mem, addr, trans):
    """addr[lane] = (row, col) in mem of the 8-element row that lane supplies. Returns regs[lane][i] = 2 elements."""
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        rows = [addr[8 * i + r] for r in range(8)]  # matrix i: row r starts at rows[r]
        mat = np.array([[mem[rr, cc + j] for j in range(8)] for rr, cc in rows])
        if trans:
            mat = mat.T
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            regs[lane, i] = mat[g, 2 * t: 2 * t + 2]
    return regs

def mma(acc, a, b0, b1):
    """acc[lane][4] += A(16x16) B(16x8) from per-lane fragments."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2*t:2*t+2] = a[lane, 0]; A[g+8, 2*t:2*t+2] = a[lane, 1]
        A[g, 2*t+8:2*t+10] = a[lane, 2]; A[g+8, 2*t+8:2*t+10] = a[lane, 3]
        B[2*t:2*t+2, g] = b0[lane]; B[2*t+8:2*t+10, g] = b1[lane]
    D = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        acc[lane] += [D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]]

def warp_mma(MT, NT, K, A_KMAJOR, B_KMAJOR, a, m0, b, n0, k_scale=None):
    acc = np.zeros((MT, NT, 32, 4))
    for k0 in range(0, K, 16):
        af = []
        for mi in range(MT):
            m = m0 + mi * 16
            addr = []
            for lane in range(32):
                quad, row8 = lane >> 3, lane & 7
                if A_KMAJOR:
                    addr.append((m + (lane & 15), k0 + (lane >> 4) * 8))
                else:
                    addr.append((k0 + (quad >> 1) * 8 + row8, m + (quad & 1) * 8))
            r = ldmatrix_x4(a, addr, not A_KMAJOR)
            if k_scale is not None:
                for lane in range(32):
                    k = k0 + (lane & 3) * 2
                    for q in range(4):
                        kk = k + (q >> 1) * 8
                        r[lane, q] *= [k_scale[kk], k_scale[kk + 1]]
            af.append(r)
        for nj in range(0, NT, 2):
            n = n0 + nj * 8
            addr = []
            for lane in range(32):
                quad, row8 = lane >> 3, lane & 7
                if B_KMAJOR:
                    addr.append((n + (quad >> 1) * 8 + row8, k0 + (quad & 1) * 8))
                else:
                    addr.append((k0 + (quad & 1) * 8 + row8, n + (quad >> 1) * 8))
            bf = ldmatrix_x4(b, addr, not B_KMAJOR)
            for mi in range(MT):
                mma(acc[mi, nj], af[mi], bf[:, 0], bf[:, 1])
                mma(acc[mi, nj + 1], af[mi], bf[:, 2], bf[:, 3])
    # gather into a dense tile with acc_row / acc_col
    out = np.full((MT * 16, NT * 8), np.nan)
    for mi in range(MT):
        for nj in range(NT):
            for lane in range(32):
                for r in range(4):
                    row = mi * 16 + (lane >> 2) + 8 * (r >> 1)
                    col = nj * 8 + 2 * (lane & 3) + (r & 1)
                    out[row, col] = acc[mi, nj, lane, r]
    return out

rng = np.random.default_rng(0)
M, N, K, m0, n0 = 64, 64, 48, 16, 24
A = rng.standard_normal((M, K)); Bm = rng.standard_normal((K, N)); s = rng.standard_normal(K)
for ak in (True, False):
    for bk in (True, False):
        a_store = A if ak else A.T.copy()      # [m][k] or [k][m]
        b_store = Bm.T.copy() if bk else Bm    # [n][k] or [k][n]
        for scale in (None, s):
            got = warp_mma(2, 4, K, ak, bk, a_store, m0, b_store, n0, scale)
            As = A * (1 if scale is None else s[None, :])
            want = As[m0:m0 + 32] @ Bm[:, n0:n0 + 32]
            print(ak, bk, scale is not None, np.abs(got - want).max())
