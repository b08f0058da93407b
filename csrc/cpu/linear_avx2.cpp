// AVX2/FMA kernels of the CPU fused QLoRA linear (dispatch and epilogues: linear.cpp).
//
// NF4 decode, 32 codes per 16-byte load: split nibbles, vpshufb the four byte planes of the exact
// float32 code table, interleave the planes back into float32 lanes. The GEMV decode
// (decode32_evenodd) leaves the values in an even/odd lane order and x is permuted into that order
// once per call (permute_even_odd in linear.cpp), so the hot loop has no cross-lane shuffle; the panel decode
// (decode32_split) restores natural order with 4 vperm2f128.
//
// GEMM forward computes y^T = W x^T: A = decoded W rows (6 at a time, broadcast), B = x^T packed in
// 16-wide micro-panels [kc][16]; tile 6x16 in 12 ymm accumulators. Blocking: KC = 256 along K (one
// micro-panel = 16 KB, L1), NB = 96 W rows per decoded block (96 KB, L2), each W element decoded once.
// GEMM dx computes dx = dy W: A = dy rows (6, broadcast), B = decoded W rows [nc][16 of KB]
// (natural order, no transpose): NC = 256 along N, KB = 256 columns per decoded block (256 KB, L2),
// dy in blocks of MC = 72 rows (L2) so each dy element comes from memory once per K block.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/linear.h"
#include "cpu/simd_avx2.h"

namespace nf4lora {
namespace avx2lin {

namespace {

constexpr int64_t kKC = 256;  // forward: K per packed x^T chunk
constexpr int64_t kNB = 96;   // forward: W rows per decoded block (16 micro-tiles of 6)
constexpr int64_t kNC = 256;  // dx: N (reduction) per chunk
constexpr int64_t kKB = 256;  // dx: K columns per decoded block (16 micro-tiles of 16; 256 KB, L2)
constexpr int64_t kMC = 72;   // dx: dy rows per L2-resident block (72 x 256 fp32 = 72 KB)
constexpr int kMR = 6;
constexpr int kNR = 16;

// Byte planes of the float32 NF4 table: plane p, byte c = byte p of kNF4[c] (both 128-bit lanes).
struct Planes {
  __m256i p[4];
  Planes() {
    alignas(32) uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c) {
      const uint32_t u = f32_bits(kNF4[c]);
      for (int b = 0; b < 4; ++b) bytes[b][c] = bytes[b][c + 16] = static_cast<uint8_t>(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b) p[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[b]));
  }
};

// 32 codes (bytes in [0, 15], per 128-bit lane) -> float32 code values: vpshufb each byte plane,
// then interleave bytes 0|1 and 2|3 into 16-bit, and those into 32-bit lanes. Within each lane,
// f0 holds codes 0-3, f1 codes 4-7, f2 codes 8-11, f3 codes 12-15.
inline void lookup32(const __m256i c, const Planes& t, __m256 f[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(t.p[0], c), b1 = _mm256_shuffle_epi8(t.p[1], c);
  const __m256i b2 = _mm256_shuffle_epi8(t.p[2], c), b3 = _mm256_shuffle_epi8(t.p[3], c);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

inline void decode32_split(const uint8_t* src, const Planes& t, __m256 f[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);  // elements 0, 2, 4, ...
  const __m128i lo = _mm_and_si128(b, m4);                      // elements 1, 3, 5, ...
  const __m256i c = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
  lookup32(c, t, f);
}

// GEMV variant with 3 fewer shuffles: the 16 bytes are broadcast to both lanes and a per-lane
// variable shift takes the high nibbles in lane 0 (elements 0, 2, ..., 30) and the low nibbles in
// lane 1 (elements 1, 3, ..., 31). Output order ("even/odd split"):
//   f0 = [e0 e2 e4 e6 | e1 e3 e5 e7], f1 = [e8 .. e14 even | e9 .. e15 odd], f2 = [e16..|e17..],
//   f3 = [e24..|e25..]; linear.cpp permutes x into the same order.
inline void decode32_evenodd(const uint8_t* src, const Planes& t, __m256 f[4]) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                     _mm256_set1_epi8(0x0f));
  lookup32(c, t, f);
}

// Elements [k0, k0 + len) of W row n -> dst[0:len] (fp32, natural order). 32-element groups that
// start on a 32-aligned flat index take the vector decode; anything else decodes element-wise.
void decode_row_segment(const NF4Weight& w, const Planes& t, int64_t n, int64_t k0, int64_t len,
                        float* dst) {
  const int64_t base = n * w.K + k0;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));  // blocksize is 2^lb
  int64_t k = 0;
  if (base % 32 == 0) {
    // one scale per NF4 block segment (a block never splits a 32-aligned group: blocksize >= 32)
    while (k + 32 <= len) {
      const int64_t b = (base + k) >> lb;
      const int64_t seg_end = std::min(len, ((b + 1) << lb) - base);
      const __m256 s = _mm256_set1_ps(w.scales.block(b));
      for (; k + 32 <= seg_end; k += 32) {
        __m256 f[4];
        decode32_split(w.packed + (base + k) / 2, t, f);
        _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_permute2f128_ps(f[0], f[1], 0x20), s));
        _mm256_storeu_ps(dst + k + 8, _mm256_mul_ps(_mm256_permute2f128_ps(f[2], f[3], 0x20), s));
        _mm256_storeu_ps(dst + k + 16, _mm256_mul_ps(_mm256_permute2f128_ps(f[0], f[1], 0x31), s));
        _mm256_storeu_ps(dst + k + 24, _mm256_mul_ps(_mm256_permute2f128_ps(f[2], f[3], 0x31), s));
      }
      if (k < seg_end) break;  // fewer than 32 left in this segment: finish element-wise
    }
  }
  for (; k < len; ++k) dst[k] = w.at(n, k0 + k);
}

