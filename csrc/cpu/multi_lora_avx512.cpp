// AVX-512 kernels of the multi-adapter LoRA term (csrc/cpu/multi_lora.h; call only when
// use_avx512()). 16 fp32 lanes.
//   dots:        16 dot products left . right[i] (i < 16) in 16 accumulators, then one transpose-add
//                network (4 levels of unpack/shuffle + add) leaves dot i in lane i.
//   shrink:      u += x A^T as dots of x rows against 16 A rows at a time, K in L1-sized chunks so
//                an SGMV tile reuses the A chunk across its rows.
//   expand_row:  BGMV: y[n0 + i] += s * (B[n0 + i] . u) as dots of length r.
//   expand_rows: SGMV: the 16 x r block of B gathered once into bt [r][16] (B^T), then each row
//                is r broadcast FMAs per 16 columns.
// A and B are fp32, fp16 or bf16 (pools), converted to fp32 as they load; sums are fp32.
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

// Lane i (< nr) = sum_{l < L} left[l] * right[i * ld + l], right in dtype P; lanes >= nr are
// garbage (they repeat the last row, so every load stays inside the operands).
template <DType P>
inline __m512 dots(const float* left, const void* right, int64_t ld, int64_t nr, int64_t L) {
  int64_t ro[16];  // element offsets of the right rows
  for (int i = 0; i < 16; ++i) ro[i] = std::min<int64_t>(i, nr - 1) * ld;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; l += 16) {
    const __mmask16 m = tail16(L - l);
    const __m512 xv = _mm512_maskz_loadu_ps(m, left + l);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(load16(right, P, ro[i] + l, m), xv, acc[i]);
  }
  return reduce16(acc);
}

template <DType P>
void shrink_t(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const void* A,
              int64_t r, float* u) {
  const int64_t esz = dtype_size(P);
  for (int64_t k0 = 0; k0 < K; k0 += kShrinkChunk) {
    const int64_t kc = std::min(kShrinkChunk, K - k0);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* xr = xf + rows[i] * K + k0;
      float* ur = u + rows[i] * r;
      for (int64_t j0 = 0; j0 < r; j0 += 16) {
        const __mmask16 m = tail16(r - j0);
        const void* a = static_cast<const char*>(A) + (j0 * K + k0) * esz;
        const __m512 d = dots<P>(xr, a, K, std::min<int64_t>(16, r - j0), kc);
        _mm512_mask_storeu_ps(ur + j0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, ur + j0), d));
      }
    }
  }
}

template <DType P>
void expand_row_t(const float* u, const void* B, int64_t r, int64_t n0, int64_t n1, float s,
                  void* y, DType dt, int64_t yrow, int64_t N) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - n);
    const __mmask16 m = tail16(nr);
    const __m512 d = dots<P>(u, static_cast<const char*>(B) + n * r * dtype_size(P), r, nr, r);
    const int64_t off = yrow * N + n;
    store16(y, dt, off, m, _mm512_add_ps(load16(y, dt, off, m), _mm512_mul_ps(sv, d)));
  }
}

// bt[j][c] = B[n + c][j] for c < nc (0 beyond): fp32 B by masked gathers, 16-bit B element-wise
// (a 32-bit gather of 16-bit elements could read past the pool's end)
inline void transpose_block(const void* B, DType pdt, int64_t r, int64_t n, int64_t nc, float* bt) {
  if (pdt == DType::kF32) {
    const __m512i stride = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(r)));
    const float* b = static_cast<const float*>(B) + n * r;
    for (int64_t j = 0; j < r; ++j)
      _mm512_storeu_ps(bt + j * 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), tail16(nc), stride, b + j, 4));
    return;
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < 16; ++c) bt[j * 16 + c] = c < nc ? load_as_f32(B, pdt, (n + c) * r + j) : 0.0f;
}

void expand_rows(const float* u, int64_t r, const int64_t* rows, int64_t nrows, const void* B,
                 DType pdt, int64_t n0, int64_t n1, float s, void* y, DType dt, int64_t N, float* bt) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 m = tail16(n1 - n);
    transpose_block(B, pdt, r, n, std::min<int64_t>(16, n1 - n), bt);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* ur = u + rows[i] * r;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < r; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(ur[j]), _mm512_loadu_ps(bt + j * 16), acc);
      const int64_t off = rows[i] * N + n;
      store16(y, dt, off, m, _mm512_add_ps(load16(y, dt, off, m), _mm512_mul_ps(sv, acc)));
    }
  }
}

void shrink(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const void* A, DType pdt,
            int64_t r, float* u) {
  (pdt == DType::kF32 ? shrink_t<DType::kF32> : pdt == DType::kF16 ? shrink_t<DType::kF16>
                                                                   : shrink_t<DType::kBF16>)(
      xf, K, rows, nrows, A, r, u);
}

void expand_row(const float* u, const void* B, DType pdt, int64_t r, int64_t n0, int64_t n1, float s,
                void* y, DType dt, int64_t yrow, int64_t N) {
  (pdt == DType::kF32 ? expand_row_t<DType::kF32> : pdt == DType::kF16 ? expand_row_t<DType::kF16>
                                                                       : expand_row_t<DType::kBF16>)(
      u, B, r, n0, n1, s, y, dt, yrow, N);
}

}  // namespace

const MultiLoraKernels kMultiLoraAvx512 = {shrink, expand_row, expand_rows};

}  // namespace nf4lora
