// AVX-512 LoRA-side kernel of the CPU fused linear: dA [r, K] = s g^T D(x) (csrc/ref/linear_ref.h),
// for every activation dtype. A task owns 32 columns of dA; for a block of up to kRB rows of dA
// the 2 x kRB accumulators stay in zmm registers while the M rows of x stream by (one 64-byte
// segment per row: x[m, k0:k0+32] converted to fp32, the dropout mask applied on 16 lanes), each
// x vector feeding kRB FMAs against broadcast g[m, j]. Summation over m in order, as the reference.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <utility>

#include "cpu/linear.h"
#include "cpu/simd_avx512.h"

namespace nf4lora {
namespace avx512lin {

namespace {

constexpr int64_t kCols = 32;  // dA columns per task (two vectors)
constexpr int kRB = 12;        // dA rows per pass: 24 accumulators + operands fit 32 zmm

template <int JR>
void grad_block(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                int64_t j0, int64_t k0, float scaling, const DropoutMask& drop, float* dA) {
  const __mmask16 m0 = avx512::tail16(K - k0), m1 = avx512::tail16(K - k0 - 16);
  __m512 acc[JR][2];
  for (int j = 0; j < JR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    __m512 x0 = avx512::load16(x, dtype, m * K + k0, m0);
    __m512 x1 = avx512::load16(x, dtype, m * K + k0 + 16, m1);
    if (drop.active()) {
      const uint32_t rh = drop.row(m);
      x0 = avx512::apply_dropout(drop, rh, k0, x0);
      x1 = avx512::apply_dropout(drop, rh, k0 + 16, x1);
    }
    const float* gm = g + m * r + j0;
    for (int j = 0; j < JR; ++j) {
      const __m512 gj = _mm512_set1_ps(gm[j]);
      acc[j][0] = _mm512_fmadd_ps(gj, x0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(gj, x1, acc[j][1]);
    }
  }
  const __m512 s = _mm512_set1_ps(scaling);
  for (int j = 0; j < JR; ++j) {
    float* row = dA + (j0 + j) * K + k0;
    _mm512_mask_storeu_ps(row, m0, _mm512_mul_ps(acc[j][0], s));
    _mm512_mask_storeu_ps(row + 16, m1, _mm512_mul_ps(acc[j][1], s));
  }
}

template <int... J>
void grad_rows(int jr, std::integer_sequence<int, J...>, const float* g, const void* x, DType dtype,
               int64_t M, int64_t K, int64_t r, int64_t j0, int64_t k0, float scaling,
               const DropoutMask& drop, float* dA) {
  // jr in [1, kRB]: the instance with JR == jr
  ((J + 1 == jr ? grad_block<J + 1>(g, x, dtype, M, K, r, j0, k0, scaling, drop, dA) : void()), ...);
}

}  // namespace

void lora_grad_a(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                 float scaling, const DropoutMask& drop, float* dA) {
  const int64_t ntasks = (K + kCols - 1) / kCols;
#pragma omp parallel for schedule(dynamic, 4) if (M * K * r >= (1 << 18))
  for (int64_t t = 0; t < ntasks; ++t)
    for (int64_t j0 = 0; j0 < r; j0 += kRB)
      grad_rows(static_cast<int>(std::min<int64_t>(kRB, r - j0)), std::make_integer_sequence<int, kRB>{},
                g, x, dtype, M, K, r, j0, t * kCols, scaling, drop, dA);
}

}  // namespace avx512lin
}  // namespace nf4lora