// C[MR x 16] (+)= A[MR x kc] * B[kc x 16]; A rows at a + i*lda (broadcast), B rows at b + k*ldb.
template <int MR>
inline void ukernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c,
                    int64_t ldc, bool accumulate) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = accumulate ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    c1[i] = accumulate ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, c0[i]);
    _mm256_storeu_ps(c + i * ldc + 8, c1[i]);
  }
}

// One W row against MT activation rows (xp permuted, row stride K); ACC accumulators per row keep
// the FMA chains short enough to hide latency.
template <int MT, int ACC>
inline void gemv_row(const NF4Weight& w, const Planes& t, int64_t n, const float* xp,
                     float* out /* [MT], stride 1 */) {
  const int64_t K = w.K;
  const uint8_t* row = w.packed + n * K / 2;
  __m256 acc[MT][ACC];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < ACC; ++a) acc[m][a] = _mm256_setzero_ps();
  const int64_t flat0 = n * K;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));
  for (int64_t k = 0; k < K;) {
    const int64_t b = (flat0 + k) >> lb;
    const int64_t seg_end = std::min(K, ((b + 1) << lb) - flat0);
    const __m256 s = _mm256_set1_ps(w.scales.block(b));  // once per NF4 block
    for (; k < seg_end; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + 1024), _MM_HINT_T0);
      __m256 f[4];
      decode32_evenodd(row + k / 2, t, f);
      for (int i = 0; i < 4; ++i) {
        const __m256 fi = _mm256_mul_ps(f[i], s);
        for (int m = 0; m < MT; ++m)
          acc[m][i % ACC] = _mm256_fmadd_ps(fi, _mm256_loadu_ps(xp + m * K + k + 8 * i), acc[m][i % ACC]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 sum = acc[m][0];
    for (int a = 1; a < ACC; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
    out[m] = avx2::hsum(sum);
  }
}

// M = 1: the block scale is applied once per NF4 block to two block accumulators instead of once
// per decoded vector (10 instead of 16 FP ops per 64 weights at blocksize 64). Block accumulators
// start fresh each block, so consecutive blocks' FMA chains overlap in the out-of-order window.
inline float gemv_row1(const NF4Weight& w, const Planes& t, int64_t n, const float* xp) {
  const int64_t K = w.K;
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t flat0 = n * K;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K;) {
    const int64_t b = (flat0 + k) >> lb;
    const int64_t seg_end = std::min(K, ((b + 1) << lb) - flat0);
    __m256 ab0 = _mm256_setzero_ps(), ab1 = _mm256_setzero_ps();
    for (; k < seg_end; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + 1024), _MM_HINT_T0);
      __m256 f[4];
      decode32_evenodd(row + k / 2, t, f);
      ab0 = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xp + k), ab0);
      ab1 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xp + k + 8), ab1);
      ab0 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xp + k + 16), ab0);
      ab1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xp + k + 24), ab1);
    }
    const __m256 s = _mm256_set1_ps(w.scales.block(b));
    acc0 = _mm256_fmadd_ps(ab0, s, acc0);
    acc1 = _mm256_fmadd_ps(ab1, s, acc1);
  }
  return avx2::hsum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

