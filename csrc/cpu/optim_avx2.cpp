// AVX2 fused AdamW update, 8 lanes of float32 at a time, the same float32 operations in the same
// order as adamw_elem (csrc/ref/optim_ref.h), so the results are bit-identical to the reference
// (the library builds with -ffp-contract=off: no mul+add here becomes an FMA).
//   32-bit: load p, g (fp32/fp16/bf16), m, v -> update -> store p, m, v.      28 B/elem at fp32
//   8-bit, per block of 256: pass 1 dequantizes m and v (scalar loads from the 256-entry code),
//          updates, stores p and keeps the float32 m, v of the block in L1 with their absmax;
//          pass 2 requantizes through the key table (eight table loads + two compares per 8 values,
//          Code8Lut in optim.h) and packs 32 codes per store.                  16 B/elem at fp32
#include "cpu/optim.h"
#include "cpu/simd_avx2.h"
#include "nf4lora/dynamic_map.h"

namespace nf4lora {

namespace {

struct Consts {
  __m256 decay, beta2, omb1, omb2, step, bias2_sqrt, eps;
  explicit Consts(const AdamWScalars& s)
      : decay(_mm256_set1_ps(s.decay)),
        beta2(_mm256_set1_ps(s.beta2)),
        omb1(_mm256_set1_ps(s.one_minus_beta1)),
        omb2(_mm256_set1_ps(s.one_minus_beta2)),
        step(_mm256_set1_ps(s.step_size)),
        bias2_sqrt(_mm256_set1_ps(s.bias2_sqrt)),
        eps(_mm256_set1_ps(s.eps)) {}
};

// adamw_elem on 8 lanes; returns the new p, updates m and v.
inline __m256 adamw8(__m256 p, __m256 g, __m256* m, __m256* v, const Consts& k) {
  const __m256 m1 = _mm256_add_ps(*m, _mm256_mul_ps(k.omb1, _mm256_sub_ps(g, *m)));
  const __m256 v1 = _mm256_add_ps(_mm256_mul_ps(*v, k.beta2), _mm256_mul_ps(_mm256_mul_ps(k.omb2, g), g));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v1), k.bias2_sqrt), k.eps);
  *m = m1;
  *v = v1;
  return _mm256_sub_ps(_mm256_mul_ps(p, k.decay), _mm256_mul_ps(k.step, _mm256_div_ps(m1, denom)));
}

// 8 codes (bytes) -> 8 float32 values code[q] * absmax. Scalar table loads assembled into a
// vector: on the Zen machines this targets, vpgatherdd costs several times as much (measured:
// ~4 ns per 8-lane gather here; the 8-bit step went from 55 to 32 ms per 10M params, 1 thread).
inline __m256 decode8(const uint8_t* q, const float* code, __m256 absmax) {
  const __m256 vals = _mm256_setr_ps(code[q[0]], code[q[1]], code[q[2]], code[q[3]], code[q[4]],
                                     code[q[5]], code[q[6]], code[q[7]]);
  return _mm256_mul_ps(vals, absmax);
}

// Exact-nearest codes of 8 values through the key table (see Code8Lut).
inline __m256i encode8(__m256 x, const uint32_t* lut) {
  const __m256i xb = _mm256_castps_si256(x);
  alignas(32) uint32_t key[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(key), _mm256_srli_epi32(xb, 16));
  // scalar table loads, not vpgatherdd (see decode8)
  const __m256i e = _mm256_setr_epi32(static_cast<int>(lut[key[0]]), static_cast<int>(lut[key[1]]),
                                      static_cast<int>(lut[key[2]]), static_cast<int>(lut[key[3]]),
                                      static_cast<int>(lut[key[4]]), static_cast<int>(lut[key[5]]),
                                      static_cast<int>(lut[key[6]]), static_cast<int>(lut[key[7]]));
  const __m256i mid_bits = _mm256_or_si256(_mm256_and_si256(xb, _mm256_set1_epi32(static_cast<int>(0xffff0000u))),
                                           _mm256_and_si256(e, _mm256_set1_epi32(0xffff)));
  const __m256 mid = _mm256_castsi256_ps(mid_bits);
  const __m256i has = _mm256_cmpeq_epi32(_mm256_and_si256(e, _mm256_set1_epi32(1 << 24)),
                                         _mm256_set1_epi32(1 << 24));
  const __m256i gt = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, mid, _CMP_GT_OQ)), has);
  const __m256i eq = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, mid, _CMP_EQ_OQ)), has);
  __m256i c = _mm256_and_si256(_mm256_srli_epi32(e, 16), _mm256_set1_epi32(0xff));
  c = _mm256_sub_epi32(c, gt);  // gt is -1 where x > mid
  // exact tie x == mid (c is then the lower neighbour): take the even one of (c, c + 1)
  return _mm256_add_epi32(c, _mm256_and_si256(_mm256_and_si256(c, _mm256_set1_epi32(1)), eq));
}

