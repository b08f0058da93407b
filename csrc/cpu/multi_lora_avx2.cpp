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

// Lane i (< nr) = sum_{l < L} left[l] * right[i * ld + l] (lanes >= nr repeat the last row).
inline __m256 dots(const float* left, const float* right, int64_t ld, int64_t nr, int64_t L) {
  const float* rp[8];
  for (int i = 0; i < 8; ++i) rp[i] = right + std::min<int64_t>(i, nr - 1) * ld;
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    const __m256 xv = _mm256_loadu_ps(left + l);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rp[i] + l), xv, acc[i]);
  }
  if (l < L) {
    const __m256i m = tail8(L - l);
    const __m256 xv = _mm256_maskload_ps(left + l, m);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(rp[i] + l, m), xv, acc[i]);
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

void shrink(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const float* A,
            int64_t r, float* u) {
  for (int64_t k0 = 0; k0 < K; k0 += kShrinkChunk) {
    const int64_t kc = std::min(kShrinkChunk, K - k0);
    for (int64_t i = 0; i < nrows; ++i) {
      const float* xr = xf + rows[i] * K + k0;
      float* ur = u + rows[i] * r;
      for (int64_t j0 = 0; j0 < r; j0 += 8) {
        const __m256i m = tail8(r - j0);
        const __m256 d = dots(xr, A + j0 * K + k0, K, std::min<int64_t>(8, r - j0), kc);
        _mm256_maskstore_ps(ur + j0, m, _mm256_add_ps(_mm256_maskload_ps(ur + j0, m), d));
      }
    }
  }
}

void expand_row(const float* u, const float* B, int64_t r, int64_t n0, int64_t n1, float s,
                void* y, DType dt, int64_t yrow, int64_t N) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nr = std::min<int64_t>(8, n1 - n);
    add_out(y, dt, yrow * N + n, nr, sv, dots(u, B + n * r, r, nr, r));
  }
}

void expand_rows(const float* u, int64_t r, const int64_t* rows, int64_t nrows, const float* B,
                 int64_t n0, int64_t n1, float s, void* y, DType dt, int64_t N, float* bt) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i stride = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                            _mm256_set1_epi32(static_cast<int>(r)));
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nr = std::min<int64_t>(8, n1 - n);
    const __m256i m = tail8(nr);
    for (int64_t j = 0; j < r; ++j)  // bt[j][c] = B[n + c][j]
      _mm256_storeu_ps(bt + j * 8, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), B + n * r + j, stride,
                                                            _mm256_castsi256_ps(m), 4));
    for (int64_t i = 0; i < nrows; ++i) {
      const float* ur = u + rows[i] * r;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < r; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(ur[j]), _mm256_loadu_ps(bt + j * 8), acc);
      add_out(y, dt, rows[i] * N + n, nr, sv, acc);
    }
  }
}

}  // namespace

const MultiLoraKernels kMultiLoraAvx2 = {shrink, expand_row, expand_rows};

}  // namespace nf4lora
