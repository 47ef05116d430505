/* One decoding step of a Llamba student on the CPU: every layer, the final norm and the head in one call,
 * writing only into caller-owned buffers (workspace, recurrent state, logits), so a token allocates nothing.
 * Plain C with OpenMP, loaded through ctypes (llamba/quant/kernels.py): it builds in about a second and needs
 * no torch headers.
 *
 * A linear's weights come in one of three formats:
 *   bits 32: float32 (N, K)
 *   bits 4:  uint8 (N, K/2); per group of G inputs w = scale * q + min with q in [0, 15]; inside every 32-wide
 *            block byte j holds q[j] (low nibble) and q[j + 16] (high nibble)
 *   bits 8:  int8 (N, K); w = scale * q + min with q in [-128, 127]
 * scale and min are float16 (N, K / G), G a multiple of 32. The slow twin of everything here is
 * llamba/quant/reference.py (dequantize, then a float64 matmul).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
/* Three paths for the dot products: AVX-512, AVX2 + FMA + F16C (most x86 CPUs without AVX-512), and scalar C, which
 * the compiler cannot vectorise (a float sum it may not reorder): on an AVX2 CPU it ran 4x slower than llama.cpp. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLAMBA_AVX2 1
#endif
#if defined(__AVX512F__) || defined(__F16C__)  /* _cvtsh_ss is F16C's: AVX2 machines have it too */
#include <immintrin.h>
#endif

typedef struct {
  const void* data;
  const uint16_t* scale;
  const uint16_t* min;
  const float* bias; /* NULL when absent */
  int64_t bits, n, k, group;
} Linear;

typedef struct {
  const float* input_norm;
  Linear in_proj;
  const float* conv_weight; /* (conv_dim, width) */
  const float* conv_bias;   /* NULL when absent */
  const float* D;           /* (H) */
  const float* z_bias;      /* (d_inner) or NULL */
  Linear out_proj;
  const float* post_norm;
  Linear gate, up, down;
} Layer;

typedef struct {
  int64_t n_layer, d_model, d_inner, n_heads, n_groups, head_dim, d_state, width, inter;
  float eps;
  const Layer* layers;
  Linear embedding; /* used as a table: one row per token */
  const float* final_norm;
  Linear head;
} Model;

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) bits = sign;
    else { /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
  else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

#if defined(__AVX512F__) || defined(LLAMBA_AVX2)
static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* codes (8 bytes, unsigned or signed) times x[0..8], added to t */
static inline __m256 fma_u8(__m128i codes, const float* x, __m256 t) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_loadu_ps(x), t);
}
static inline __m256 fma_i8(__m128i codes, const float* x, __m256 t) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), _mm256_loadu_ps(x), t);
}
#endif

static float row_f32(const float* w, const float* x, int64_t k) {
  float s = 0.f;
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc);
  s = _mm512_reduce_add_ps(acc);
#elif defined(LLAMBA_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  /* two chains: an FMA's latency is 4+ cycles */
  for (; i + 16 <= k; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  s = sum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < k; ++i) s += w[i] * x[i];
  return s;
}

/* The min term of every row is min_g * (sum of x over group g): computed once per input, not per row. */
static float row_q4(const uint8_t* q, const uint16_t* scale, const uint16_t* min, const float* x, const float* xsum,
                    int64_t k, int64_t group) {
  float bias = 0.f;
#ifdef __AVX512F__
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    __m512 t = _mm512_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      __m128i bytes = _mm_loadu_si128((const __m128i*)(q + b / 2));
      __m128i lo = _mm_and_si128(bytes, low4);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_loadu_ps(x + b), t);
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_loadu_ps(x + b + 16), t);
    }
    acc = _mm512_fmadd_ps(t, _mm512_set1_ps(half_to_float(scale[g])), acc);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return _mm512_reduce_add_ps(acc) + bias;
