// AVX2 NF4 quantize/dequantize over full blocks (blocksize is a power of two >= 32, so a block is a
// whole number of 32-element groups and starts on a byte boundary).
//   quantize:   32 values -> 4 x (15 compares against the midpoints) -> 32 codes -> 16 bytes
//   dequantize: 4 bytes -> 8 codes -> vpermps table lookup -> * absmax -> fp32/fp16/bf16
#include <cmath>

#include "cpu/quantize.h"
#include "cpu/simd_avx2.h"

namespace nf4lora {

namespace {

// Codes of 8 scaled values: count of midpoints strictly below x (cmp gives -1 per hit).
inline __m256i encode8(__m256 x, const __m256* mid) {
  __m256i q = _mm256_setzero_si256();
  for (int t = 0; t < 15; ++t)
    q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(x, mid[t], _CMP_GT_OQ)));
  return q;
}

// 4 x 8 int32 codes (elements 0..31 in order) -> 16 packed bytes (even element in the high nibble).
inline __m128i pack32_codes(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  __m256i bytes = _mm256_packs_epi16(ab, cd);
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // 16-bit lane i holds (code 2i) | (code 2i+1) << 8  ->  (code 2i) << 4 | (code 2i+1)
  const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(bytes, 4), _mm256_set1_epi16(0x00f0));
  const __m256i lo = _mm256_srli_epi16(bytes, 8);
  const __m256i words = _mm256_or_si256(hi, lo);
  const __m256i packed = _mm256_packus_epi16(words, words);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

}  // namespace

void nf4_quantize_blocks_avx2(const void* w, DType dtype, int64_t blocksize, int64_t b0, int64_t b1,
                              uint8_t* packed, float* absmax, bool* nonfinite) {
  __m256 mid[15];
  for (int t = 0; t < 15; ++t) mid[t] = _mm256_set1_ps(kNF4Mid[t]);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * blocksize;
    __m256 amax = _mm256_setzero_ps();
    __m256 notfinite = _mm256_setzero_ps();
    for (int64_t i = begin; i < begin + blocksize; i += 8) {
      const __m256 a = _mm256_and_ps(avx2::load8(w, dtype, i), abs_mask);
      amax = _mm256_max_ps(amax, a);
      notfinite = _mm256_or_ps(notfinite, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    }
    if (_mm256_movemask_ps(notfinite)) bad = true;
    const float am = avx2::hmax(amax);
    absmax[b] = am;
    const __m256 inv = _mm256_set1_ps(nf4_inv_scale(am));
    for (int64_t i = begin; i < begin + blocksize; i += 32) {
      const __m256i c0 = encode8(_mm256_mul_ps(avx2::load8(w, dtype, i), inv), mid);
      const __m256i c1 = encode8(_mm256_mul_ps(avx2::load8(w, dtype, i + 8), inv), mid);
      const __m256i c2 = encode8(_mm256_mul_ps(avx2::load8(w, dtype, i + 16), inv), mid);
      const __m256i c3 = encode8(_mm256_mul_ps(avx2::load8(w, dtype, i + 24), inv), mid);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), pack32_codes(c0, c1, c2, c3));
    }
  }
  if (bad) *nonfinite = true;
}

void nf4_dequantize_blocks_avx2(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                                int64_t b0, int64_t b1, void* out, DType dtype) {
  const avx2::NF4Table table;
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 scale = _mm256_set1_ps(scales.block(b));
    const int64_t begin = b * blocksize;
    for (int64_t i = begin; i < begin + blocksize; i += 8) {
      const __m256 v = _mm256_mul_ps(table.lookup(avx2::unpack8_codes(packed + i / 2)), scale);
      avx2::store8(out, dtype, i, v);
    }
  }
}

}  // namespace nf4lora
