// The scan's backward in one reversed pass per (batch row, head), the whole state gradient G (P x N, float32) held
// by one block: llamba/ops/ssd/cuda_backward.py compiles this with NVRTC and launches it.
//
// Why CUDA: at head dim and d_state 128, G is 64 KiB of float32. Triton keeps a loop's carried values in registers,
// and every build that held all of G spilled (docs/kernels.md), so its backward splits G over two programs and
// sends snapshots of it to per-chunk programs for dB and dC: 256 KiB of memory traffic per chunk and head. Here G's
// float32 master stays in the block's registers (as mma accumulators), its bf16 copy for the products in shared
// memory, and each chunk moves only what it must: x, dy, B, C, the forward's state snapshot in, dx, dB, dC out
// (144 KiB). The math is the ALL_P branch of _fused_backward_kernel in triton_chunk.py, product for product, with the
// same roundings (operands in bf16, accumulators and the decays in float32):
//
//     A = (C B^T) * M,  R = (dy x^T) * M              M_ts = exp(cs_t - cs_s), s <= t, same document
//     dx = A^T dy + w (B G^T)
//     dC = R B + e (dy S_in)        dB = R^T C + w (x G)        dcs_t = C_t . dC_t - B_t . dB_t
//     G <- decay G + (e dy)^T C     (the gradient of the state entering the chunk)
//
// Products are warp-level mma.sync m16n8k16 (bf16 in, float32 accumulate) with operands loaded by ldmatrix, a k step
// ahead, from padded shared-memory rows (8 extra bf16 per row: conflict-free); each chunk's inputs are copied in
// while the chunk before it runs. The block is latency-bound (one block per SM, 2 warps per scheduler), so its time
// follows the instructions it issues: shared memory is addressed through 32-bit offsets from one base, a thread's
// copy offsets are computed once for the whole pass, and at d_state 128 on Hopper the copies are bulk copies of
// whole rows (docs/kernels.md has the measurements). No CUDA headers are needed: bf16 values are handled as raw
// 16-bit patterns.

typedef unsigned short bf16_t;
typedef unsigned int u32;

constexpr int BT = 64;        // tokens per chunk
constexpr int LDT = BT + 8;   // padded row of the (BT, BT) score tiles

__device__ __forceinline__ float bf16_to_float(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 address, bool trans) {
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void copy16_async(u32 dst, const bf16_t* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src));
}

__device__ __forceinline__ void copy16_async_or_zeros(u32 dst, const bf16_t* src, bool valid) {
    // src-size 0 fills the 16 bytes with zeros: rows past the sequence's end read as zeros, as in the Triton kernels
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Hopper's bulk copies (TMA engine, 1D): one thread copies a whole row, completion counted in bytes on an mbarrier
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_bytes(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n\t.reg .pred done;\n\tWAIT:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
                 "@!done bra WAIT;\n\t}" :: "r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ void copy_bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// A warp's (MT*16, NT*8) tile of acc += A B over K. A is (M, K): stored [m][k] (A_KMAJOR) or [k][m], rows LDA
// elements apart from shared address a; B is (K, N): stored [n][k] (B_KMAJOR) or [k][n], rows LDB apart from b.
// With a k_scale, A's column k is multiplied by k_scale[k] in registers first (rounded to bf16 again, as the Triton
// kernel rounds e * dy). Each lane's addresses are computed once: every fragment's is that plus a compile-time
// offset.
template <int MT, int NT, int K, bool A_KMAJOR, int LDA, bool B_KMAJOR, int LDB>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], u32 a, int m0, u32 b, int n0,
                                         const float* k_scale = nullptr) {
    static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
    const int lane = threadIdx.x & 31, quad = lane >> 3, row8 = lane & 7;
    const u32 a_lane = a + 2 * (A_KMAJOR ? (m0 + (lane & 15)) * LDA + (lane >> 4) * 8
                                         : ((quad >> 1) * 8 + row8) * LDA + m0 + (quad & 1) * 8);
    const u32 b_lane = b + 2 * (B_KMAJOR ? (n0 + (quad >> 1) * 8 + row8) * LDB + (quad & 1) * 8
                                         : ((quad & 1) * 8 + row8) * LDB + n0 + (quad >> 1) * 8);
    // Fragments are loaded a k step ahead: ldmatrix's latency overlaps the previous step's products
    u32 af[2][MT][4], bf[2][NT / 2][4];
    auto load = [&](int k0, int s) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            ldmatrix_x4(af[s][mi], a_lane + 2 * (A_KMAJOR ? mi * 16 * LDA + k0 : k0 * LDA + mi * 16), !A_KMAJOR);
            if (k_scale != nullptr) {
                const int k = k0 + (lane & 3) * 2;  // registers 0, 1 hold columns k, k+1; registers 2, 3: k+8, k+9
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int kk = k + (r >> 1) * 8;
                    const u32 v = af[s][mi][r];
                    af[s][mi][r] = pack_bf16x2(bf16_to_float(v & 0xffff) * k_scale[kk],
                                               bf16_to_float(v >> 16) * k_scale[kk + 1]);
                }
            }
        }