#elif defined(LLAMBA_AVX2)
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      __m128i bytes = _mm_loadu_si128((const __m128i*)(q + b / 2));
      __m128i lo = _mm_and_si128(bytes, low4);                      /* codes b .. b + 15 */
      __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);  /* codes b + 16 .. b + 31 */
      t0 = fma_u8(lo, x + b, t0);
      t1 = fma_u8(_mm_srli_si128(lo, 8), x + b + 8, t1);
      t0 = fma_u8(hi, x + b + 16, t0);
      t1 = fma_u8(_mm_srli_si128(hi, 8), x + b + 24, t1);
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(half_to_float(scale[g])), acc);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return sum8(acc) + bias;
#else
  float s = 0.f;
  for (int64_t g = 0; g < k / group; ++g) {
    float t = 0.f;
    for (int64_t b = g * group; b < (g + 1) * group; b += 32)
      for (int j = 0; j < 16; ++j) {
        uint8_t byte = q[b / 2 + j];
        t += (float)(byte & 0x0F) * x[b + j] + (float)(byte >> 4) * x[b + j + 16];
      }
    s += t * half_to_float(scale[g]);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return s + bias;
#endif
}

static float row_q8(const int8_t* q, const uint16_t* scale, const uint16_t* min, const float* x, const float* xsum,
                    int64_t k, int64_t group) {
  float bias = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    __m512 t = _mm512_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 16) {
      __m128i bytes = _mm_loadu_si128((const __m128i*)(q + b));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), _mm512_loadu_ps(x + b), t);
    }
    acc = _mm512_fmadd_ps(t, _mm512_set1_ps(half_to_float(scale[g])), acc);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return _mm512_reduce_add_ps(acc) + bias;
#elif defined(LLAMBA_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 16) {
      __m128i bytes = _mm_loadu_si128((const __m128i*)(q + b));
      t0 = fma_i8(bytes, x + b, t0);
      t1 = fma_i8(_mm_srli_si128(bytes, 8), x + b + 8, t1);
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(half_to_float(scale[g])), acc);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return sum8(acc) + bias;
#else
  float s = 0.f;
  for (int64_t g = 0; g < k / group; ++g) {
    float t = 0.f;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) t += (float)q[i] * x[i];
    s += t * half_to_float(scale[g]);
    bias += half_to_float(min[g]) * xsum[g];
  }
  return s + bias;
#endif
}

static inline float row(const Linear* l, int64_t r, const float* x, const float* xsum) {
  const int64_t k = l->k, groups = l->bits == 32 ? 0 : k / l->group;
  float v;
  if (l->bits == 32) v = row_f32((const float*)l->data + r * k, x, k);
  else if (l->bits == 4)
    v = row_q4((const uint8_t*)l->data + r * k / 2, l->scale + r * groups, l->min + r * groups, x, xsum, k, l->group);
  else
    v = row_q8((const int8_t*)l->data + r * k, l->scale + r * groups, l->min + r * groups, x, xsum, k, l->group);
  return l->bias ? v + l->bias[r] : v;
}

static void group_sums(const Linear* l, const float* x, float* xsum) {
  if (l->bits == 32) return;
  for (int64_t g = 0; g < l->k / l->group; ++g) {
    float s = 0.f;
    for (int64_t i = g * l->group; i < (g + 1) * l->group; ++i) s += x[i];
    xsum[g] = s;
  }
}

/* y_b = W x_b (+ bias) for `batch` inputs: x_b at x + b * xs, y_b at y + b * ys, x_b's group sums (scratch of
 * K / 32 floats) at xsum + b * xss. Output rows are split across the OpenMP threads; each thread reads a weight row
 * once and uses it for every input while it is in cache, so a batch costs about one pass over the weights. */
static void gemm(const Linear* l, int64_t batch, const float* x, int64_t xs, float* y, int64_t ys, float* xsum,
                 int64_t xss) {
  for (int64_t b = 0; b < batch; ++b) group_sums(l, x + b * xs, xsum + b * xss);
#pragma omp parallel for schedule(static) if (l->n * batch >= 256)
  for (int64_t r = 0; r < l->n; ++r)
    for (int64_t b = 0; b < batch; ++b) y[b * ys + r] = row(l, r, x + b * xs, xsum + b * xss);
}

