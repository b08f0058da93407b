// AVX2 kernels of the multi-adapter LoRA term (csrc/cpu/multi_lora.h; call only when use_avx2()):
// the AVX-512 file's algorithm on 8 fp32 lanes (dots of 8 rows reduced by a 3-level transpose-add,
// the SGMV expand on an 8-column B^T block). Column tails go through an 8-float stack buffer.
#include <algorithm>

#include "cpu/multi_lora.h"
#include "cpu/simd_avx2.h"

namespace nf4lora {

namespace {

constexpr int64_t kShrinkChunk = 512;

// Lane mask of the first n (<= 8) lanes for maskload / gathers.
inline __m256i tail8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lane i of the result = sum of the 8 lanes of a[i].
inline __m256 reduce8(__m256 a[8]) {
  __m256 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d lo = _mm256_unpacklo_pd(_mm256_castps_pd(b[2 * i]), _mm256_castps_pd(b[2 * i + 1]));
    const __m256d hi = _mm256_unpackhi_pd(_mm256_castps_pd(b[2 * i]), _mm256_castps_pd(b[2 * i + 1]));
    c[i] = _mm256_add_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

// Elements [i, i + n) of a buffer in dtype P as fp32 (n < 8: the rest 0, read element-wise)
template <DType P>
inline __m256 load_n(const void* p, int64_t i, int64_t n) {
  if (n >= 8) return avx2::load8(p, P, i);
  alignas(32) float t[8] = {};
  for (int64_t c = 0; c < n; ++c) t[c] = load_as_f32(p, P, i + c);
  return _mm256_load_ps(t);
}

// Lane i (< nr) = sum_{l < L} left[l] * right[i * ld + l], right in dtype P (lanes >= nr repeat
// the last row).
template <DType P>
inline __m256 dots(const float* left, const void* right, int64_t ld, int64_t nr, int64_t L) {
  int64_t ro[8];
  for (int i = 0; i < 8; ++i) ro[i] = std::min<int64_t>(i, nr - 1) * ld;
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    const __m256 xv = _mm256_loadu_ps(left + l);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(avx2::load8(right, P, ro[i] + l), xv, acc[i]);
  }
  if (l < L) {
    const __m256 xv = load_n<DType::kF32>(left, l, L - l);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(load_n<P>(right, ro[i] + l, L - l), xv, acc[i]);
  }
  return reduce8(acc);
}

// y[off : off + nr] += s * v (nr <= 8), in y's dtype
inline void add_out(void* y, DType dt, int64_t off, int64_t nr, __m256 sv, __m256 v) {
  if (nr == 8) {
    avx2::store8(y, dt, off, _mm256_add_ps(avx2::load8(y, dt, off), _mm256_mul_ps(sv, v)));
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_mul_ps(sv, v));
  for (int64_t i = 0; i < nr; ++i) store_from_f32(y, dt, off + i, load_as_f32(y, dt, off + i) + t[i]);
}

template <DType P>
void shrink_t(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const void* A,
              int64_t r, float* u) {
  for (int64_t k0 = 0; k0 < K; k0 += kShrinkChunk) {
    const int64_t kc = std::min(kShrinkChunk, K - k0);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* xr = xf + rows[i] * K + k0;
      float* ur = u + rows[i] * r;
      for (int64_t j0 = 0; j0 < r; j0 += 8) {
        const __m256i m = tail8(r - j0);
        const void* a = static_cast<const char*>(A) + (j0 * K + k0) * dtype_size(P);
        const __m256 d = dots<P>(xr, a, K, std::min<int64_t>(8, r - j0), kc);
        _mm256_maskstore_ps(ur + j0, m, _mm256_add_ps(_mm256_maskload_ps(ur + j0, m), d));
      }
    }
  }
}

template <DType P>
void expand_row_t(const float* u, const void* B, int64_t r, int64_t n0, int64_t n1, float s,
                  void* y, DType dt, int64_t yrow, int64_t N) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nr = std::min<int64_t>(8, n1 - n);
    add_out(y, dt, yrow * N + n, nr, sv, dots<P>(u, static_cast<const char*>(B) + n * r * dtype_size(P), r, nr, r));
  }
}

// bt[j][c] = B[n + c][j] for c < nc (0 beyond): fp32 B by masked gathers, 16-bit B element-wise
inline void transpose_block(const void* B, DType pdt, int64_t r, int64_t n, int64_t nc, float* bt) {
  if (pdt == DType::kF32) {
    const __m256i stride = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                              _mm256_set1_epi32(static_cast<int>(r)));
    const __m256 m = _mm256_castsi256_ps(tail8(nc));
    const float* b = static_cast<const float*>(B) + n * r;
    for (int64_t j = 0; j < r; ++j)
      _mm256_storeu_ps(bt + j * 8, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), b + j, stride, m, 4));
    return;
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < 8; ++c) bt[j * 8 + c] = c < nc ? load_as_f32(B, pdt, (n + c) * r + j) : 0.0f;
}

void expand_rows(const float* u, int64_t r, const int64_t* rows, int64_t nrows, const void* B,
                 DType pdt, int64_t n0, int64_t n1, float s, void* y, DType dt, int64_t N, float* bt) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nr = std::min<int64_t>(8, n1 - n);
    transpose_block(B, pdt, r, n, nr, bt);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* ur = u + rows[i] * r;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < r; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(ur[j]), _mm256_loadu_ps(bt + j * 8), acc);
      add_out(y, dt, rows[i] * N + n, nr, sv, acc);
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

const MultiLoraKernels kMultiLoraAvx2 = {shrink, expand_row, expand_rows};

}  // namespace nf4lora
