// AVX-512 + VBMI fused AdamW update with 8-bit blockwise state (dispatch: optim.cpp, when
// use_avx512vbmi() and both Code8Arith tables were built; otherwise the AVX2 kernel). Per block
// of 256 elements, two passes as the AVX2 kernel:
//   pass 1, 64 elements at a time: decode m and v (byte-plane lookups, decode64), update in
//           float32 (adamw16), store p, keep the block's float32 m and v in L1 with their absmax;
//   pass 2, 16 at a time: requantize with the arithmetic encoder (Code8Arith in optim.h, encode16);
//           the rare lanes it cannot decide go to code8_encode_scalar.
// Bit-identical to adamw8_blocks_ref (tests: random states on every ISA path; the encoder
// exhaustively against code8_encode).
#include <cstring>

#include "cpu/optim.h"
#include "cpu/optim_avx512.h"
#include "nf4lora/dynamic_map.h"

namespace nf4lora {

namespace {

// ---------------------------------------------------------------- decode: 64 codes -> 64 floats
// The 256-entry float table as 4 byte planes (byte p of every code), each plane in 4 zmm (entries
// 0..127 in t[p][0..1], 128..255 in t[p][2..3]). vpermt2b looks a plane up for 64 codes by their
// low 7 bits and a blend on bit 7 picks the half: 8 lookups + 4 blends for 64 codes, against 8
// vpermt2ps + 7 blends per 16 codes with float tables.
struct Planes {
  __m512i t[4][4];
  explicit Planes(const float* code) {
    alignas(64) uint8_t b[4][256];
    for (int j = 0; j < 256; ++j) {
      uint32_t u;
      std::memcpy(&u, &code[j], 4);
      for (int p = 0; p < 4; ++p) b[p][j] = static_cast<uint8_t>(u >> (8 * p));
    }
    for (int p = 0; p < 4; ++p)
      for (int h = 0; h < 4; ++h) t[p][h] = _mm512_load_si512(b[p] + 64 * h);
  }
};

// Two rounds of unpacks (bytes -> 16-bit pairs -> 32-bit) rebuild the floats, but unpacks work
// inside 128-bit lanes: result c, dword 4L + r, comes from byte 16L + 4c + r of the looked-up
// planes. So the codes are permuted first: position 16L + 4c + r gets code 16c + 4L + r, and the
// four results are elements 0..15, 16..31, 32..47, 48..63 in order.
inline __m512i unpack_order() {
  alignas(64) uint8_t o[64];
  for (int L = 0; L < 4; ++L)
    for (int c = 0; c < 4; ++c)
      for (int r = 0; r < 4; ++r) o[16 * L + 4 * c + r] = static_cast<uint8_t>(16 * c + 4 * L + r);
  return _mm512_load_si512(o);
}

// out[c] = code[q[16c .. 16c + 15]] * absmax (state8_decode: one float32 rounding).
inline void decode64(const uint8_t* q, const Planes& P, __m512i order, __m512 absmax, __m512 out[4]) {
  const __m512i idx = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(q));
  const __mmask64 upper = _mm512_movepi8_mask(idx);  // bit 7: entries 128..255
  __m512i b[4];
  for (int p = 0; p < 4; ++p)
    b[p] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(P.t[p][0], idx, P.t[p][1]),
                                  _mm512_permutex2var_epi8(P.t[p][2], idx, P.t[p][3]));
  const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)), absmax);
  out[1] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)), absmax);
  out[2] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)), absmax);
  out[3] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)), absmax);
}

// ---------------------------------------------------------------- encode: 16 floats -> 16 codes
// Code8Arith's tables in registers: 32 binades (two zmm each, vpermt2ps/d), 16 segments (one zmm).
struct Encoder {
  __m512 th0, th1, scale, offset;
  __m512i seg0, seg1, last, near, two_near;
  explicit Encoder(const Code8Arith& a)
      : th0(_mm512_loadu_ps(a.thresh)),
        th1(_mm512_loadu_ps(a.thresh + 16)),
        scale(_mm512_loadu_ps(a.scale)),
        offset(_mm512_loadu_ps(a.offset)),
        seg0(_mm512_loadu_si512(a.seg)),
        seg1(_mm512_loadu_si512(a.seg + 16)),
        last(_mm512_loadu_si512(a.last)),
        near(_mm512_set1_epi32(a.near)),
        two_near(_mm512_set1_epi32(2 * a.near)) {}
};

