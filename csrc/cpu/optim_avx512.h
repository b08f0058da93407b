// AVX-512 pieces shared by the AdamW kernels optim_avx512.cpp (32-bit state) and
// optim8_avx512vbmi.cpp (8-bit state); include only from those files (they need -mavx512*).
// 16 lanes of float32; the same float32 operations in the same order as adamw_elem
// (csrc/ref/optim_ref.h), so results are bit-identical to the reference (the library builds with
// -ffp-contract=off: no mul+add here becomes an FMA).
//
// NOTE: everything here has internal linkage (anonymous namespace). The two including files are
// compiled with different flags (VBMI or not); a shared inline emitted as a weak symbol by both
// could leave the linker keeping the VBMI copy for the other file's callers.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/nf4.h"
#include "ref/optim_ref.h"

namespace nf4lora {
namespace {

struct Consts {
  __m512 decay, beta2, omb1, omb2, step, bias2_sqrt, eps;
  explicit Consts(const AdamWScalars& s)
      : decay(_mm512_set1_ps(s.decay)),
        beta2(_mm512_set1_ps(s.beta2)),
        omb1(_mm512_set1_ps(s.one_minus_beta1)),
        omb2(_mm512_set1_ps(s.one_minus_beta2)),
        step(_mm512_set1_ps(s.step_size)),
        bias2_sqrt(_mm512_set1_ps(s.bias2_sqrt)),
        eps(_mm512_set1_ps(s.eps)) {}
};

inline __m512 load16(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kF32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    case DType::kF16:
      return _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    default: {
      const __m256i h =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

inline void store16(void* p, DType d, int64_t i, __m512 v) {
  switch (d) {
    case DType::kF32: _mm512_storeu_ps(static_cast<float*>(p) + i, v); break;
    case DType::kF16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: {  // bf16, round to nearest even (finite inputs), as avx2::f32_to_bf16_8
      __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
      break;
    }
  }
}

// adamw_elem on 16 lanes; returns the new p, updates m and v.
inline __m512 adamw16(__m512 p, __m512 g, __m512* m, __m512* v, const Consts& k) {
  const __m512 m1 = _mm512_add_ps(*m, _mm512_mul_ps(k.omb1, _mm512_sub_ps(g, *m)));
  const __m512 v1 =
      _mm512_add_ps(_mm512_mul_ps(*v, k.beta2), _mm512_mul_ps(_mm512_mul_ps(k.omb2, g), g));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), k.bias2_sqrt), k.eps);
  *m = m1;
  *v = v1;
  return _mm512_sub_ps(_mm512_mul_ps(p, k.decay), _mm512_mul_ps(k.step, _mm512_div_ps(m1, denom)));
}

inline __m512 abs16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
}

// Horizontal max, as avx2::hmax (the max of non-negative values, order does not matter).
inline float hmax16(__m512 v) {
  __m256 a = _mm256_max_ps(_mm512_castps512_ps256(v),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float inv_scale(float absmax) {  // nf4_inv_scale
  return 1.0f / (absmax > kMinAbsmax ? absmax : kMinAbsmax);
}

}  // namespace
}  // namespace nf4lora
