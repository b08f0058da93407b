// Operand preparation shared by the bf16 tile drivers (linear_bf16_fwd_avx512.cpp,
// linear_bf16_bwd_avx512.cpp): per-thread kept scratch, the NF4 -> bf16 decode and the packing of
// activations into tiles. Include only from files compiled with AVX-512 flags; everything is in an
// anonymous namespace (no out-of-line copy with ISA flags can reach a baseline caller).
//
// Decode, 32 codes per 16-byte load: vpmovzxbd widens each packed byte b to a dword; a word pair
// built from b (decode32) indexes with vpermw the block's table of 16 values code x absmax (fp32
// product rounded to bf16, ties to even; block_table), b's high nibble the even element and its
// low nibble the odd one: natural order, one table per NF4 block (a 32-aligned group never spans
// blocks: blocksize >= 32), the blocks' scales computed 16 at a time per row segment.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/kept_scratch.h"
#include "cpu/linear_bf16.h"
#include "cpu/simd_avx512.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace bf16lin {
namespace {

constexpr int64_t kKCS = 128;  // K steps (of 32) a decoded row segment may hold: 4096 columns
constexpr int64_t kTile = 512; // bf16 elements in one 16 x 32 tile

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Per-thread kept scratch (kept_scratch.h), one buffer per slot.
enum Slot { kSlotOperand, kSlotPanel, kSlotAcc, kSlotRows, kSlots };
thread_local KeptBuf t_kept[kSlots];

template <typename T>
struct Scratch : KeptScratch<T> {
  Scratch(Slot slot, int64_t n) : KeptScratch<T>(t_kept[slot], n) {}
};

// --- file-local scalar helpers (see linear_avx512.cpp: no header inlines compiled with ISA flags
// may leak to baseline callers), the same rounding as dtype.h's f32_to_bf16.
inline uint16_t bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// W[n, k] rounded to bf16 (odd shapes only)
inline uint16_t w_bf16(const NF4Weight& w, int64_t n, int64_t k) {
  const int64_t i = n * w.K + k;
  const uint8_t byte = w.packed[i / 2];
  return bf16_rne(kNF4[(i % 2 == 0) ? (byte >> 4) : (byte & 15)] * avx512::block_scale(w.scales, i / w.blocksize));
}

// --- vector helpers: csrc/cpu/simd_avx512.h
using avx512::apply_dropout;
using avx512::block_scales;
using avx512::from_bf16;
using avx512::tail16;
using avx512::to_bf16;

// The block's table: dword c holds code c's value x absmax rounded to bf16 (ties to even) in its
// HIGH word (the low word is rounding residue, never read). The products are finite (|code| <= 1,
// absmax finite), so rounding needs no NaN case.
inline __m512i block_table(float scale) {
  const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(scale)));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
}
// 16 packed bytes b -> 32 bf16 in natural order. Word index 2c + 1 of the table is code c's bf16, and
// vpermw reads 5 index bits: per dword, the low word (b >> 3) | 1 = 2 (b >> 4) + 1 (bit 0 of b >> 3
// is overwritten) gives the even element, the high word 2b + 1 = 2 (b & 15) + 1 (mod 32) the odd one.
inline __m512i decode32(const uint8_t* src, __m512i table) {
  const __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(t, 3), _mm512_slli_epi32(t, 17),
                                                _mm512_set1_epi32(0x00010001), 0xFE);  // a | b | c
  return _mm512_permutexvar_epi16(idx, table);
}