/* [y_a; y_b] = [A; B] x for two linears of one input (gate and up), batched as gemm: one parallel region. */
static void gemm2(const Linear* a, const Linear* b, int64_t batch, const float* x, int64_t xs, float* y, int64_t ys,
                  float* xsum_a, float* xsum_b, int64_t xss) {
  for (int64_t i = 0; i < batch; ++i) {
    group_sums(a, x + i * xs, xsum_a + i * xss);
    group_sums(b, x + i * xs, xsum_b + i * xss);
  }
  const int64_t n = a->n + b->n;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < batch; ++i)
      y[i * ys + r] = r < a->n ? row(a, r, x + i * xs, xsum_a + i * xss) : row(b, r - a->n, x + i * xs, xsum_b + i * xss);
}

/* Row `row` of a (possibly quantized) table, dequantized: the embedding lookup. */
static void table_row(const Linear* l, int64_t row, float* out) {
  const int64_t k = l->k;
  if (l->bits == 32) {
    memcpy(out, (const float*)l->data + row * k, k * sizeof(float));
    return;
  }
  const int64_t groups = k / l->group;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t g = i / l->group;
    int code;
    if (l->bits == 8) code = ((const int8_t*)l->data)[row * k + i];
    else {
      const int64_t j = i % 32;
      const uint8_t byte = ((const uint8_t*)l->data)[row * k / 2 + (i - j) / 2 + j % 16];
      code = j < 16 ? (byte & 0x0F) : (byte >> 4);
    }
    out[i] = half_to_float(l->scale[row * groups + g]) * (float)code + half_to_float(l->min[row * groups + g]);
  }
}

static void rms_norm(const float* x, const float* w, float* out, int64_t d, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / sqrtf(ss / (float)d + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * r);
}

/* One state row of the recurrence, S = a S + x B, returning S . C (n floats: the vector paths take 8 at a time,
 * the rest in C). */
static inline float state_row(float* S, float a, float x, const float* B, const float* C, int64_t n) {
  float acc = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__) || defined(LLAMBA_AVX2)
  const __m256 va = _mm256_set1_ps(a), vx = _mm256_set1_ps(x);
  __m256 v = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 st = _mm256_fmadd_ps(va, _mm256_loadu_ps(S + i), _mm256_mul_ps(vx, _mm256_loadu_ps(B + i)));
    _mm256_storeu_ps(S + i, st);
    v = _mm256_fmadd_ps(st, _mm256_loadu_ps(C + i), v);
  }
  acc = sum8(v);
#endif
  for (; i < n; ++i) {
    S[i] = a * S[i] + x * B[i];
    acc += S[i] * C[i];
  }
  return acc;
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }
static inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

int64_t llamba_workspace_floats(const Model* m) {
  const int64_t conv_dim = m->d_inner + 2 * m->n_groups * m->d_state;
  const int64_t proj_dim = conv_dim + m->d_inner + m->n_heads;
  /* h, xn, out | proj | conv out | y | gate and up | group sums (two sets: gate and up) */
  return 3 * m->d_model + proj_dim + conv_dim + m->d_inner + 2 * m->inter + 2 * (max3(m->d_model, m->d_inner, m->inter) / 32 + 1);
}

/* Mixer blocks first..last-1 for `batch` independent rows. Row b: its residual stream at h + b * hs (d_model
 * floats, updated in place), its conv_states[b] (n_layer, conv_dim, width - 1) and ssm_states[b] (n_layer, H, P, N),
 * float32, indexed by layer and updated in place, and its own workspace at work + b * ws_stride (whose first
 * d_model floats, the whole step's h, are not touched here). The linears run batched (gemm), the conv and the
 * recurrence row by row. */
