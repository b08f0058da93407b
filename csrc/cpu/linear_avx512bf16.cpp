// AVX512-BF16 micro-kernel of the bf16 linear path (csrc/cpu/linear_bf16.h), for CPUs with
// VDPBF16PS and no AMX (AMD Zen 4). The same 32 x 32 block as the AMX kernel, 8 rows at a time:
// 16 zmm accumulators (8 rows x 2 column vectors); per k-pair one VDPBF16PS against the
// broadcast A pair (2 bf16 of one row) and each of the two B tile rows (16 columns x 2 bf16).
#include <immintrin.h>

#include <cstring>

#include "cpu/linear_bf16.h"

namespace nf4lora {
namespace bf16lin {

namespace {

void noop() {}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

template <int R, int NV>
inline void rows_block(const uint16_t* a, int64_t a_step, int64_t lda, const uint16_t* b0,
                       const uint16_t* b1, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                       bool accumulate) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* as = a + s * a_step;
    const uint16_t* t0 = b0 + s * b_step;
    const uint16_t* t1 = b1 + s * b_step;
    for (int kp = 0; kp < 16; ++kp) {
      __m512bh v[NV];
      v[0] = as_bh(_mm512_loadu_si512(t0 + kp * 32));
      if (NV == 2) v[NV - 1] = as_bh(_mm512_loadu_si512(t1 + kp * 32));
      for (int i = 0; i < R; ++i) {
        int32_t pair;
        std::memcpy(&pair, as + i * lda + 2 * kp, 4);
        const __m512bh ai = as_bh(_mm512_set1_epi32(pair));
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, v[j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

void dpbf16_block(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t lda,
                  const uint16_t* b0, const uint16_t* b1, int64_t b_step, int64_t steps, float* c,
                  int64_t ldc, bool accumulate) {
  // a1 / b1 null: 16 rows / 16 columns only (remainders), as the AMX kernel
  auto rows = b1 ? rows_block<8, 2> : rows_block<8, 1>;
  for (int half = 0; half < (a1 ? 2 : 1); ++half) {
    const uint16_t* a = half ? a1 : a0;
    float* ch = c + half * 16 * ldc;
    rows(a, a_step, lda, b0, b1, b_step, steps, ch, ldc, accumulate);
    rows(a + 8 * lda, a_step, lda, b0, b1, b_step, steps, ch + 8 * ldc, ldc, accumulate);
  }
}

}  // namespace

const TileKernel kDpbf16Kernel = {"avx512_bf16", 8, noop, noop, dpbf16_block};

}  // namespace bf16lin
}  // namespace nf4lora
