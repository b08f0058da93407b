// Driver of the bf16 linear path (csrc/cpu/linear_bf16.h): NF4 -> bf16 decode, operand packing,
// cache blocking, the LoRA shrink and expand, and the epilogues; the tile micro-kernel (AMX or
// AVX512-BF16) is passed in. AVX-512 F/BW code, run only when use_avx512().
//
// Decode, 32 codes per 16-byte load: vpmovzxbd widens each packed byte b to a dword; a word pair
// built from b (decode32) indexes with vpermw the block's table of 16 values code x absmax (fp32
// product rounded to bf16, ties to even; block_table), b's high nibble the even element and its
// low nibble the odd one: natural order, one table per NF4 block (a 32-aligned group never spans
// blocks: blocksize >= 32), the blocks' scales computed 16 at a time per row segment.
//
// Forward (y^T = W x^T): passes over K chunks; in each, tasks of 32 W rows (a tile pair) decode
// their chunk once into a row-major A panel and run it against every 32-row group of x, whose VNNI
// tiles were packed once per call (pack_x, together with the LoRA shrink u = D(x) A^T). The chunk
// is the kernel's sub_steps for larger M (A in L1, the x chunk panel in L2) and 4096 columns for
// M <= 64. The fp32 y^T accumulator [Np][Mp] is transposed out with the bias and the LoRA expand.
// Backward (dx = dy W): tasks of kKB columns; per N chunk of kNCS steps the W row pairs of those
// columns are decoded and interleaved into VNNI B tiles; A tiles are dy rows read in place.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/linear_bf16.h"
#include "cpu/simd_avx512.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace bf16lin {

namespace {

constexpr int64_t kKCS = 128;  // forward, small M: K steps (of 32) per pass: 32 rows x 4096 bf16 (256 KB)
constexpr int64_t kKB = 128;   // backward: dx columns per task
constexpr int64_t kNCS = 32;   // backward: N steps (of 32) per decoded chunk: 1024 x 128 bf16
constexpr int64_t kTile = 512; // bf16 elements in one 16 x 32 tile

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// 64-byte aligned scratch; never holds a copy of W. Each thread keeps one buffer per slot up to
// kKeepBytes between calls (fresh pages would cost a page fault and a zeroing per 4 KB on every
// call); larger requests are allocated for the call and freed.
constexpr size_t kKeepBytes = size_t{64} << 20;
enum Slot { kSlotOperand, kSlotPanel, kSlotAcc, kSlotRows, kSlots };

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
struct Kept {
  std::unique_ptr<void, FreeDeleter> p;
  size_t bytes = 0;
};
thread_local Kept t_kept[kSlots];

template <typename T>
class Scratch {
 public:
  Scratch(Slot slot, int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64));
    Kept& k = t_kept[slot];
    if (bytes <= k.bytes) {
      ptr_ = static_cast<T*>(k.p.get());
    } else if (bytes <= kKeepBytes) {
      k.p.reset(std::aligned_alloc(64, bytes));
      k.bytes = k.p ? bytes : 0;
      ptr_ = static_cast<T*>(k.p.get());
    } else {
      own_.reset(std::aligned_alloc(64, bytes));
      ptr_ = static_cast<T*>(own_.get());
    }
  }
  T* get() const { return ptr_; }
  bool ok() const { return ptr_ != nullptr; }

 private:
  std::unique_ptr<void, FreeDeleter> own_;
  T* ptr_ = nullptr;
};