static void mixer_blocks(const Model* m, int64_t first, int64_t last, int64_t batch, float* h, int64_t hs,
                         float* const* conv_states, float* const* ssm_states, float* work, int64_t ws_stride) {
  const int64_t d = m->d_model, d_inner = m->d_inner, H = m->n_heads, G = m->n_groups, P = m->head_dim,
                N = m->d_state, width = m->width, inter = m->inter;
  const int64_t conv_dim = d_inner + 2 * G * N, proj_dim = conv_dim + d_inner + H, heads_per_group = H / G;
  /* the workspace layout of one row (llamba_workspace_floats): h | xn | proj | xbc | y | gu | out | xsum */
  float* xn = work + d;
  float* proj = xn + d;
  float* xbc = proj + proj_dim;
  float* y = xbc + conv_dim;
  float* gu = y + d_inner;
  float* out = gu + 2 * inter;
  float* xsum = out + d;
  const int64_t S = ws_stride;

  for (int64_t li = first; li < last; ++li) {
    const Layer* L = &m->layers[li];

    /* Discrete Mamba-2 mixer */
    for (int64_t b = 0; b < batch; ++b) rms_norm(h + b * hs, L->input_norm, xn + b * S, d, m->eps);
    gemm(&L->in_proj, batch, xn, S, proj, S, xsum, S);
    for (int64_t b = 0; b < batch; ++b) {
      const float* pr = proj + b * S;
      float* xb = xbc + b * S;
      float* cs = conv_states[b] + li * conv_dim * (width - 1);
      for (int64_t c = 0; c < conv_dim; ++c) { /* depthwise causal conv over [x | B | C], window shifted in place */
        float* st = cs + c * (width - 1);
        const float* wc = L->conv_weight + c * width;
        float acc = L->conv_bias ? L->conv_bias[c] : 0.f;
        for (int64_t j = 0; j < width - 1; ++j) acc += wc[j] * st[j];
        acc += wc[width - 1] * pr[c];
        for (int64_t j = 0; j + 1 < width - 1; ++j) st[j] = st[j + 1];
        st[width - 2] = pr[c];
        xb[c] = acc;
      }
      const float *x = xb, *B = xb + d_inner, *C = xb + d_inner + G * N;
      const float *z = pr + conv_dim, *A_log = pr + conv_dim + d_inner;
      float* St = ssm_states[b] + li * H * P * N;
      float* yb = y + b * S;
      /* S = a S + x B^T;  y = (S C + D x) * silu(z + z_bias). Serial: ~40k multiply-adds cost less than a
       * hand-off. */
      for (int64_t hh = 0; hh < H; ++hh) {
        const float a = expf(-softplus(A_log[hh]));
        const float* Bg = B + (hh / heads_per_group) * N;
        const float* Cg = C + (hh / heads_per_group) * N;
        for (int64_t p = 0; p < P; ++p) {
          const float xv = x[hh * P + p];
          const float acc = state_row(St + (hh * P + p) * N, a, xv, Bg, Cg, N);
          const int64_t i = hh * P + p;
          yb[i] = (acc + L->D[hh] * xv) * silu(z[i] + (L->z_bias ? L->z_bias[i] : 0.f));
        }
      }
    }
    gemm(&L->out_proj, batch, y, S, out, S, xsum, S);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < d; ++i) h[b * hs + i] += out[b * S + i];

    /* SwiGLU MLP */
    for (int64_t b = 0; b < batch; ++b) rms_norm(h + b * hs, L->post_norm, xn + b * S, d, m->eps);
    gemm2(&L->gate, &L->up, batch, xn, S, gu, S, xsum, xsum + d / 32 + 1, S);
    for (int64_t b = 0; b < batch; ++b) {
      float* g = gu + b * S;
      for (int64_t i = 0; i < inter; ++i) g[i] = silu(g[i]) * g[inter + i];
    }
    gemm(&L->down, batch, gu, S, out, S, xsum, S);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < d; ++i) h[b * hs + i] += out[b * S + i];
  }
}

/* Mixer blocks first..last-1 on one residual stream h (d_model floats, updated in place): mixer_blocks for one row.
 * A hybrid's caller runs its attention layers itself between such ranges (llamba/quant/runtime.py). */
