// AVX-512 F/BW helpers shared by the AVX-512 linear kernels (include only from files compiled with
// AVX-512 flags: *_avx512.cpp). 16 fp32 lanes in a __m512; masked loads/stores for tails; the
// dropout mask of csrc/include/nf4lora/dropout.h on 16 lanes. Everything is in an anonymous
// namespace, so no out-of-line copy compiled with AVX-512 flags can reach a baseline caller.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace {
namespace avx512 {

// The first n (capped at 16) lanes
inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : (n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1));
}

inline __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 fp32 -> 16 bf16 words, round to nearest even, NaN kept quiet (as f32_to_bf16 in dtype.h)
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// Elements [i, i + 16) of a typed buffer as fp32; lanes outside `mask` read nothing and are 0.
inline __m512 load16(const void* p, DType d, int64_t i, __mmask16 mask) {
  switch (d) {
    case DType::kF32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
    case DType::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    default: return from_bf16(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
  }
}

// dropout.h's hash32 on 16 lanes
inline __m512i hash32v(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x6d2b79f5));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// v * keep * scale for the 16 columns k0.. of the row whose hash is row_hash (DropoutMask::apply)
inline __m512 apply_dropout(const DropoutMask& d, uint32_t row_hash, int64_t k0, __m512 v) {
  const __m512i k = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(row_hash + static_cast<uint32_t>(k0))),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(hash32v(k), 8),
                                                 _mm512_set1_epi32(static_cast<int32_t>(d.threshold)));
  return _mm512_maskz_mul_ps(keep, v, _mm512_set1_ps(d.scale));
}

// Absmax of block b with the two roundings of dq_absmax (code8[q] * absmax2, then + offset; no
// FMA): the scalar twin of block_scales, for element-wise tails.
inline float block_scale(const NF4Scales& s, int64_t b) {
  if (s.qabsmax == nullptr) return s.absmax[b];
  const float scaled = s.code8[s.qabsmax[b]] * s.absmax2[b / kNestedBlocksize];
  return scaled + s.offset;
}

// Absmax of blocks [b0, b0 + n) -> dst, 16 at a time (the double-quantized ones with the two
// roundings of dq_absmax: code8[q] * absmax2, then + offset; separate instructions, no FMA).
inline void block_scales(const NF4Scales& sc, int64_t b0, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail16(n - i);
    if (sc.qabsmax == nullptr) {
      _mm512_mask_storeu_ps(dst + i, mk, _mm512_maskz_loadu_ps(mk, sc.absmax + b0 + i));
      continue;
    }
    const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, sc.qabsmax + b0 + i));
    const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, q, sc.code8, 4);
    const __m512i blk = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(b0 + i)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512 a2 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, _mm512_srli_epi32(blk, 8), sc.absmax2, 4);
    _mm512_mask_storeu_ps(dst + i, mk, _mm512_add_ps(_mm512_mul_ps(c, a2), _mm512_set1_ps(sc.offset)));
  }
}

}  // namespace avx512
}  // namespace
}  // namespace nf4lora
