// AVX-512 GEMV forward of the CPU fused QLoRA linear, M <= kGemv512MaxRows = 8 (dispatch and
// epilogues: linear.cpp; the AVX2 GEMV in linear_avx2.cpp is the fallback on AVX2-only CPUs).
//
// NF4 decode, 32 codes per 16-byte load, 4 instructions: vpmovzxbd widens the 16 packed bytes to 16
// int32 lanes; vpermps (_mm512_permutexvar_ps) against a zmm holding the 16 exact float32 code
// values reads only bits [3:0] of each index, so the byte itself indexes its LOW nibble (element
// 2i + 1) with no mask, and the byte >> 4 its HIGH nibble (element 2i). Output order per 32
// elements: hi = [e0 e2 .. e30], lo = [e1 e3 .. e31]; linear.cpp (permute_even_odd) puts x in that
// order once per call, so the hot loop has no further shuffle (AVX2 needs ~12 shuffle uops for 32).
//
// Scale: one per NF4 block. Per block, 2 fresh accumulators per activation row (hi and lo chains)
// take the unscaled code values; one FMA per row folds them in with the block's absmax. Blocks
// never split a 32-aligned group (blocksize >= 32, K % 32 == 0), so a row's groups tile its blocks.
// Math: code value (exact fp32) * x summed in fp32, then * absmax: the reference's products up to
// summation order, as the AVX2 GEMV.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/linear.h"
#include "cpu/simd_avx512.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace avx512lin {

namespace {

// NOTE: only file-local functions here (and the anonymous-namespace helpers of simd_avx512.h). A
// header inline that does not inline (NF4Scales::block did not) is emitted as a weak symbol compiled
// with AVX-512 flags, and the linker may keep that copy for the baseline-x86-64 callers too: SIGILL
// on a CPU without AVX-512. So the block scales come from avx512::block_scales (the same two
// roundings as dq_absmax: code8[q] * absmax2, then + offset; no FMA contraction).

// 16 packed bytes (32 codes) at src -> hi (even elements), lo (odd elements) as fp32 code values.
inline void decode32(const uint8_t* src, __m512 table, __m512& hi, __m512& lo) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  lo = _mm512_permutexvar_ps(b, table);                         // index bits [3:0] = low nibble
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);  // high nibble
}

// G groups of 32 codes (one NF4 block, or a row's share of one) against MT activation rows:
// fresh unscaled accumulators, folded into acc with the block's absmax by one FMA per row.
template <int MT, int G>
inline void block_dot(const uint8_t* src, const float* xp, int64_t K, int64_t k, float scale, __m512 table,
                      __m512* acc) {
  __m512 ab_hi[MT], ab_lo[MT];  // fresh chains per block, so consecutive blocks overlap
  for (int m = 0; m < MT; ++m) ab_hi[m] = ab_lo[m] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m512 hi, lo;
    decode32(src + 16 * g, table, hi, lo);
    for (int m = 0; m < MT; ++m) {
      ab_hi[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * K + k + 32 * g), ab_hi[m]);
      ab_lo[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * K + k + 32 * g + 16), ab_lo[m]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(ab_hi[m], ab_lo[m]), s, acc[m]);
}

// W row n against MT activation rows (xp permuted, [MT, K] with row stride K) -> out[0:MT].
// G = blocksize / 32 when every block lies inside the row (K % blocksize == 0; the hot case,
// fully unrolled), else 0: blocks cut at row ends, G groups counted at run time.
// `scale` is scratch for the row's block scales (K / 32 + 2 floats).
template <int MT, int G>
inline void gemv_row(const NF4Weight& w, __m512 table, int64_t n, const float* xp, float* scale, float* out) {
  const int64_t K = w.K;
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t flat0 = n * K;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));  // blocksize is 2^lb
  const int64_t bfirst = flat0 >> lb;
  avx512::block_scales(w.scales, bfirst, ((flat0 + K - 1) >> lb) - bfirst + 1, scale);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  if (G > 0) {
    for (int64_t k = 0, b = 0; k < K; k += 32 * G, ++b) {
      // one prefetch per 64-byte line, 4 KB ahead of the stream (rows are contiguous; 1 KB was
      // too close to cover DRAM latency at this rate, bench/bench_gemv.py)
      if (G >= 4 || (k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + 4096), _MM_HINT_T0);
      block_dot<MT, (G > 0 ? G : 1)>(row + k / 2, xp, K, k, scale[b], table, acc);
    }
  } else {
    for (int64_t k = 0; k < K;) {
      const int64_t b = (flat0 + k) >> lb;
      const int64_t seg_end = std::min(K, ((b + 1) << lb) - flat0);
      for (; k < seg_end; k += 32) {
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + 1024), _MM_HINT_T0);
        // one group at a time, each folded with the block's scale (the reference's products)
        block_dot<MT, 1>(row + k / 2, xp, K, k, scale[b - bfirst], table, acc);
      }
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

template <int MT>
void gemv_rows(const NF4Weight& w, __m512 table, const float* xp, int64_t n0, int64_t n1, float* scale,
               float* y_acc) {
  const bool aligned = w.K % w.blocksize == 0;
  float out[kGemv512MaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    if (aligned && w.blocksize == 64)
      gemv_row<MT, 2>(w, table, n, xp, scale, out);
    else if (aligned && w.blocksize == 128)
      gemv_row<MT, 4>(w, table, n, xp, scale, out);
    else if (aligned && w.blocksize == 32)
      gemv_row<MT, 1>(w, table, n, xp, scale, out);
    else
      gemv_row<MT, 0>(w, table, n, xp, scale, out);
    for (int m = 0; m < MT; ++m) y_acc[m * w.N + n] = out[m];
  }
}

}  // namespace

void gemv_forward(const NF4Weight& w, const float* xp, int64_t M, int64_t n0, int64_t n1,
                  float* y_acc) {
  const __m512 table = _mm512_loadu_ps(kNF4);
  std::vector<float> scale(static_cast<size_t>(w.K / 32 + 2));
  switch (M) {
    case 1: gemv_rows<1>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 2: gemv_rows<2>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 3: gemv_rows<3>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 4: gemv_rows<4>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 5: gemv_rows<5>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 6: gemv_rows<6>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    case 7: gemv_rows<7>(w, table, xp, n0, n1, scale.data(), y_acc); break;
    default: gemv_rows<8>(w, table, xp, n0, n1, scale.data(), y_acc); break;
  }
}

}  // namespace avx512lin
}  // namespace nf4lora