// 4 x 8 int32 codes in [0, 255] (elements 0..31 in order) -> 32 bytes.
inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packus_epi32(a, b);   // a0-3 b0-3 | a4-7 b4-7
  const __m256i cd = _mm256_packus_epi32(c, d);
  const __m256i bytes = _mm256_packus_epi16(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline __m256 abs8(__m256 x) {
  return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

}  // namespace

void adamw32_elems_avx2(void* param, const void* grad, DType dtype, float* m, float* v, int64_t i0,
                        int64_t i1, const AdamWScalars& s) {
  const Consts k(s);
  for (int64_t i = i0; i < i1; i += 8) {
    __m256 mm = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
    const __m256 p = adamw8(avx2::load8(param, dtype, i), avx2::load8(grad, dtype, i), &mm, &vv, k);
    avx2::store8(param, dtype, i, p);
    _mm256_storeu_ps(m + i, mm);
    _mm256_storeu_ps(v + i, vv);
  }
}

void adamw8_blocks_avx2(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                        float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                        const AdamWScalars& s, const uint32_t* lut_m, const uint32_t* lut_v) {
  static_assert(kOptimBlock % 32 == 0, "pass 2 packs 32 codes at a time");
  const Consts k(s);
  alignas(32) float mb[kOptimBlock], vb[kOptimBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * kOptimBlock;
    const __m256 sm = _mm256_set1_ps(absmax_m[b]), sv = _mm256_set1_ps(absmax_v[b]);
    __m256 amax_m = _mm256_setzero_ps(), amax_v = _mm256_setzero_ps();
    for (int j = 0; j < kOptimBlock; j += 8) {
      const int64_t i = base + j;
      __m256 mm = decode8(qm + i, kDynamicSigned, sm);
      __m256 vv = decode8(qv + i, kDynamicUnsigned, sv);
      const __m256 p = adamw8(avx2::load8(param, dtype, i), avx2::load8(grad, dtype, i), &mm, &vv, k);
      avx2::store8(param, dtype, i, p);
      _mm256_store_ps(mb + j, mm);
      _mm256_store_ps(vb + j, vv);
      // maxps(a, b) = a > b ? a : b: with |m| first a NaN never enters (as the reference)
      amax_m = _mm256_max_ps(abs8(mm), amax_m);
      amax_v = _mm256_max_ps(abs8(vv), amax_v);
    }
    const float am = avx2::hmax(amax_m), av = avx2::hmax(amax_v);
    absmax_m[b] = am;
    absmax_v[b] = av;
    const __m256 inv_m = _mm256_set1_ps(nf4_inv_scale(am)), inv_v = _mm256_set1_ps(nf4_inv_scale(av));
    for (int j = 0; j < kOptimBlock; j += 32) {
      __m256i cm[4], cv[4];
      for (int u = 0; u < 4; ++u) {
        cm[u] = encode8(_mm256_mul_ps(_mm256_load_ps(mb + j + 8 * u), inv_m), lut_m);
        cv[u] = encode8(_mm256_mul_ps(_mm256_load_ps(vb + j + 8 * u), inv_v), lut_v);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qm + base + j), pack32(cm[0], cm[1], cm[2], cm[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qv + base + j), pack32(cv[0], cv[1], cv[2], cv[3]));
    }
  }
}

void code8_encode_avx2(const float* x, int64_t n8, const uint32_t* lut, uint8_t* out) {
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256i c = encode8(_mm256_loadu_ps(x + i), lut);
    alignas(32) int32_t tmp[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), c);
    for (int u = 0; u < 8; ++u) out[i + u] = static_cast<uint8_t>(tmp[u]);
  }
}

}  // namespace nf4lora