void gemv_forward(const NF4Weight& w, const float* xp, int64_t M, int64_t n0, int64_t n1,
                  float* y_acc) {
  static const Planes t;
  const int64_t N = w.N, K = w.K;
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      gemv_row<4, 2>(w, t, n, xp + m * K, out);
      for (int i = 0; i < 4; ++i) y_acc[(m + i) * N + n] = out[i];
    }
    switch (M - m) {
      case 3: gemv_row<3, 2>(w, t, n, xp + m * K, out); break;
      case 2: gemv_row<2, 4>(w, t, n, xp + m * K, out); break;
      case 1: out[0] = gemv_row1(w, t, n, xp + m * K); break;
      default: break;
    }
    for (int64_t i = m; i < M; ++i) y_acc[i * N + n] = out[i - m];
  }
}

void gemm_forward(const NF4Weight& w, const void* x, DType dtype, int64_t M, const float* u,
                  const float* B, int64_t r, float scaling, float* yT) {
  static const Planes t;
  const int64_t N = w.N, K = w.K;
  const int64_t Mp = (M + 15) / 16 * 16;
  const int64_t panels = Mp / 16;
  const int64_t nblocks = (N + kNB - 1) / kNB;
  std::vector<float> xpack(static_cast<size_t>(Mp * kKC));  // x^T chunk: [panels][kc][16]
#pragma omp parallel
  {
    std::vector<float> wbuf(static_cast<size_t>(kNB * kKC));
    // One reduction chunk of kc columns, run by the whole team: xval(m, k) fills the shared x^T
    // panels (rows m >= M zero), wrow(n, dst) writes W row n's kc values; then every 96-row block
    // of y^T accumulates. Used for the K chunks of x W^T and for the LoRA's r extra columns.
    auto chunk = [&](int64_t kc, bool accumulate, auto&& xval, auto&& wrow) {
#pragma omp for schedule(static)
      for (int64_t p = 0; p < panels; ++p) {
        float* dst = xpack.data() + p * kKC * 16;
        for (int j = 0; j < 16; ++j) {
          const int64_t m = p * 16 + j;
          for (int64_t k = 0; k < kc; ++k) dst[k * 16 + j] = m < M ? xval(m, k) : 0.0f;
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t nb = 0; nb < nblocks; ++nb) {
        const int64_t nlo = nb * kNB, rows = std::min(kNB, N - nlo);
        const int64_t rows6 = (rows + kMR - 1) / kMR * kMR;
        for (int64_t i = 0; i < rows6; ++i) {
          if (i < rows)
            wrow(nlo + i, wbuf.data() + i * kKC);
          else
            std::fill_n(wbuf.data() + i * kKC, kc, 0.0f);
        }
        for (int64_t p = 0; p < panels; ++p)
          for (int64_t i = 0; i < rows6; i += kMR)
            ukernel<kMR>(wbuf.data() + i * kKC, kKC, xpack.data() + p * kKC * 16, 16, kc,
                         yT + (nlo + i) * Mp + p * 16, Mp, accumulate);
      }
    };
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      chunk(kc, k0 > 0, [&](int64_t m, int64_t k) { return load_as_f32(x, dtype, m * K + k0 + k); },
            [&](int64_t n, float* dst) { decode_row_segment(w, t, n, k0, kc, dst); });
    }
    // LoRA as r extra K columns: A operand = s * B rows, B operand = u^T micro-panels.
    for (int64_t j0 = 0; u != nullptr && j0 < r; j0 += kKC) {
      const int64_t rc = std::min(kKC, r - j0);
      chunk(rc, true, [&](int64_t m, int64_t k) { return u[m * r + j0 + k]; },
            [&](int64_t n, float* dst) {
              for (int64_t k = 0; k < rc; ++k) dst[k] = scaling * B[n * r + j0 + k];
            });
    }
  }
}

