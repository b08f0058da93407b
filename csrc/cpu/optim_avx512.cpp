// AVX-512 fused AdamW update, 16 lanes of float32 at a time (dispatch: optim.cpp, when use_avx512();
// the AVX2 twin in optim_avx2.cpp is the fallback). The same float32 operations in the same order
// as adamw_elem (csrc/ref/optim_ref.h), so the results are bit-identical to the reference (the
// library builds with -ffp-contract=off: no mul+add here becomes an FMA).
//   32-bit: load p, g (fp32/fp16/bf16), m, v -> update -> store p, m, v.
//   8-bit, per block of 256, two passes as the AVX2 kernel: pass 1 decodes m and v from the code
//          tables held in zmm registers (vpermt2ps + mask blends), updates, stores p and keeps the
//          float32 m, v of the block in L1 with their absmax; pass 2 requantizes through the key
//          table (Code8Lut in optim.h; scalar table loads), the compare/tie logic on mask
//          registers, and vpmovdb narrows 16 codes to 16 bytes per store.
//
// NOTE: only file-local functions here (see linear_avx512.cpp): a header inline that does not
// inline is emitted as a weak symbol with AVX-512 code and the linker may keep that copy for
// baseline callers. Hence the local inv_scale (the same operations as nf4_inv_scale).
#include <immintrin.h>


#include "cpu/optim.h"
#include "nf4lora/dynamic_map.h"

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

// 16 codes (bytes) -> 16 float32 values code[q] * absmax. The 256-entry code table sits in 16
// zmm (T): vpermt2ps picks within each 32-entry pair by the low 5 bits, three mask blends by bits
// 5, 6, 7. Measured here (Zen 4): a little faster than vgatherdps or 16 scalar loads.
inline __m512 decode16(const uint8_t* q, const __m512* T, __m512 absmax) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  __m512 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(T[2 * k], idx, T[2 * k + 1]);
  const __mmask16 m5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 m6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 m7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  for (int k = 0; k < 4; ++k) r[k] = _mm512_mask_blend_ps(m5, r[2 * k], r[2 * k + 1]);
  for (int k = 0; k < 2; ++k) r[k] = _mm512_mask_blend_ps(m6, r[2 * k], r[2 * k + 1]);
  return _mm512_mul_ps(_mm512_mask_blend_ps(m7, r[0], r[1]), absmax);
}

// Table loads are scalar: vpgatherdd from the 256 KB key table measured slower here (12.5 vs
// 11.4 ms per 10M-param step), and a vectorised 8-level binary search over the midpoints with
// vpermps/vpermt2ps probes twice as slow.
inline __m128i encode16(__m512 x, const uint32_t* lut) {
  const __m512i xb = _mm512_castps_si512(x);
  __m512i e;
  {
    alignas(64) uint32_t key[16];
    _mm512_store_si512(key, _mm512_srli_epi32(xb, 16));
    e = _mm512_setr_epi32(
        static_cast<int>(lut[key[0]]), static_cast<int>(lut[key[1]]), static_cast<int>(lut[key[2]]),
        static_cast<int>(lut[key[3]]), static_cast<int>(lut[key[4]]), static_cast<int>(lut[key[5]]),
        static_cast<int>(lut[key[6]]), static_cast<int>(lut[key[7]]), static_cast<int>(lut[key[8]]),
        static_cast<int>(lut[key[9]]), static_cast<int>(lut[key[10]]), static_cast<int>(lut[key[11]]),
        static_cast<int>(lut[key[12]]), static_cast<int>(lut[key[13]]), static_cast<int>(lut[key[14]]),
        static_cast<int>(lut[key[15]]));
  }
  const __m512 mid = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      xb, e, _mm512_set1_epi32(static_cast<int>(0xffff0000u)), 0xE4));  // c ? a : b, bitwise
  const __mmask16 has = _mm512_test_epi32_mask(e, _mm512_set1_epi32(1 << 24));
  const __mmask16 gt = _mm512_mask_cmp_ps_mask(has, x, mid, _CMP_GT_OQ);
  const __mmask16 eq = _mm512_mask_cmp_ps_mask(has, x, mid, _CMP_EQ_OQ);
  __m512i c = _mm512_and_si512(_mm512_srli_epi32(e, 16), _mm512_set1_epi32(0xff));
  const __m512i one = _mm512_set1_epi32(1);
  c = _mm512_mask_add_epi32(c, gt, c, one);
  // exact tie x == mid (c is then the lower neighbour): take the even one of (c, c + 1)
  c = _mm512_mask_add_epi32(c, _mm512_mask_test_epi32_mask(eq, c, one), c, one);
  return _mm512_cvtepi32_epi8(c);
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

void adamw32_elems_avx512(void* param, const void* grad, DType dtype, float* m, float* v,
                          int64_t i0, int64_t i1, const AdamWScalars& s) {
  const Consts k(s);
  for (int64_t i = i0; i < i1; i += 16) {
    __m512 mm = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
    const __m512 p = adamw16(load16(param, dtype, i), load16(grad, dtype, i), &mm, &vv, k);
    store16(param, dtype, i, p);
    _mm512_storeu_ps(m + i, mm);
    _mm512_storeu_ps(v + i, vv);
  }
}

void adamw8_blocks_avx512(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                          float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                          const AdamWScalars& s, const uint32_t* lut_m, const uint32_t* lut_v) {
  static_assert(kOptimBlock % 16 == 0, "16 lanes per step");
  const Consts k(s);
  __m512 TM[16], TV[16];
  for (int t = 0; t < 16; ++t) {
    TM[t] = _mm512_loadu_ps(kDynamicSigned + 16 * t);
    TV[t] = _mm512_loadu_ps(kDynamicUnsigned + 16 * t);
  }
  alignas(64) float mb[kOptimBlock], vb[kOptimBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * kOptimBlock;
    const __m512 sm = _mm512_set1_ps(absmax_m[b]), sv = _mm512_set1_ps(absmax_v[b]);
    __m512 amax_m = _mm512_setzero_ps(), amax_v = _mm512_setzero_ps();
    for (int j = 0; j < kOptimBlock; j += 16) {
      const int64_t i = base + j;
      __m512 mm = decode16(qm + i, TM, sm);
      __m512 vv = decode16(qv + i, TV, sv);
      const __m512 p = adamw16(load16(param, dtype, i), load16(grad, dtype, i), &mm, &vv, k);
      store16(param, dtype, i, p);
      _mm512_store_ps(mb + j, mm);
      _mm512_store_ps(vb + j, vv);
      amax_m = _mm512_max_ps(amax_m, abs16(mm));
      amax_v = _mm512_max_ps(amax_v, abs16(vv));
    }
    const float am = hmax16(amax_m), av = hmax16(amax_v);
    absmax_m[b] = am;
    absmax_v[b] = av;
    const __m512 inv_m = _mm512_set1_ps(inv_scale(am)), inv_v = _mm512_set1_ps(inv_scale(av));
    for (int j = 0; j < kOptimBlock; j += 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + base + j),
                       encode16(_mm512_mul_ps(_mm512_load_ps(mb + j), inv_m), lut_m));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qv + base + j),
                       encode16(_mm512_mul_ps(_mm512_load_ps(vb + j), inv_v), lut_v));
    }
  }
}

void code8_encode_avx512(const float* x, int64_t n16, const uint32_t* lut, uint8_t* out) {
  for (int64_t i = 0; i < n16; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), encode16(_mm512_loadu_ps(x + i), lut));
}

}  // namespace nf4lora