#pragma unroll
        for (int nj = 0; nj < NT; nj += 2)
            ldmatrix_x4(bf[s][nj / 2], b_lane + 2 * (B_KMAJOR ? nj * 8 * LDB + k0 : k0 * LDB + nj * 8), !B_KMAJOR);
    };
    load(0, 0);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
        const int s = (k0 / 16) & 1;
        if (k0 + 16 < K) load(k0 + 16, s ^ 1);
#pragma unroll
        for (int nj = 0; nj < NT; nj += 2)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
                mma_bf16(acc[mi][nj], af[s][mi], bf[s][nj / 2][0], bf[s][nj / 2][1]);
                mma_bf16(acc[mi][nj + 1], af[s][mi], bf[s][nj / 2][2], bf[s][nj / 2][3]);
            }
    }
}

// Where element r of acc[mi][nj] sits in the warp's tile: row m0 + mi*16 + (lane>>2) + 8*(r>>1), column
// n0 + nj*8 + 2*(lane&3) + (r&1).
__device__ __forceinline__ int acc_row(int m0, int mi, int r) { return m0 + mi * 16 + ((threadIdx.x & 31) >> 2) + 8 * (r >> 1); }
__device__ __forceinline__ int acc_col(int n0, int nj) { return n0 + nj * 8 + 2 * (threadIdx.x & 3); }

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int nj = 0; nj < NT; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.0f;
}

template <int MT, int NT>
__device__ __forceinline__ void scale_rows(float (&acc)[MT][NT][4], const float* s, int m0) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int nj = 0; nj < NT; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][nj][r] *= s[acc_row(m0, mi, r)];
}

// Stores a (64, W) token tile from its accumulators as bf16 (rows past the sequence's end are dropped). With a
// ref (the (64, W) bf16 tile of C or B in shared memory), adds sign * sum_col(acc * ref) per row into dcs.
template <int MT, int NT, bool DCS>
__device__ __forceinline__ void store_tokens(const float (&acc)[MT][NT][4], bf16_t* out, long long s_t, int t0,
                                             int L, int m0, int n0, const bf16_t* ref, int ld_ref, float sign,
                                             float (&dcs)[MT][2]) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int nj = 0; nj < NT; ++nj)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = acc_row(m0, mi, 2 * h), col = acc_col(n0, nj);
                const float v0 = acc[mi][nj][2 * h], v1 = acc[mi][nj][2 * h + 1];
                if (DCS) {
                    const u32 rv = *reinterpret_cast<const u32*>(ref + row * ld_ref + col);
                    dcs[mi][h] += sign * (bf16_to_float(rv & 0xffff) * v0 + bf16_to_float(rv >> 16) * v1);
                }
                if (t0 + row < L)
                    *reinterpret_cast<u32*>(out + (long long)(t0 + row) * s_t + col) = pack_bf16x2(v0, v1);
            }
}