// --- file-local scalar helpers (see linear_avx512.cpp: no header inlines compiled with ISA flags
// may leak to baseline callers), the same roundings as nf4.h / dtype.h.
inline float block_scale(const NF4Scales& s, int64_t b) {
  if (s.qabsmax == nullptr) return s.absmax[b];
  const float scaled = s.code8[s.qabsmax[b]] * s.absmax2[b / kNestedBlocksize];
  return scaled + s.offset;
}
inline uint16_t bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// W[n, k] rounded to bf16 (odd shapes only)
inline uint16_t w_bf16(const NF4Weight& w, int64_t n, int64_t k) {
  const int64_t i = n * w.K + k;
  const uint8_t byte = w.packed[i / 2];
  return bf16_rne(kNF4[(i % 2 == 0) ? (byte >> 4) : (byte & 15)] * block_scale(w.scales, i / w.blocksize));
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
void decode_segment(const uint8_t* src, const float* scale, int64_t lb, int64_t flat, int64_t real,
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
void decode_row(const NF4Weight& w, int lb, int64_t n, int64_t ks0, int64_t cnt, uint16_t* dst,
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
void pack_rows(const uint16_t* a, int64_t M, int64_t N, int64_t m0, int64_t nsteps, uint16_t* dst) {
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
void pack_x(const uint16_t* x, int64_t M, int64_t K, int64_t m0, int64_t ksteps, uint16_t* dst) {
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
void lora_shrink_row(const uint16_t* xr, int64_t m, int64_t K, const LoraArgs& lora, float* row, float* um) {
  const bool drop = lora.drop.active();
  const uint32_t rh = drop ? lora.drop.row(m) : 0;
  int64_t k = 0;
  for (; k < K; k += 16) {
    const __mmask16 mk = tail16(K - k);
    __m512 v = from_bf16(_mm256_maskz_loadu_epi16(mk, xr + k));
    if (drop) v = apply_dropout(lora.drop, rh, k, v);
    _mm512_mask_storeu_ps(row + k, mk, v);
  }
  for (int64_t j = 0; j < lora.r; ++j) {
    const float* a = lora.A + j * K;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= K; i += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(a + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 16), _mm512_loadu_ps(a + i + 16), s1);
    }
    for (; i < K; i += 16) {
      const __mmask16 mk = tail16(K - i);
      s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, row + i), _mm512_maskz_loadu_ps(mk, a + i), s0);
    }
    um[j] = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
}

// Forward epilogue of one task: y[m, n0 + i] = acc[i][m] + bias + sum_j u[m, j] sBt[j][n0 + i],
// i < rows, m < M; 16 columns at a time through a gather down acc's column m.
void forward_epilogue(const float* acc, int64_t Mp, int64_t M, int64_t N, int64_t n0, int64_t rows,
                      const float* bias, const float* u, const float* sBt, int64_t ldbt, int64_t r,
                      uint16_t* y) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(Mp)));
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const __mmask16 mk = tail16(rows - i0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0 + i0) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, idx, acc + i0 * Mp + m, 4), b);
      if (u != nullptr) {
        __m512 l = _mm512_setzero_ps();
        for (int64_t j = 0; j < r; ++j)
          l = _mm512_fmadd_ps(_mm512_set1_ps(u[m * r + j]), _mm512_loadu_ps(sBt + j * ldbt + n0 + i0), l);
        v = _mm512_add_ps(v, l);
      }
      _mm256_mask_storeu_epi16(y + m * N + n0 + i0, mk, to_bf16(v));
    }
  }
}

}  // namespace

Status forward(const TileKernel& kern, const uint16_t* x, int64_t M, const NF4Weight& w,
               const float* bias, const LoraArgs* lora, uint16_t* y, float* u) {
  const int64_t N = w.N, K = w.K;
  const int64_t Kp = round_up(K, 32), Mp = round_up(M, 16), ksteps = Kp / 32;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));
  const int64_t r = lora ? lora->r : 0;
  Scratch<uint16_t> xpack(kSlotOperand, Mp * Kp);
  if (!xpack.ok()) return Status::kOutOfMemory;

  // x -> VNNI tiles [Mp / 16][ksteps][kTile], and the LoRA shrink on the same rows.
