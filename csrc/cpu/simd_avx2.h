// AVX2 helpers shared by the *_avx2.cpp kernels (include only from those files: it needs -mavx2).
// 8 lanes of float32 in a __m256; loads/stores convert from/to fp32, fp16 (F16C) and bf16.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace avx2 {

inline __m256 load8(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kF32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case DType::kF16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    default: {
      const __m128i h =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// float32 -> bf16 with round-to-nearest-even (inputs are finite here), 8 lanes -> 8 x u16.
inline __m128i f32_to_bf16_8(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  u = _mm256_srli_epi32(u, 16);
  const __m256i packed = _mm256_packus_epi32(u, u);  // per 128-bit lane
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

inline void store8(void* p, DType d, int64_t i, __m256 v) {
  switch (d) {
    case DType::kF32: _mm256_storeu_ps(static_cast<float*>(p) + i, v); break;
    case DType::kF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), f32_to_bf16_8(v));
      break;
  }
}

// 16-entry NF4 table as two 8-lane halves; lookup of 8 int32 codes in [0, 15]:
// vpermps picks by the low 3 bits, the blend by bit 3 (moved to the sign bit).
struct NF4Table {
  __m256 lo, hi;
  NF4Table() : lo(_mm256_loadu_ps(kNF4)), hi(_mm256_loadu_ps(kNF4 + 8)) {}
  inline __m256 lookup(__m256i codes) const {
    const __m256 a = _mm256_permutevar8x32_ps(lo, codes);
    const __m256 b = _mm256_permutevar8x32_ps(hi, codes);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  }
};

// 4 packed bytes (8 codes, element order: hi nibble of byte 0 first) -> 8 int32 codes.
inline __m256i unpack8_codes(const uint8_t* p) {
  uint32_t w;
  __builtin_memcpy(&w, p, 4);
  const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(w)));  // bytes 0..3 dup
  // lanes j = 0..7 want byte j/2, nibble (j even: hi, odd: lo).
  const __m256i idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i bytes = _mm256_permutevar8x32_epi32(b, idx);
  const __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  return _mm256_and_si256(_mm256_srlv_epi32(bytes, shift), _mm256_set1_epi32(15));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace avx2
}  // namespace nf4lora