// Lanes the encoder leaves to code8_encode, queued and done after the block: a call inside the
// loop would clobber every zmm register (tables included) on each iteration.
template <bool kSigned>
struct SlowLanes {
  static constexpr int kCap = 2 * kOptimBlock;  // flushed at least once per 256-element block
  float x[kCap];
  uint8_t* out[kCap];
  int n = 0;
  void flush() {
    for (int i = 0; i < n; ++i) *out[i] = code8_encode_scalar(kSigned, x[i]);
    n = 0;
  }
};

// out[0..15] = code8_encode(code, x[i]) for the signed (m) or unsigned (v) dynamic code, except
// the lanes queued in `slow_lanes` (done by its flush()).
template <bool kSigned>
inline void encode16(__m512 x, const Encoder& E, uint8_t* out, SlowLanes<kSigned>* slow_lanes) {
  constexpr int kFrac = Code8Arith::kFracBits;
  const __m512i xb = _mm512_castps_si512(x);
  const __m512i ab = kSigned ? _mm512_and_si512(xb, _mm512_set1_epi32(0x7fffffff)) : xb;
  const __m512 a = _mm512_castsi512_ps(ab);
  // Lanes left to code8_encode: |x| > 1.5, Inf, NaN (as unsigned bits; for the unsigned table
  // also every x with the sign bit set), and ti near an integer.
  __mmask16 slow = _mm512_cmpgt_epu32_mask(ab, _mm512_set1_epi32(0x3fc00000));  // 1.5f
  // key = biased exponent - kKeyBias, saturating at 0 (the exponent fits the low 16 bits)
  const __m512i key =
      _mm512_subs_epu16(_mm512_srli_epi32(ab, 23), _mm512_set1_epi32(Code8Arith::kKeyBias));
  const __m512 th = _mm512_permutex2var_ps(E.th0, key, E.th1);
  __m512i seg = _mm512_permutex2var_epi32(E.seg0, key, E.seg1);
  seg = _mm512_mask_add_epi32(seg, _mm512_cmp_ps_mask(a, th, _CMP_GT_OQ), seg, _mm512_set1_epi32(1));
  const __m512i ti = _mm512_cvttps_epi32(_mm512_fmsub_ps(a, _mm512_permutexvar_ps(seg, E.scale),
                                                         _mm512_permutexvar_ps(seg, E.offset)));
  // fraction bits f within `near` of an integer: (f + near) mod 2^kFrac < 2 * near
  const __m512i f = _mm512_and_si512(_mm512_add_epi32(ti, E.near), _mm512_set1_epi32((1 << kFrac) - 1));
  slow |= _mm512_cmplt_epu32_mask(f, E.two_near);
  __m512i idx = _mm512_min_epi32(_mm512_srai_epi32(ti, kFrac), _mm512_permutexvar_epi32(seg, E.last));
  if (kSigned) {  // negatives mirror the positives: 254 - index, and no -1.0 below index 0
    idx = _mm512_mask_sub_epi32(idx, _mm512_movepi32_mask(xb), _mm512_set1_epi32(254), idx);
    idx = _mm512_max_epi32(idx, _mm512_setzero_si512());
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(idx));
  if (slow) {
    alignas(64) float xs[16];
    _mm512_store_ps(xs, x);
    for (unsigned m = slow; m != 0; m &= m - 1) {
      const int i = __builtin_ctz(m);
      slow_lanes->x[slow_lanes->n] = xs[i];
      slow_lanes->out[slow_lanes->n++] = out + i;
    }
  }
}

}  // namespace