// ukernel for the last 1..5 rows of dy (no padded copy of dy needed)
inline void ukernel_rows(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb,
                         int64_t kc, float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
    case 6: ukernel<6>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
    case 5: ukernel<5>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
    case 4: ukernel<4>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
    case 3: ukernel<3>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
    case 2: ukernel<2>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
    default: ukernel<1>(a, lda, b, ldb, kc, c, ldc, accumulate); break;
  }
}

void gemm_backward_dx(const NF4Weight& w, const float* dy, int64_t M, float* dxacc, int64_t ldc) {
  static const Planes t;
  const int64_t N = w.N, K = w.K;
  const int64_t kblocks = (K + kKB - 1) / kKB;
#pragma omp parallel
  {
    // wbuf is panel-major [kKB/16][nc][16]: a micro-panel is 16 KB contiguous, so it stays in L1
    // (row-major with a 1 KB row stride would map all its lines onto 4 L1 sets).
    std::vector<float> wbuf(static_cast<size_t>(kNC * kKB)), row(static_cast<size_t>(kKB));
    for (int64_t n0 = 0; n0 < N; n0 += kNC) {
      const int64_t nc = std::min(kNC, N - n0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const int64_t klo = kb * kKB, cols = std::min(kKB, K - klo);
        const int64_t cols16 = (cols + kNR - 1) / kNR * kNR;
        for (int64_t i = 0; i < nc; ++i) {
          decode_row_segment(w, t, n0 + i, klo, cols, row.data());
          std::fill(row.data() + cols, row.data() + cols16, 0.0f);
          for (int64_t c = 0; c < cols16; c += kNR)
            std::memcpy(wbuf.data() + c * nc + i * kNR, row.data() + c, kNR * sizeof(float));
        }
        // dy rows in blocks of kMC (L2) x column panels (L1) x 6-row tiles
        for (int64_t m0 = 0; m0 < M; m0 += kMC) {
          const int64_t m1 = std::min(M, m0 + kMC);
          for (int64_t c = 0; c < cols16; c += kNR)
            for (int64_t m = m0; m < m1; m += kMR)
              ukernel_rows(std::min<int64_t>(kMR, m1 - m), dy + m * N + n0, N, wbuf.data() + c * nc,
                           kNR, nc, dxacc + m * ldc + klo + c, ldc, n0 > 0);
        }
      }
    }
  }
}

void transpose_out(const float* yT, int64_t Mp, int64_t M, int64_t N, int64_t m0, int64_t n0,
                   const float* bias, void* y, DType dtype) {
  // 8 rows of yT (n0..n0+7, each holding m0..m0+7) -> 8 columns of y, through an 8x8 transpose:
  // unpack pairs, then 64-bit pairs, then 128-bit halves.
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(yT + (n0 + i) * Mp + m0);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 c[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                       _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                       _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                       _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  const __m256 b = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
  for (int j = 0; j < 8 && m0 + j < M; ++j) avx2::store8(y, dtype, (m0 + j) * N + n0, _mm256_add_ps(c[j], b));
}

void store_row(const float* src, int64_t n, void* dst, DType dtype, int64_t offset) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(dst, dtype, offset + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) store_from_f32(dst, dtype, offset + i, src[i]);
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float s = avx2::hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace avx2lin
}  // namespace nf4lora