// G groups of 32 codes per NF4 block (blocks aligned with the segment: a compile-time count, so the
// loop per block is straight-line code); G == 0: the general case, blocks cut where they fall.
template <int G>
inline void decode_segment(const uint8_t* src, const float* scale, int64_t lb, int64_t flat, int64_t real,
                    uint16_t* dst, int64_t dst_step, const uint8_t* pf_src) {
  if (G > 0) {
    for (int64_t s = 0, b = 0; s < real; s += G, ++b) {
      if (pf_src) _mm_prefetch(reinterpret_cast<const char*>(pf_src + 16 * s), _MM_HINT_T0);
      const __m512i table = block_table(scale[b]);
      for (int g = 0; g < (G > 0 ? G : 1); ++g)
        _mm512_store_si512(dst + (s + g) * dst_step, decode32(src + 16 * (s + g), table));
    }
    return;
  }
  const int64_t bfirst = flat >> lb;
  for (int64_t s = 0; s < real;) {
    const int64_t b = (flat + 32 * s) >> lb;
    const __m512i table = block_table(scale[b - bfirst]);
    const int64_t seg_end = std::min(real, (((b + 1) << lb) - flat) / 32);
    for (; s < seg_end; ++s) {
      if (pf_src && (s & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(pf_src + 16 * s), _MM_HINT_T0);
      _mm512_store_si512(dst + s * dst_step, decode32(src + 16 * s, table));
    }
  }
}

// W row n, reduction steps [ks0, ks0 + cnt) of 32 columns -> dst + s * dst_step (32 bf16 each,
// natural order); zeros past N or K. One table per NF4 block; lb = log2(blocksize). The packed
// bytes `ahead_rows` rows further down are prefetched as this row's are read: the tasks walk W rows
// with a stride, which the hardware prefetchers follow poorly (the loads of the packed codes were
// the hot spot of the small-M profiles).
inline void decode_row(const NF4Weight& w, int lb, int64_t n, int64_t ks0, int64_t cnt, uint16_t* dst,
                int64_t dst_step, int64_t ahead_rows) {
  int64_t s = 0;
  if (n < w.N && w.K % 32 == 0) {
    const int64_t real = std::max<int64_t>(0, std::min(cnt, w.K / 32 - ks0));
    if (real > 0) {
      const int64_t flat = n * w.K + ks0 * 32;
      const uint8_t* src = w.packed + flat / 2;
      const uint8_t* pf = n + ahead_rows < w.N ? src + ahead_rows * w.K / 2 : nullptr;
      // this segment's block scales, vectorised (at most real + 1 blocks: blocksize >= 32)
      alignas(64) float scale[kKCS + 2];
      const int64_t bfirst = flat >> lb;
      block_scales(w.scales, bfirst, ((flat + real * 32 - 1) >> lb) - bfirst + 1, scale);
      const int64_t bs = w.blocksize;
      const bool aligned = flat % bs == 0 && (real * 32) % bs == 0;
      if (aligned && bs == 64)
        decode_segment<2>(src, scale, lb, flat, real, dst, dst_step, pf);
      else if (aligned && bs == 128)
        decode_segment<4>(src, scale, lb, flat, real, dst, dst_step, pf);
      else if (aligned && bs == 32)
        decode_segment<1>(src, scale, lb, flat, real, dst, dst_step, pf);
      else
        decode_segment<0>(src, scale, lb, flat, real, dst, dst_step, pf);
      s = real;
    }
  } else if (n < w.N) {  // rows start mid-byte or mid-block: element by element
    for (; s < cnt; ++s)
      for (int j = 0; j < 32; ++j) {
        const int64_t k = (ks0 + s) * 32 + j;
        dst[s * dst_step + j] = k < w.K ? w_bf16(w, n, k) : 0;
      }
  }
  for (; s < cnt; ++s) _mm512_store_si512(dst + s * dst_step, _mm512_setzero_si512());
}

// dy rows [m0, m0 + 16) -> A tiles dst[ns] (ns < nsteps, kTile each, rows of 32 bf16); rows >= M
// and columns >= N zero. A tile-contiguous copy: in place, rows N * 2 bytes apart would share L1 sets.
inline void pack_rows(const uint16_t* a, int64_t M, int64_t N, int64_t m0, int64_t nsteps, uint16_t* dst) {
  for (int64_t j = 0; j < 16; ++j) {
    const int64_t m = m0 + j;
    for (int64_t ns = 0; ns < nsteps; ++ns) {
      uint16_t* d = dst + ns * kTile + j * 32;
      const int64_t n0 = ns * 32, valid = m < M ? std::max<int64_t>(0, std::min<int64_t>(32, N - n0)) : 0;
      const __mmask32 mk = valid >= 32 ? 0xffffffffu : ((1u << valid) - 1u);
      _mm512_store_si512(d, _mm512_maskz_loadu_epi16(mk, a + m * N + n0));
    }
  }
}

// x rows [m0, m0 + 16) -> VNNI tiles dst[ks] (ks < ksteps, kTile each): tile row kp holds the
// dword (x[m][32 ks + 2 kp], x[m][32 ks + 2 kp + 1]) for the 16 rows m; rows >= M and columns
// >= K are zero. One masked gather of 16 dwords per tile row.
inline void pack_x(const uint16_t* x, int64_t M, int64_t K, int64_t m0, int64_t ksteps, uint16_t* dst) {
  const int64_t rows = std::min<int64_t>(16, M - m0);
  const __mmask16 live = tail16(rows);
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(K * 2)));
  const int64_t full = K / 32;  // steps that lie wholly inside the row
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    uint16_t* t = dst + ks * kTile;
    if (ks < full) {
      const char* base = reinterpret_cast<const char*>(x + m0 * K + ks * 32);
      for (int kp = 0; kp < 16; ++kp) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, base + 4 * kp, 1);
        _mm512_store_si512(t + kp * 32, v);
      }
    } else {  // the last, partial step: element by element
      for (int kp = 0; kp < 16; ++kp)
        for (int j = 0; j < 16; ++j)
          for (int h = 0; h < 2; ++h) {
            const int64_t k = ks * 32 + 2 * kp + h;
            t[kp * 32 + 2 * j + h] = (j < rows && k < K) ? x[(m0 + j) * K + k] : 0;
          }
    }
  }
}

// u[m, j] = sum_k D(x)[m, k] A[j, k] (fp32), one row; `row` is K floats of scratch.
}  // namespace
}  // namespace bf16lin
}  // namespace nf4lora