#pragma omp parallel if (M * K >= (1 << 16))
  {
    std::vector<float> row(lora ? static_cast<size_t>(K) : 0);
#pragma omp for schedule(static)
    for (int64_t mt = 0; mt < Mp / 16; ++mt) {
      pack_x(x, M, K, mt * 16, ksteps, xpack.get() + mt * ksteps * kTile);
      if (lora)
        for (int64_t m = mt * 16; m < std::min(M, mt * 16 + 16); ++m)
          lora_shrink_row(x + m * K, m, K, *lora, row.data(), u + m * r);
    }
  }
  // s B^T [r][Np] for the vectorised expand (zero columns past N)
  const int64_t Np16 = round_up(N, 16);
  std::vector<float> sBt(static_cast<size_t>(r * Np16), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < r; ++j) sBt[j * Np16 + n] = lora->scaling * lora->B[n * r + j];

  // y^T accumulator of the whole layer [Np][Mp] fp32 (kept scratch; row pairs past N unused)
  const int64_t pairs = (N + 31) / 32;
  Scratch<float> acc(kSlotAcc, pairs * 32 * Mp);
  if (!acc.ok()) return Status::kOutOfMemory;
  // K chunk per pass: small M keeps whole 4096-column rows (the decode streams them; A is read
  // back from L2 once per 32 x rows); larger M takes sub_steps (A of a pair stays in L1 while every
  // x row group of the chunk, a panel of Mp x 32 sub_steps bf16, streams from L2).
  const int64_t kcs_max = Mp <= 64 ? kKCS : kern.sub_steps;
  std::atomic<bool> alloc_failed{false};
#pragma omp parallel
  {
    // One row pair's decoded W, row-major with one spare 64-byte line per row: row i's step s at
    // pbuf + i * ldw + 32 s, so the decode writes each row sequentially and an A tile (16 rows,
    // stride ldw) spreads over L1 sets instead of landing in one (a 2^k-byte stride would).
    Scratch<uint16_t> pbuf(kSlotPanel, 32 * (kcs_max + 1) * 32);
    const bool ok = pbuf.ok();
    if (!ok) alloc_failed.store(true);
    if (ok) kern.thread_begin();
    for (int64_t kc0 = 0; kc0 < ksteps; kc0 += kcs_max) {
      const int64_t kcs = std::min(kcs_max, ksteps - kc0), ldw = (kcs + 1) * 32;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        if (!ok) continue;
        for (int64_t i = 0; i < 32; ++i)
          decode_row(w, lb, p * 32 + i, kc0, kcs, pbuf.get() + i * ldw, 32, 32);
        for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
          const int64_t mt = m0 / 16;
          const uint16_t* b1 = m0 + 16 < Mp ? xpack.get() + ((mt + 1) * ksteps + kc0) * kTile : nullptr;
          kern.block(pbuf.get(), pbuf.get() + 16 * ldw, 32, ldw, xpack.get() + (mt * ksteps + kc0) * kTile, b1,
                     kTile, kcs, acc.get() + p * 32 * Mp + m0, Mp, kc0 > 0);
        }
      }
    }
    if (ok) kern.thread_end();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p)
      forward_epilogue(acc.get() + p * 32 * Mp, Mp, M, N, p * 32, std::min<int64_t>(32, N - p * 32), bias,
                       lora ? u : nullptr, sBt.data(), Np16, r, y);
  }
  return alloc_failed ? Status::kOutOfMemory : Status::kOk;
}