// The cp.async copies of a (ROWS, W) bf16 tile into shared memory (rows LD elements apart) from rows `stride`
// elements apart, 16 bytes a copy, spread over THREADS threads. A thread copies the same rows and column of every
// chunk, so its offsets are computed once, here; a chunk's copy then costs a few adds per 16 bytes.
template <int ROWS, int W, int LD, int THREADS>
struct TileCopy {
    static constexpr int VECS = W / 8, ROW_STEP = THREADS / VECS, COPIES = ROWS * VECS / THREADS;
    static_assert(THREADS % VECS == 0 && COPIES * THREADS == ROWS * VECS, "whole rows, every thread the same count");
    int row, src_offset, src_step;  // the thread's first row; its source offset and the step between its copies
    u32 dst_offset;                 // bytes

    __device__ __forceinline__ explicit TileCopy(int stride)
        : row(threadIdx.x / VECS), src_offset(row * stride + threadIdx.x % VECS * 8), src_step(ROW_STEP * stride),
          dst_offset(2 * (row * LD + threadIdx.x % VECS * 8)) {}

    // dst: the tile's shared address; src: its first row; rows at or past valid_rows are filled with zeros
    __device__ __forceinline__ void operator()(u32 dst, const bf16_t* src, int valid_rows = ROWS) const {
        if (valid_rows >= ROWS) {  // every chunk but a sequence's ragged last one
#pragma unroll
            for (int k = 0; k < COPIES; ++k)
                copy16_async(dst + dst_offset + 2 * k * ROW_STEP * LD, src + src_offset + k * src_step);
        } else {
#pragma unroll
            for (int k = 0; k < COPIES; ++k) {
                const bool ok = row + k * ROW_STEP < valid_rows;
                copy16_async_or_zeros(dst + dst_offset + 2 * k * ROW_STEP * LD,
                                      ok ? src + src_offset + k * src_step : src, ok);
            }
        }
    }
};

// The inclusive sum over a warp of each lane's value
__device__ __forceinline__ float warp_inclusive_sum(float v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float up = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += up;
    }
    return v;
}

