// AVX2 NF4 quantize/dequantize over full blocks (blocksize is a power of two >= 32, so a block is a
// whole number of 32-element groups and starts on a byte boundary).
//   quantize:   32 values -> 4 x (15 compares against the midpoints) -> 32 codes -> 16 bytes
//   dequantize: per block a 16-entry table of code * absmax in the output type, then 16 bytes ->
//               32 codes -> table lookup (vpshufb on byte planes for 16-bit, vpermps for fp32)
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

// ---------------------------------------------------------------------------------------------
// Dequantize. Every output element is round(code_value[c] * absmax[b]) for one of 16 codes, so per
// block we compute the 16 products once (float32, exactly as the scalar rule: one multiply, then
// RNE to the output type) and the body of the block is a pure 16-entry table lookup:
//   16-bit outputs (bf16, fp16): the table is split into a low-byte and a high-byte plane of 16
//     bytes each; vpshufb looks up 32 codes per plane at once, unpack interleaves the bytes.
//   fp32: the 16 products as two 8-lane halves, vpermps + blend by code bit 3.
// Codes of 16 packed bytes (32 elements): high nibble = even element, low nibble = odd element.

namespace {

// 16 packed bytes -> 32 codes as bytes, in element order: lane 0 = elements 0..15, lane 1 = 16..31.
inline __m256i codes32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  const __m128i lo = _mm_and_si128(b, nib);
  return _mm256_setr_m128i(_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo));
}

// Per-block 16-bit table (bf16 or fp16 bits of code_value * scale) as byte planes, both lanes.
struct Table16 {
  __m256i lo, hi;
};

template <DType D>
inline Table16 make_table16(float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(kNF4), s);
  const __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(kNF4 + 8), s);
  __m128i h0, h1;  // 8 x u16 each: codes 0..7, 8..15
  if constexpr (D == DType::kBF16) {
    h0 = avx2::f32_to_bf16_8(v0);
    h1 = avx2::f32_to_bf16_8(v1);
  } else {
    h0 = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h1 = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // bytes of each u16 -> [8 low bytes | 8 high bytes]
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i s0 = _mm_shuffle_epi8(h0, split), s1 = _mm_shuffle_epi8(h1, split);
  return {_mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1)),
          _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1))};
}

// 32 codes -> 32 x u16 at out (64 bytes).
inline void lookup_store16(const Table16& t, __m256i c, uint16_t* out) {
  const __m256i l = _mm256_shuffle_epi8(t.lo, c);
  const __m256i h = _mm256_shuffle_epi8(t.hi, c);
  const __m256i a = _mm256_unpacklo_epi8(l, h);  // lane 0: elements 0..7,  lane 1: 16..23
  const __m256i b = _mm256_unpackhi_epi8(l, h);  // lane 0: elements 8..15, lane 1: 24..31
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(a, b, 0x31));
}

template <DType D>
void dequantize16(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize, int64_t b0,
                  int64_t b1, uint16_t* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const Table16 t = make_table16<D>(scales.block(b));
    const int64_t begin = b * blocksize, end = begin + blocksize;
    for (int64_t i = begin; i < end; i += 32) lookup_store16(t, codes32(packed + i / 2), out + i);
  }
}

void dequantize32(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize, int64_t b0,
                  int64_t b1, float* out) {
  const __m256 c0 = _mm256_loadu_ps(kNF4), c1 = _mm256_loadu_ps(kNF4 + 8);
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 s = _mm256_set1_ps(scales.block(b));
    const __m256 t0 = _mm256_mul_ps(c0, s), t1 = _mm256_mul_ps(c1, s);  // the 16 products
    const int64_t begin = b * blocksize, end = begin + blocksize;
    for (int64_t i = begin; i < end; i += 32) {
      const __m256i c = codes32(packed + i / 2);
      const __m128i q[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
      for (int h = 0; h < 2; ++h) {
        for (int k = 0; k < 2; ++k) {
          const __m256i idx = _mm256_cvtepu8_epi32(k ? _mm_srli_si128(q[h], 8) : q[h]);
          const __m256 a = _mm256_permutevar8x32_ps(t0, idx);
          const __m256 bb = _mm256_permutevar8x32_ps(t1, idx);
          const __m256 v = _mm256_blendv_ps(a, bb, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
          _mm256_storeu_ps(out + i + 16 * h + 8 * k, v);
        }
      }
    }
  }
}

}  // namespace

void nf4_dequantize_blocks_avx2(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                                int64_t b0, int64_t b1, void* out, DType dtype) {
  switch (dtype) {
    case DType::kF32:
      dequantize32(packed, scales, blocksize, b0, b1, static_cast<float*>(out));
      break;
    case DType::kF16:
      dequantize16<DType::kF16>(packed, scales, blocksize, b0, b1, static_cast<uint16_t*>(out));
      break;
    default:
      dequantize16<DType::kBF16>(packed, scales, blocksize, b0, b1, static_cast<uint16_t*>(out));
      break;
  }
}

}  // namespace nf4lora