void llamba_mixer_blocks(const Model* m, int64_t first, int64_t last, float* h, float* conv_states, float* ssm_states,
                         float* work) {
  mixer_blocks(m, first, last, 1, h, 0, &conv_states, &ssm_states, work, 0);
}

/* h (d_model floats) <- the embedding of token. Returns 0, or -1 for a token id outside the embedding. */
int llamba_embed(const Model* m, int64_t token, float* h) {
  if (token < 0 || token >= m->embedding.n) return -1;
  table_row(&m->embedding, token, h);
  return 0;
}

/* logits_b (head->n floats, at logits + b * head->n) <- head(final_norm(h_b)) for `batch` rows: h_b at h + b * hs,
 * row b's workspace (its xn and xsum, as mixer_blocks lays them out) at work + b * ws_stride. */
static void head_rows(const Model* m, int64_t batch, const float* h, int64_t hs, float* work, int64_t ws_stride,
                      float* logits) {
  const int64_t d = m->d_model, d_inner = m->d_inner, conv_dim = d_inner + 2 * m->n_groups * m->d_state;
  float* xn = work + d;
  float* xsum = xn + d + (conv_dim + d_inner + m->n_heads) + conv_dim + d_inner + 2 * m->inter + d;
  for (int64_t b = 0; b < batch; ++b) rms_norm(h + b * hs, m->final_norm, xn + b * ws_stride, d, m->eps);
  gemm(&m->head, batch, xn, ws_stride, logits, m->head.n, xsum, ws_stride);
}

/* logits (head->n floats) <- head(final_norm(h)). */
void llamba_head(const Model* m, const float* h, float* work, float* logits) {
  head_rows(m, 1, h, 0, work, 0, logits);
}

/* A pure student's whole step for `batch` sequences at once (a server's slots): embedding, every block, final norm
 * and head. Sequence b feeds tokens[b] to its own conv_states[b] and ssm_states[b]; work holds `batch` workspaces
 * of llamba_workspace_floats each; logits receives (batch, head->n) floats. Each weight is read about once for the
 * whole batch. Returns 0, or -1 (before any work) when a token id is outside the embedding. */
int llamba_decode_batch(const Model* m, int64_t batch, const int64_t* tokens, float* const* conv_states,
                        float* const* ssm_states, float* work, float* logits) {
  const int64_t S = llamba_workspace_floats(m);
  for (int64_t b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= m->embedding.n) return -1;
  for (int64_t b = 0; b < batch; ++b) table_row(&m->embedding, tokens[b], work + b * S);
  mixer_blocks(m, 0, m->n_layer, batch, work, S, conv_states, ssm_states, work, S);
  head_rows(m, batch, work, S, work, S, logits);
  return 0;
}

/* A pure student's whole step for one sequence: llamba_decode_batch of one. */
int llamba_decode_step(const Model* m, int64_t token, float* conv_states, float* ssm_states, float* work, float* logits) {
  return llamba_decode_batch(m, 1, &token, &conv_states, &ssm_states, work, logits);
}

/* y (M, N) = x (M, K) W^T (+ bias), row by row: the quantized linear for a few rows, and what the tests check. */
void llamba_linear_rows(const Linear* l, const float* x, int64_t rows, float* y, float* xsum) {
  for (int64_t r = 0; r < rows; ++r) gemm(l, 1, x + r * l->k, 0, y + r * l->n, 0, xsum, 0);
}

/* The dot products' vector width in bits: 512, 256 (AVX2) or 0 (scalar C). */
int llamba_simd_bits(void) {
#if defined(__AVX512F__)
  return 512;
#elif defined(LLAMBA_AVX2)
  return 256;
#else
  return 0;
#endif
}

#ifdef _OPENMP
#include <omp.h>
void llamba_set_threads(int n) { omp_set_num_threads(n); }
int llamba_get_threads(void) { return omp_get_max_threads(); }
#else
void llamba_set_threads(int n) { (void)n; }
int llamba_get_threads(void) { return 1; }
#endif
