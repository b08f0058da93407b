// AVX-512 GEMV forward of the CPU fused QLoRA linear, M <= 4 (dispatch and epilogues: linear.cpp;
// the AVX2 GEMV in linear_avx2.cpp is the fallback and serves 4 < M <= kGemvMaxRows).
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

#include "cpu/linear.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace avx512lin {

namespace {

// NOTE: only file-local functions here. A header inline that does not inline (NF4Scales::block did
// not) is emitted as a weak symbol compiled with AVX-512 flags, and the linker may keep that copy
// for the baseline-x86-64 callers too: SIGILL on a CPU without AVX-512. So the absmax is read here
// with the same two roundings as dq_absmax (code8[q] * absmax2, then + offset; no FMA contraction).
inline float block_scale(const NF4Scales& s, int64_t b) {
  if (s.qabsmax == nullptr) return s.absmax[b];
  const float scaled = s.code8[s.qabsmax[b]] * s.absmax2[b / kNestedBlocksize];
  return scaled + s.offset;
}

// 16 packed bytes (32 codes) at src -> hi (even elements), lo (odd elements) as fp32 code values.
inline void decode32(const uint8_t* src, __m512 table, __m512& hi, __m512& lo) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  lo = _mm512_permutexvar_ps(b, table);                         // index bits [3:0] = low nibble
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);  // high nibble
}

// Columns [k0, k1) of W row n against MT activation rows (xp permuted, [MT, K] with row stride K)
// -> out[0:MT] (partial sums; k0, k1 multiples of 32).
template <int MT>
inline void gemv_row(const NF4Weight& w, __m512 table, int64_t n, const float* xp, int64_t k0,
                     int64_t k1, float* out) {
  const int64_t K = w.K;
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t flat0 = n * K;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));  // blocksize is 2^lb
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1;) {
    const int64_t b = (flat0 + k) >> lb;
    const int64_t seg_end = std::min(k1, ((b + 1) << lb) - flat0);
    __m512 ab_hi[MT], ab_lo[MT];  // this block's unscaled sums: fresh chains, so blocks overlap
    for (int m = 0; m < MT; ++m) ab_hi[m] = ab_lo[m] = _mm512_setzero_ps();
    for (; k < seg_end; k += 32) {
      // one prefetch per 64-byte line, ~16 lines ahead of the stream
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + 1024), _MM_HINT_T0);
      __m512 hi, lo;
      decode32(row + k / 2, table, hi, lo);
      for (int m = 0; m < MT; ++m) {
        ab_hi[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * K + k), ab_hi[m]);
        ab_lo[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * K + k + 16), ab_lo[m]);
      }
    }
    const __m512 s = _mm512_set1_ps(block_scale(w.scales, b));
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(ab_hi[m], ab_lo[m]), s, acc[m]);
  }
  for (int m = 0; m < MT; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

}  // namespace

void gemv_forward(const NF4Weight& w, const float* xp, int64_t M, int64_t n0, int64_t n1,
                  float* y_acc) {
  const __m512 table = _mm512_loadu_ps(kNF4);
  const int64_t N = w.N, K = w.K;
  float out[kGemv512MaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    switch (M) {
      case 1: gemv_row<1>(w, table, n, xp, 0, K, out); break;
      case 2: gemv_row<2>(w, table, n, xp, 0, K, out); break;
      case 3: gemv_row<3>(w, table, n, xp, 0, K, out); break;
      default: gemv_row<4>(w, table, n, xp, 0, K, out); break;
    }
    for (int64_t m = 0; m < M; ++m) y_acc[m * N + n] = out[m];
  }
}

}  // namespace avx512lin
}  // namespace nf4lora