// The two passes are software-pipelined: the loop over block b updates b (pass 1: divider-bound)
// while it requantizes block b - 1 (pass 2: permute-bound), 16 elements of each in turn, so both
// units stay busy (measured: 10-15% faster than the passes one after the other).
void adamw8_blocks_avx512vbmi(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                              float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                              const AdamWScalars& s) {
  static_assert(kOptimBlock % 64 == 0, "64 codes per decode");
  const Consts k(s);
  const Planes planes_m(kDynamicSigned), planes_v(kDynamicUnsigned);
  const Encoder enc_m(code8_arith(true)), enc_v(code8_arith(false));
  const __m512i order = unpack_order();
  alignas(64) float mb[2][kOptimBlock], vb[2][kOptimBlock];  // float32 m, v of blocks b, b - 1
  SlowLanes<true> slow_m;
  SlowLanes<false> slow_v;
  __m512 inv_m = _mm512_setzero_ps(), inv_v = _mm512_setzero_ps();  // 1 / absmax of block b - 1
  for (int64_t b = b0; b <= b1; ++b) {
    const bool update = b < b1, encode = b > b0;
    const int64_t base = b * kOptimBlock;
    float* const cur_m = mb[b & 1];
    float* const cur_v = vb[b & 1];
    const float* const prev_m = mb[(b - 1) & 1];
    const float* const prev_v = vb[(b - 1) & 1];
    const __m512 sm = _mm512_set1_ps(update ? absmax_m[b] : 0.0f);
    const __m512 sv = _mm512_set1_ps(update ? absmax_v[b] : 0.0f);
    __m512 amax_m = _mm512_setzero_ps(), amax_v = _mm512_setzero_ps();
    for (int j = 0; j < kOptimBlock; j += 64) {
      __m512 M[4], V[4];
      if (update) {
        decode64(qm + base + j, planes_m, order, sm, M);
        decode64(qv + base + j, planes_v, order, sv, V);
      }
      for (int c = 0; c < 4; ++c) {
        if (update) {
          const int64_t i = base + j + 16 * c;
          const __m512 p = adamw16(load16(param, dtype, i), load16(grad, dtype, i), &M[c], &V[c], k);
          store16(param, dtype, i, p);
          _mm512_store_ps(cur_m + j + 16 * c, M[c]);
          _mm512_store_ps(cur_v + j + 16 * c, V[c]);
          // maxps(a, b) = a > b ? a : b: with |m| first a NaN never enters (as the reference)
          amax_m = _mm512_max_ps(abs16(M[c]), amax_m);
          amax_v = _mm512_max_ps(abs16(V[c]), amax_v);
        }
        if (encode) {
          encode16<true>(_mm512_mul_ps(_mm512_load_ps(prev_m + j + 16 * c), inv_m), enc_m,
                         qm + base - kOptimBlock + j + 16 * c, &slow_m);
          encode16<false>(_mm512_mul_ps(_mm512_load_ps(prev_v + j + 16 * c), inv_v), enc_v,
                          qv + base - kOptimBlock + j + 16 * c, &slow_v);
        }
      }
    }
    slow_m.flush();
    slow_v.flush();
    if (update) {
      const float am = hmax16(amax_m), av = hmax16(amax_v);
      absmax_m[b] = am;
      absmax_v[b] = av;
      inv_m = _mm512_set1_ps(inv_scale(am));
      inv_v = _mm512_set1_ps(inv_scale(av));
    }
  }
}

void code8_encode_avx512vbmi(const float* x, int64_t n16, bool is_signed, uint8_t* out) {
  const Encoder enc(code8_arith(is_signed));
  SlowLanes<true> slow_signed;
  SlowLanes<false> slow_unsigned;
  for (int64_t i = 0; i < n16; i += 16) {
    if (is_signed)
      encode16<true>(_mm512_loadu_ps(x + i), enc, out + i, &slow_signed);
    else
      encode16<false>(_mm512_loadu_ps(x + i), enc, out + i, &slow_unsigned);
    if (i % kOptimBlock == kOptimBlock - 16 || i + 16 == n16) {
      slow_signed.flush();
      slow_unsigned.flush();
    }
  }
}

}  // namespace nf4lora
