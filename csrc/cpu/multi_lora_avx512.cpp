// AVX-512 kernels of the multi-adapter LoRA term (csrc/cpu/multi_lora.h; call only when
// use_avx512()). 16 fp32 lanes.
//   dots:        16 dot products left . right[i] (i < 16) in 16 accumulators, then one transpose-add
//                network (4 levels of unpack/shuffle + add) leaves dot i in lane i.
//   shrink:      u += x A^T as dots of x rows against 16 A rows at a time, K in L1-sized chunks so
//                an SGMV tile reuses the A chunk across its rows.
//   expand_row:  BGMV: y[n0 + i] += s * (B[n0 + i] . u) as dots of length r.
//   expand_rows: SGMV: the 16 x r block of B gathered once into bt [r][16] (B^T), then each row
//                is r broadcast FMAs per 16 columns.
#include "cpu/multi_lora.h"
#include "cpu/simd_avx512.h"

#include <algorithm>

namespace nf4lora {

namespace {

using avx512::load16;
using avx512::tail16;

constexpr int64_t kShrinkChunk = 512;  // K per chunk: 16 A rows x 2 KB stay in L1/L2

inline void store16(void* p, DType d, int64_t i, __mmask16 mask, __m512 v) {
  switch (d) {
    case DType::kF32: _mm512_mask_storeu_ps(static_cast<float*>(p) + i, mask, v); break;
    case DType::kF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask, avx512::to_bf16(v)); break;
  }
}

// Lane i of the result = sum of the 16 lanes of a[i].
inline __m512 reduce16(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial sums of rows 4i .. 4i + 3
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [c0 L0+L1, c0 L2+L3, c1 L0+L1, c1 L2+L3]
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Lane i (< nr) = sum_{l < L} left[l] * right[i * ld + l]; lanes >= nr are garbage (they repeat
// the last row, so every load stays inside the operands).
inline __m512 dots(const float* left, const float* right, int64_t ld, int64_t nr, int64_t L) {
  const float* rp[16];
  for (int i = 0; i < 16; ++i) rp[i] = right + std::min<int64_t>(i, nr - 1) * ld;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t l = 0;
  for (; l + 16 <= L; l += 16) {
    const __m512 xv = _mm512_loadu_ps(left + l);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(rp[i] + l), xv, acc[i]);
  }
  if (l < L) {
    const __mmask16 m = tail16(L - l);
    const __m512 xv = _mm512_maskz_loadu_ps(m, left + l);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rp[i] + l), xv, acc[i]);
  }
  return reduce16(acc);
}

void shrink(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const float* A,
            int64_t r, float* u) {
  for (int64_t k0 = 0; k0 < K; k0 += kShrinkChunk) {
    const int64_t kc = std::min(kShrinkChunk, K - k0);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* xr = xf + rows[i] * K + k0;
      float* ur = u + rows[i] * r;
      for (int64_t j0 = 0; j0 < r; j0 += 16) {
        const __mmask16 m = tail16(r - j0);
        const __m512 d = dots(xr, A + j0 * K + k0, K, std::min<int64_t>(16, r - j0), kc);
        _mm512_mask_storeu_ps(ur + j0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, ur + j0), d));
      }
    }
  }
}

void expand_row(const float* u, const float* B, int64_t r, int64_t n0, int64_t n1, float s,
                void* y, DType dt, int64_t yrow, int64_t N) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - n);
    const __mmask16 m = tail16(nr);
    const __m512 d = dots(u, B + n * r, r, nr, r);
    const int64_t off = yrow * N + n;
    store16(y, dt, off, m, _mm512_add_ps(load16(y, dt, off, m), _mm512_mul_ps(sv, d)));
  }
}

void expand_rows(const float* u, int64_t r, const int64_t* rows, int64_t nrows, const float* B,
                 int64_t n0, int64_t n1, float s, void* y, DType dt, int64_t N, float* bt) {
  const __m512 sv = _mm512_set1_ps(s);
  const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(r)));
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 m = tail16(n1 - n);
    for (int64_t j = 0; j < r; ++j)  // bt[j][c] = B[n + c][j]
      _mm512_storeu_ps(bt + j * 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, stride, B + n * r + j, 4));
    for (int64_t i = 0; i < nrows; ++i) {
      const float* ur = u + rows[i] * r;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < r; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(ur[j]), _mm512_loadu_ps(bt + j * 16), acc);
      const int64_t off = rows[i] * N + n;
      store16(y, dt, off, m, _mm512_add_ps(load16(y, dt, off, m), _mm512_mul_ps(sv, acc)));
    }
  }
}

}  // namespace

const MultiLoraKernels kMultiLoraAvx512 = {shrink, expand_row, expand_rows};

}  // namespace nf4lora