// Strides are in elements. dB and dC share their strides, la and dla theirs; S is (batch, chunks, H, P, N), d_final
// and d_init are contiguous (batch, H, P, N), seq (batch, chunks * 64) when HAS_SEQ.
template <int P, int N, bool HAS_SEQ, bool HAS_DFINAL, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1) ssd_backward(
    const bf16_t* x_, const bf16_t* B_, const bf16_t* C_, const bf16_t* dy_, const bf16_t* S_, const float* la_,
    const float* d_final, const int* seq_, bf16_t* dx_, bf16_t* dB_, bf16_t* dC_, float* dla_, float* d_init,
    int L, int H, int HPG, int n_chunks,
    int s_xb, int s_xt, int s_xh, int s_bb, int s_bt, int s_bh, int s_cb, int s_ct, int s_ch,
    int s_dyb, int s_dyt, int s_dyh, int s_dxb, int s_dxt, int s_dxh, int s_dbb, int s_dbt, int s_dbh,
    int s_lab, int s_lat, int s_sqb, int s_sb, int s_sc, int s_sh, int s_sp) {
    static_assert(WARPS == 8 || WARPS == 16, "8 or 16 warps");
    constexpr int THREADS = WARPS * 32, LDP = P + 8, LDN = N + 8;
    // Warp tiles. Token tiles (64, W): TM x 4 warps of (64/TM, W/4). Scores (64, 64): 4 x (WARPS/4) warps of
    // (16, 64/(WARPS/4)). The state gradient (P, N): 4 x (WARPS/4) warps of (P/4, N/(WARPS/4)).
    constexpr int TM = WARPS / 4, T_MT = 64 / TM / 16, TW_P = P / 32, TW_N = N / 32;
    constexpr int S_NT = 64 / (WARPS / 4) / 8, GM = P / 64, GN = N / (WARPS / 4) / 8;

    // Shared memory, as byte offsets: two slots of the chunk's inputs {x (64, P), dy (64, P), B (64, N), C (64, N)}
    // that the copies alternate between; the state entering the chunk and the bf16 copy of G (P, N); the score
    // tiles A = (C B^T) * M and R = (dy x^T) * M (64, 64); then float32 rows of 64 (cs, e, w, dcs) and seq.
    constexpr u32 OFF_DY = 2 * BT * LDP, OFF_B = 2 * OFF_DY, OFF_C = OFF_B + 2 * BT * LDN, SLOT = OFF_C + 2 * BT * LDN;
    constexpr u32 OFF_S = 2 * SLOT, OFF_G = OFF_S + 2 * P * LDN, OFF_A = OFF_G + 2 * P * LDN;
    constexpr u32 OFF_R = OFF_A + 2 * BT * LDT, OFF_ROWS = OFF_R + 2 * BT * LDT;
    extern __shared__ __align__(16) unsigned char smem[];
    const u32 smem0 = shared_address(smem);  // ldmatrix and cp.async take 32-bit shared addresses
    float* cs = reinterpret_cast<float*>(smem + OFF_ROWS);
    float* e = cs + BT;
    float* w = e + BT;
    float* dcs = w + BT;
    int* seq = reinterpret_cast<int*>(dcs + BT);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / HPG;
    const bf16_t* x = x_ + (long long)b * s_xb + h * s_xh;
    const bf16_t* Bg = B_ + (long long)b * s_bb + g * s_bh;
    const bf16_t* Cg = C_ + (long long)b * s_cb + g * s_ch;
    const bf16_t* dy = dy_ + (long long)b * s_dyb + h * s_dyh;
    const bf16_t* S = S_ + (long long)b * s_sb + h * s_sh;
    const float* la = la_ + (long long)b * s_lab + h;
    bf16_t* dx = dx_ + (long long)b * s_dxb + h * s_dxh;
    bf16_t* dB = dB_ + (long long)b * s_dbb + h * s_dbh;
    bf16_t* dC = dC_ + (long long)b * s_dbb + h * s_dbh;
    float* dla = dla_ + (long long)b * s_lab + h;

    const int tm0 = (warp % TM) * (64 / TM), tw = warp / TM;             // token tiles: rows, column quarter
    const int sm0 = (warp & 3) * 16, sn0 = (warp >> 2) * (64 / (WARPS / 4));  // scores
    const int gm0 = (warp & 3) * (P / 4), gn0 = (warp >> 2) * (N / (WARPS / 4));  // G

    // How a chunk's inputs reach shared memory, each way where it measured faster (docs/kernels.md). At d_state 128
    // on Hopper every row is 256 bytes and goes as one bulk copy, counted in bytes on an mbarrier per buffer: thread
    // tid < 4 * BT copies row tid % BT of tile tid / BT (x, dy, B, C) of every chunk, thread tid < P row tid of every
    // state snapshot, and one thread waits. Elsewhere (d_state 64: B's, C's and the snapshot's 128-byte rows were
    // slower as bulk requests) every thread cp.asyncs the same 16-byte pieces of every chunk.
    constexpr bool BULK = N == 128 && __CUDA_ARCH__ >= 900;
    __shared__ __align__(8) unsigned long long bars[3];  // the two token slots', the snapshot's (BULK)
    const u32 bar0 = shared_address(&bars[0]), bar_S = shared_address(&bars[2]);
    if (BULK && tid == 0) {
        mbar_init(bar0, 1);
        mbar_init(bar0 + 8, 1);
        mbar_init(bar_S, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int tile = tid / BT, trow = tid % BT;  // BULK: the row this thread copies
    const int t_stride = tile == 0 ? s_xt : tile == 1 ? s_dyt : tile == 2 ? s_bt : s_ct;
    const bf16_t* t_src = (tile == 0 ? x : tile == 1 ? dy : tile == 2 ? Bg : Cg) + (long long)trow * t_stride;
    const u32 t_bytes = tile < 2 ? 2 * P : 2 * N;
    const u32 t_dst = (tile == 0 ? 0u : tile == 1 ? OFF_DY : tile == 2 ? OFF_B : OFF_C) +
                      2 * trow * (tile < 2 ? LDP : LDN);
    const bf16_t* s_src = S + (long long)tid * s_sp;
    const TileCopy<BT, P, LDP, THREADS> copy_x(s_xt), copy_dy(s_dyt);  // !BULK
    const TileCopy<BT, N, LDN, THREADS> copy_B(s_bt), copy_C(s_ct);
    const TileCopy<P, N, LDN, THREADS> copy_S(s_sp);

    auto load_tokens = [&](int c, int slot) {
        const int t0 = c * BT, rows = min(BT, L - t0);
        if constexpr (BULK) {
            const u32 bar = bar0 + 8 * slot, dst = smem0 + slot * SLOT + t_dst;
            if (tid == 0) mbar_expect_bytes(bar, rows * (4 * P + 4 * N));
            if (tile < 4) {
                if (trow < rows) {
                    copy_bulk(dst, t_src + (long long)t0 * t_stride, t_bytes, bar);
                } else {  // past the sequence's end: zeros, ordered before any later bulk copy into the slot
                    for (u32 o = 0; o < t_bytes; o += 16)
                        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" :: "r"(dst + o), "r"(0) : "memory");
                    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                }
            }
        } else {
            const u32 s = smem0 + slot * SLOT;
            copy_x(s, x + (long long)t0 * s_xt, rows);
            copy_dy(s + OFF_DY, dy + (long long)t0 * s_dyt, rows);
            copy_B(s + OFF_B, Bg + (long long)t0 * s_bt, rows);
            copy_C(s + OFF_C, Cg + (long long)t0 * s_ct, rows);
            async_commit();
        }
    };
    auto load_state = [&](int c) {
        if constexpr (BULK) {
            if (tid == 0) mbar_expect_bytes(bar_S, P * 2 * N);
            if (tid < P) copy_bulk(smem0 + OFF_S + 2 * tid * LDN, s_src + (long long)c * s_sc, 2 * N, bar_S);
        } else {
            copy_S(smem0 + OFF_S, S + (long long)c * s_sc);
            async_commit();
        }
    };
    // The inputs of step i, loaded during step i - 1 (or before the loop), in place for every thread after the
    // barrier that follows: the mbarriers' phases flip with each use, every other step for a token slot
    auto wait_inputs = [&](int i) {
        if constexpr (BULK) {
            if (tid == 32) {  // warp 1: warp 0 is scanning the log-decay meanwhile
                mbar_wait(bar0 + 8 * (i & 1), (i >> 1) & 1);
                mbar_wait(bar_S, i & 1);
            }
        } else {
            async_wait_all();
        }
    };

    // G, the gradient of the state leaving the current chunk (float32), as each thread holds it: element r of
    // G[mi][nj] is row g_row(mi, r), column g_col(nj) + (r & 1) of the (P, N) matrix
    float G[GM][GN][4];
    auto g_row = [&](int mi, int r) { return acc_row(gm0, mi, r); };
    auto g_col = [&](int nj) { return acc_col(gn0, nj); };
    const long long g_base = ((long long)b * H + h) * P * N;  // this head's (P, N) in d_final and d_init
#pragma unroll
    for (int mi = 0; mi < GM; ++mi)
#pragma unroll
        for (int nj = 0; nj < GN; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                G[mi][nj][r] = HAS_DFINAL ? d_final[g_base + g_row(mi, r) * N + g_col(nj) + (r & 1)] : 0.0f;
    auto store_G_bf16 = [&]() {
#pragma unroll
        for (int mi = 0; mi < GM; ++mi)
#pragma unroll
            for (int nj = 0; nj < GN; ++nj)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
                    *reinterpret_cast<u32*>(smem + OFF_G + 2 * (g_row(mi, 2 * hh) * LDN + g_col(nj))) =
                        pack_bf16x2(G[mi][nj][2 * hh], G[mi][nj][2 * hh + 1]);
    };
    store_G_bf16();
    if (tid < BT) dcs[tid] = 0.0f;  // from here on the warp that reads dcs zeroes it for the next chunk
    load_tokens(n_chunks - 1, 0);
    load_state(n_chunks - 1);

    // Two warps have one more job each, beside their share of the products. Warp 0 holds the log-decay of the chunk
    // to come (tokens 2*lane, 2*lane+1), loaded a chunk ahead so that no step waits for a global load before its
    // first barrier, and scans it. The last warp turns dcs into dlog_a at the chunk's end, while warp 0 scans.
    constexpr int DLA_WARP = WARPS - 1;
    auto load_la = [&](int c, float& a0, float& a1) {
        const int t = c * BT + 2 * lane;
        a0 = t < L ? la[(long long)t * s_lat] : 0.0f;
        a1 = t + 1 < L ? la[(long long)(t + 1) * s_lat] : 0.0f;
    };
    float la0 = 0.0f, la1 = 0.0f;
    if (warp == 0) load_la(n_chunks - 1, la0, la1);
    float later = 0.0f;  // (DLA_WARP) dcs summed over the tokens of the chunks done so far
    for (int i = 0; i < n_chunks; ++i) {
        const int c = n_chunks - 1 - i, t0 = c * BT;
        const u32 sX = smem0 + (i & 1) * SLOT, sDY = sX + OFF_DY, sB = sX + OFF_B, sC = sX + OFF_C;
        const bf16_t* sB_ = reinterpret_cast<const bf16_t*>(smem + (i & 1) * SLOT + OFF_B);  // the epilogues' rows
        const bf16_t* sC_ = reinterpret_cast<const bf16_t*>(smem + (i & 1) * SLOT + OFF_C);

        if (warp == 0) {  // the log-decay summed within the chunk; e, w; document ids
            const int t = 2 * lane;
            const float c1 = warp_inclusive_sum(la0 + la1), c0 = c1 - la1;
            const float last = __shfl_sync(0xffffffffu, c1, 31);
            bool start0 = true, start1 = true, end0 = true, end1 = true;
            if (HAS_SEQ) {
                const int* sq = seq_ + (long long)b * s_sqb;
                const int q0 = sq[t0 + t], q1 = sq[t0 + t + 1], q_last = sq[t0 + BT - 1];
                const int q_prev = sq[max(t0 - 1, 0)];
                start0 = q0 == q_prev, start1 = q1 == q_prev, end0 = q0 == q_last, end1 = q1 == q_last;
                seq[t] = q0, seq[t + 1] = q1;
            }
            cs[t] = c0, cs[t + 1] = c1;
            e[t] = start0 ? __expf(c0) : 0.0f, e[t + 1] = start1 ? __expf(c1) : 0.0f;
            w[t] = end0 ? __expf(last - c0) : 0.0f, w[t + 1] = end1 ? __expf(last - c1) : 0.0f;
        }
        wait_inputs(i);
        __syncthreads();
        if (i + 1 < n_chunks) load_tokens(c - 1, (i + 1) & 1);  // the next chunk's inputs, while this one runs
        if (warp == 0 && c > 0) load_la(c - 1, la0, la1);

        // dC = R B + e (dy S_in): the snapshot's product first, so that its buffer is free for the next chunk's
        // after the barrier below
        float accC[T_MT][TW_N][4];
        zero(accC);
        warp_mma<T_MT, TW_N, P, true, LDP, false, LDN>(accC, sDY, tm0, smem0 + OFF_S, tw * (N / 4));
        scale_rows(accC, e, tm0);

        {  // A = (C B^T) * M and R = (dy x^T) * M, stored as bf16 for the products below
            float accA[1][S_NT][4], accR[1][S_NT][4];
            zero(accA);
            zero(accR);
            warp_mma<1, S_NT, N, true, LDN, true, LDN>(accA, sC, sm0, sB, sn0);
            warp_mma<1, S_NT, P, true, LDP, true, LDP>(accR, sDY, sm0, sX, sn0);
#pragma unroll
            for (int nj = 0; nj < S_NT; ++nj)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int t = acc_row(sm0, 0, 2 * hh), s = acc_col(sn0, nj);
                    float m[2];
#pragma unroll
                    for (int j = 0; j < 2; ++j) {  // computed for every pair, then selected: no branch per element
                        bool keep = s + j <= t;
                        if (HAS_SEQ) keep = keep && seq[s + j] == seq[t];
                        const float decay_ts = __expf(cs[t] - cs[s + j]);
                        m[j] = keep ? decay_ts : 0.0f;
                    }
                    const u32 at = 2 * (t * LDT + s);
                    *reinterpret_cast<u32*>(smem + OFF_A + at) =
                        pack_bf16x2(accA[0][nj][2 * hh] * m[0], accA[0][nj][2 * hh + 1] * m[1]);
                    *reinterpret_cast<u32*>(smem + OFF_R + at) =
                        pack_bf16x2(accR[0][nj][2 * hh] * m[0], accR[0][nj][2 * hh + 1] * m[1]);
                }
        }
        __syncthreads();  // sA, sR written; sS read
        if (c > 0) load_state(c - 1);

        float dcs_part[T_MT][2] = {};  // this thread's rows of dcs
        warp_mma<T_MT, TW_N, BT, true, LDT, false, LDN>(accC, smem0 + OFF_R, tm0, sB, tw * (N / 4));
        store_tokens<T_MT, TW_N, true>(accC, dC, s_dbt, t0, L, tm0, tw * (N / 4), sC_, LDN, 1.0f, dcs_part);
        {  // dx = A^T dy + w (B G^T)
            float acc[T_MT][TW_P][4];
            zero(acc);
            warp_mma<T_MT, TW_P, N, true, LDN, true, LDN>(acc, sB, tm0, smem0 + OFF_G, tw * (P / 4));
            scale_rows(acc, w, tm0);
            warp_mma<T_MT, TW_P, BT, false, LDT, false, LDP>(acc, smem0 + OFF_A, tm0, sDY, tw * (P / 4));
            store_tokens<T_MT, TW_P, false>(acc, dx, s_dxt, t0, L, tm0, tw * (P / 4), nullptr, 0, 0.0f,
                                         dcs_part);
        }
        {  // dB = R^T C + w (x G)
            float acc[T_MT][TW_N][4];
            zero(acc);
            warp_mma<T_MT, TW_N, P, true, LDP, false, LDN>(acc, sX, tm0, smem0 + OFF_G, tw * (N / 4));
            scale_rows(acc, w, tm0);
            warp_mma<T_MT, TW_N, BT, false, LDT, false, LDN>(acc, smem0 + OFF_R, tm0, sC, tw * (N / 4));
            store_tokens<T_MT, TW_N, true>(acc, dB, s_dbt, t0, L, tm0, tw * (N / 4), sB_, LDN, -1.0f, dcs_part);
        }
#pragma unroll
        for (int mi = 0; mi < T_MT; ++mi)  // the four threads of a quad hold one row: sum them, then over the warps
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float v = dcs_part[mi][hh];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if ((lane & 3) == 0) atomicAdd(&dcs[acc_row(tm0, mi, 2 * hh)], v);
            }
        // G <- decay G + (e dy)^T C, with the chunk's decay of the state passing through it
        bool carry = true;
        if (HAS_SEQ) carry = seq[BT - 1] == seq_[(long long)b * s_sqb + max(t0 - 1, 0)];
        const float decay = carry ? __expf(cs[BT - 1]) : 0.0f;
#pragma unroll
        for (int mi = 0; mi < GM; ++mi)
#pragma unroll
            for (int nj = 0; nj < GN; ++nj)
#pragma unroll
                for (int r = 0; r < 4; ++r) G[mi][nj][r] *= decay;
        warp_mma<GM, GN, BT, false, LDP, false, LDN>(G, sDY, gm0, sC, gn0, e);
        __syncthreads();  // every warp is done with the bf16 G and dcs
        store_G_bf16();
        if (warp == DLA_WARP) {  // dlog_a_t = sum of dcs over the later tokens (this chunk's, then the later chunks')
            const int t = 2 * lane;
            const float d0 = dcs[t], d1 = dcs[t + 1];
            dcs[t] = 0.0f, dcs[t + 1] = 0.0f;
            const float run = warp_inclusive_sum(d0 + d1), total = __shfl_sync(0xffffffffu, run, 31);
            const float after1 = total - run, after0 = after1 + d1;  // sums over the tokens after t+1 and after t
            if (t0 + t < L) dla[(long long)(t0 + t) * s_lat] = later + after0 + d0;
            if (t0 + t + 1 < L) dla[(long long)(t0 + t + 1) * s_lat] = later + after1 + d1;
            later += total;
        }
    }
#pragma unroll
    for (int mi = 0; mi < GM; ++mi)
#pragma unroll
        for (int nj = 0; nj < GN; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) d_init[g_base + g_row(mi, r) * N + g_col(nj) + (r & 1)] = G[mi][nj][r];
}