Status backward_dx(const TileKernel& kern, const uint16_t* dy, int64_t M, const NF4Weight& w,
                   const LoraArgs* lora, const float* g, uint16_t* dx) {
  const int64_t N = w.N, K = w.K;
  const int64_t Np = round_up(N, 32), Mp = round_up(M, 16), Kp = round_up(K, 32), nsteps = Np / 32;
  const int lb = __builtin_ctzll(static_cast<uint64_t>(w.blocksize));
  // A operand: dy as tiles [Mp / 16][nsteps][kTile], zero-padded
  Scratch<uint16_t> dypack(kSlotOperand, Mp * Np);
  if (!dypack.ok()) return Status::kOutOfMemory;
#pragma omp parallel for schedule(static) if (M * N >= (1 << 16))
  for (int64_t mt = 0; mt < Mp / 16; ++mt) pack_rows(dy, M, N, mt * 16, nsteps, dypack.get() + mt * nsteps * kTile);
  // lo/hi halves of the interleave of two 32-word rows: [a0 b0 a1 b1 ...]
  alignas(64) uint16_t ilo[32], ihi[32];
  for (int j = 0; j < 16; ++j) {
    ilo[2 * j] = static_cast<uint16_t>(j);
    ilo[2 * j + 1] = static_cast<uint16_t>(32 + j);
    ihi[2 * j] = static_cast<uint16_t>(16 + j);
    ihi[2 * j + 1] = static_cast<uint16_t>(48 + j);
  }
  const __m512i idx_lo = _mm512_load_si512(ilo), idx_hi = _mm512_load_si512(ihi);

  const int64_t ntasks = (Kp + kKB - 1) / kKB;
  std::atomic<bool> alloc_failed{false};
#pragma omp parallel
  {
    Scratch<uint16_t> wv(kSlotPanel, kKB / 16 * kNCS * kTile);  // [kKB / 16][ncs][kTile]
    Scratch<uint16_t> rows2(kSlotRows, 2 * kKB);              // one decoded row pair, kKB columns each
    Scratch<float> acc(kSlotAcc, Mp * kKB);                   // dx block [Mp][kKB]
    const bool ok = wv.ok() && acc.ok() && rows2.ok();
    if (!ok) alloc_failed.store(true);
    if (ok) kern.thread_begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      if (!ok) continue;
      const int64_t k0 = t * kKB, cols = std::min(kKB, Kp - k0), groups = cols / 32;
      for (int64_t nc0 = 0; nc0 < nsteps; nc0 += kNCS) {
        const int64_t ncs = std::min(kNCS, nsteps - nc0);
        for (int64_t p = 0; p < ncs * 16; ++p) {  // row pairs (n, n + 1) of this chunk
          const int64_t n = nc0 * 32 + 2 * p;
          uint16_t* ra = rows2.get();
          uint16_t* rb = rows2.get() + kKB;
          decode_row(w, lb, n, k0 / 32, groups, ra, 32, 16);
          decode_row(w, lb, n + 1, k0 / 32, groups, rb, 32, 16);
          uint16_t* dst = wv.get() + (p / 16) * kTile + (p % 16) * 32;
          for (int64_t gi = 0; gi < groups; ++gi) {
            const __m512i va = _mm512_load_si512(ra + gi * 32), vb = _mm512_load_si512(rb + gi * 32);
            _mm512_store_si512(dst + (2 * gi) * ncs * kTile, _mm512_permutex2var_epi16(va, idx_lo, vb));
            _mm512_store_si512(dst + (2 * gi + 1) * ncs * kTile, _mm512_permutex2var_epi16(va, idx_hi, vb));
          }
        }
        for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
          const int64_t mt = m0 / 16;
          const uint16_t* a1 = m0 + 16 < Mp ? dypack.get() + ((mt + 1) * nsteps + nc0) * kTile : nullptr;
          for (int64_t gi = 0; gi < groups; ++gi)
            kern.block(dypack.get() + (mt * nsteps + nc0) * kTile, a1, kTile, 32,
                       wv.get() + 2 * gi * ncs * kTile, wv.get() + (2 * gi + 1) * ncs * kTile, kTile, ncs,
                       acc.get() + m0 * kKB + gi * 32, kKB, nc0 > 0);
        }
      }
      // dx[m, k0 + c] = acc + s D(g A)[m, k0 + c], c < min(kKB, K - k0)
      const int64_t valid = std::min(kKB, K - k0);
      for (int64_t m = 0; m < M; ++m) {
        const float* am = acc.get() + m * kKB;
        const uint32_t rh = (lora && lora->drop.active()) ? lora->drop.row(m) : 0;
        for (int64_t c = 0; c < valid; c += 16) {
          const __mmask16 mk = tail16(valid - c);
          __m512 v = _mm512_loadu_ps(am + c);
          if (lora) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t j = 0; j < lora->r; ++j)
              s = _mm512_fmadd_ps(_mm512_set1_ps(g[m * lora->r + j]),
                                  _mm512_maskz_loadu_ps(mk, lora->A + j * K + k0 + c), s);
            if (lora->drop.active()) s = apply_dropout(lora->drop, rh, k0 + c, s);
            v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(lora->scaling), s));
          }
          _mm256_mask_storeu_epi16(dx + m * K + k0 + c, mk, to_bf16(v));
        }
      }
    }
    if (ok) kern.thread_end();
  }
  return alloc_failed ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace bf16lin
}  // namespace nf4lora
