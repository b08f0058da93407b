// AVX-512 fp32 GEMM of the CPU fused QLoRA linear ("gemm512"; dispatch and epilogues: linear.cpp;
// the AVX2 twin in linear_avx2.cpp is the fallback). Same contracts as avx2lin::gemm_forward and
// avx2lin::gemm_backward_dx: exact fp32 W values (code value x block absmax, one fp32 multiply,
// rounded before it meets the FMA), fp32 accumulation, summation order ours.
//
// Micro-kernel: C[MR x 32] (+)= A[MR x kc] B[kc x 32], MR = 14 rows broadcast (vbroadcastss) against
// 2 zmm of B per k: 28 zmm accumulators, 2 B registers, 1 broadcast register, no spills. Per k:
// 2 vector loads + 14 broadcasts for 28 FMAs (14 cycles on two 512-bit FMA ports). A is packed
// [kc][14] (one contiguous stream); with kc = 128 the A micro-panel (7 KB) and a B micro-panel
// (kc x 32: 16 KB) fit a 32 KB L1 together, so A stays in L1 while the B micro-panels stream from
// L2 (as BLIS on Skylake-X). (At kc = 256 in 14 separate rows 1 KB apart, the 32 KB B stream evicted
// A between calls: forward 86 -> 134 GFLOP/s on one SPR core once fixed.) Edge tiles: 1..13 rows
// and 16 columns (one zmm) variants, so no output is padded. Each task accumulates into its own
// contiguous C block (rows of y^T or dx 4*ldc bytes apart would crowd a few L2 sets) and copies it
// out once; tasks are spread evenly over the threads.
//
// Forward (y^T = W x^T, LoRA as r extra reduction columns: A = s B rows, B = u^T):
//  - x^T (and u^T) packed once per call, transposed in 16 x 16 register blocks, into 32-wide panels
//    stored chunk-major [K chunk][panel][kc][32] (rows m >= M zero), so a chunk is contiguous;
//  - tasks = (up to kNB = 252 W rows) x (up to kMB = 512 y^T columns): the C block (504 KB) stays
//    in L2 over the whole reduction; per chunk of kKC columns the task's x^T chunk (512 x 128 fp32 =
//    256 KB) is L2-resident and each W micro-panel (14 rows, decoded once per task and chunk, the
//    next one's NF4 bytes prefetched) runs against every 32-wide x^T panel of the task.
// Backward dx (dx = dy W):
//  - dy packed once per call into 14-row micro-panels [M/14][N][14] (contiguous broadcasts; dy rows
//    in place would put 14 streams 4*N bytes apart, i.e. into one L1 set when N*4 % 4096 == 0);
//  - tasks = (up to kKB = 256 dx columns) x (up to kMBdx = 560 dy rows); per chunk of kNC = 128 W
//    rows, the task's columns of those rows are decoded (natural order) into panel-major
//    [cols/32][nc][32] (128 KB, L2; the next chunk's NF4 bytes prefetched meanwhile); each dy
//    micro-panel (14 x nc, L1) runs against every W panel.
//
// NF4 decode, 32 codes per 16-byte load: vpmovzxbd widens the bytes to dwords; vpermps against a
// zmm of the 16 exact fp32 code values reads index bits [3:0], so the byte looks up its low nibble
// (odd element) and byte >> 4 its high nibble (even element); two vpermt2ps restore natural order;
// one multiply by the block absmax (a 32-aligned group never spans two NF4 blocks). Row segments
// that do not start on a 32-aligned flat index (K % 32 != 0) decode the aligned groups around them
// and copy the needed part; the very last group of the tensor, if partial, decodes element-wise.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#include "cpu/kept_scratch.h"
#include "cpu/linear.h"
#include "cpu/simd_avx512.h"
#include "nf4lora/nf4.h"

namespace nf4lora {
namespace avx512lin {

namespace {

// NOTE: only file-local functions here (see linear_avx512.cpp): no header inline that might be
// emitted out of line with AVX-512 flags (NF4Weight::at, NF4Scales::block, load_as_f32, ...).

constexpr int kMR = 14;           // micro-tile rows (broadcast operand)
constexpr int kNR = 32;           // micro-tile columns (2 zmm)
constexpr int64_t kKC = 128;      // forward: reduction columns per chunk (A micro-panel 7 KB)
constexpr int64_t kNB = 18 * kMR; // forward: max W rows per task (252)
constexpr int64_t kMB = 512;      // forward: max y^T columns (activation rows) per task
constexpr int64_t kNC = 128;      // dx: reduction (W rows) per chunk
constexpr int64_t kKB = 256;      // dx: max dx columns per task (decoded W block 128 x 256: 128 KB)
constexpr int64_t kMBdx = 40 * kMR;  // dx: max dy rows per task (560: M = 512 decodes W once)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t rup(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// ---------------------------------------------------------------- scratch
// fp32 scratch kept per thread between calls (kept_scratch.h), at least 16 floats; a failed
// allocation throws, as a std::vector would.
struct Scratch : KeptScratch<float> {
  Scratch(KeptBuf& k, int64_t count) : KeptScratch<float>(k, std::max<int64_t>(count, 16)) {
    if (!ok()) throw std::bad_alloc();
  }
};

thread_local KeptBuf t_pack;   // calling thread: x^T / dy packed operand
thread_local KeptBuf t_panel;  // each OpenMP thread: decoded W block (dx)
thread_local KeptBuf t_cblock; // each OpenMP thread: a task's C block (contiguous, so it keeps
                               // all of L2's sets: output rows 4*ldc apart would crowd a few)

// rows x cols (fp32) from src (row stride lds) to dst (row stride ldd)
inline void copy_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(dst + i * ldd, src + i * lds, static_cast<size_t>(cols) * sizeof(float));
}

// ---------------------------------------------------------------- NF4 decode
using avx512::block_scale;  // simd_avx512.h: dq_absmax's two roundings

// W element at flat index i (scalar; only for a partial last group of the tensor).
inline float elem(const NF4Weight& w, int lb, int64_t i) {
  const uint8_t byte = w.packed[i / 2];
  const uint8_t code = (i % 2 == 0) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 15);
  return kNF4[code] * block_scale(w.scales, i >> lb);
}

struct Decoder {
  const NF4Weight& w;
  int lb;  // blocksize = 2^lb
  int64_t total;
  __m512 table;
  __m512i even_idx, odd_idx;

  explicit Decoder(const NF4Weight& wt)
      : w(wt), lb(__builtin_ctzll(static_cast<uint64_t>(wt.blocksize))), total(wt.N * wt.K),
        table(_mm512_loadu_ps(kNF4)),
        // natural order from hi (even elements, index 0..15) and lo (odd elements, 16..31)
        even_idx(_mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)),
        odd_idx(_mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)) {}

  // 32 elements of the aligned group starting at flat index g (g % 32 == 0, g + 32 <= total)
  inline void group(int64_t g, float* dst) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + g / 2)));
    const __m512 lo = _mm512_permutexvar_ps(b, table);                       // odd elements
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);  // even elements
    const __m512 s = _mm512_set1_ps(block_scale(w.scales, g >> lb));
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutex2var_ps(hi, even_idx, lo), s));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_permutex2var_ps(hi, odd_idx, lo), s));
  }

  // software prefetch of the packed bytes of W_flat[f0 : f0 + len] (to L2: decoded later)
  inline void prefetch(int64_t f0, int64_t len) const {
    const char* p0 = reinterpret_cast<const char*>(w.packed + f0 / 2);
    const char* p1 = reinterpret_cast<const char*>(w.packed + (f0 + len - 1) / 2);
    for (const char* p = p0; p <= p1; p += 64) _mm_prefetch(p, _MM_HINT_T1);
    _mm_prefetch(p1, _MM_HINT_T1);
  }

  // dst[0:len] = W_flat[f0 : f0 + len]
  void flat(int64_t f0, int64_t len, float* dst) const {
    int64_t i = 0;
    while (i < len) {
      const int64_t f = f0 + i;
      const int64_t g = f & ~int64_t{31};
      if (f == g && i + 32 <= len) {
        group(g, dst + i);
        i += 32;
        continue;
      }
      const int64_t cnt = std::min<int64_t>(g + 32 - f, len - i);  // this group's part of the range
      if (g + 32 <= total) {
        alignas(64) float tmp[32];
        group(g, tmp);
        std::memcpy(dst + i, tmp + (f - g), static_cast<size_t>(cnt) * sizeof(float));
      } else {
        for (int64_t j = 0; j < cnt; ++j) dst[i + j] = elem(w, lb, f + j);
      }
      i += cnt;
    }
  }
};

// ---------------------------------------------------------------- activation loads / transpose
// 16 elements [i, i + cnt) (cnt <= 16) of a typed buffer as fp32, lanes >= cnt zero.
inline __m512 load16(const void* p, DType d, int64_t i, int cnt) {
  const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
  switch (d) {
    case DType::kF32: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
    case DType::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
    default: {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// In-register 16 x 16 transpose: r[j] lane c -> r[c] lane j.
inline void transpose16(__m512 r[16]) {
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512 t0 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]), t1 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    const __m512 t2 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]), t3 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
    // u[4g + c] lane j = rows 4g..4g+3 at column 4j + c
    u[4 * g + 0] = _mm512_shuffle_ps(t0, t2, 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes across u[c], u[4+c], u[8+c], u[12+c]
    const __m512 a0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), a1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 a2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), a3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(a0, a2, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(a0, a2, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(a1, a3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(a1, a3, 0xDD);
  }
}

// rows [16][lda] (rows 14, 15 ignored), columns [0, kc) -> a [kc][14]
inline void pack_a(const float* rows, int64_t lda, int64_t kc, float* a) {
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, kc - k0));
    __m512 v[16];
    for (int j = 0; j < 16; ++j) v[j] = _mm512_loadu_ps(rows + j * lda + k0);
    transpose16(v);
    for (int j = 0; j < cnt; ++j) _mm512_mask_storeu_ps(a + (k0 + j) * kMR, 0x3fff, v[j]);
  }
}

// ---------------------------------------------------------------- micro-kernel
// C[MR x 16*NV] (+)= sum_k A[i, k] B[k, 0:16*NV]; A packed [k][14]: A[i, k] at a[k * 14 + i]
// (broadcast), B row k at b + k * kNR, C row i at c + i * ldc.
template <int MR, int NV>
void ukernel(const float* __restrict a, const float* __restrict b, int64_t kc, float* c, int64_t ldc,
             bool accumulate) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * kNR + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[k * kMR + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

using UKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, bool);

template <size_t... I>
constexpr auto make_table(std::index_sequence<I...>) {
  struct T {
    UKernel f[kMR][2];
  } t{};
  ((t.f[I][0] = &ukernel<static_cast<int>(I) + 1, 1>, t.f[I][1] = &ukernel<static_cast<int>(I) + 1, 2>), ...);
  return t;
}

// mr rows (1..14) x width columns (16 or 32)
inline void run_tile(int64_t mr, int64_t width, const float* a, const float* b, int64_t kc, float* c,
                     int64_t ldc, bool accumulate) {
  static constexpr auto table = make_table(std::make_index_sequence<kMR>{});
  table.f[mr - 1][width > 16 ? 1 : 0](a, b, kc, c, ldc, accumulate);
}

// [0, n) in blocks of whole units (the last unit may be partial) of at most maxu units each, the
// block count a multiple of `parts` where n allows, units spread evenly (sizes differ by <= 1 unit).
struct Blocks {
  int64_t n, unit, units, count;
  Blocks(int64_t n_, int64_t unit_, int64_t maxu, int64_t parts)
      : n(n_), unit(unit_), units(cdiv(n_, unit_)),
        count(std::max<int64_t>(1, std::min(units, rup(cdiv(units, maxu), std::max<int64_t>(parts, 1))))) {}
  int64_t lo(int64_t t) const { return std::min(n, t * units / count * unit); }
  int64_t hi(int64_t t) const { return std::min(n, (t + 1) * units / count * unit); }
};

}  // namespace

void gemm_forward(const NF4Weight& w, const void* x, DType dtype, int64_t M, const float* u,
                  const float* B, int64_t r, float scaling, float* yT) {
  const Decoder dec(w);
  const int64_t N = w.N, K = w.K;
  const int64_t rr = u != nullptr ? r : 0;
  const int64_t K2 = K + rr;                    // reduction length: K, then the LoRA's r columns
  const int64_t Mp = rup(M, 16);                // y^T row length (the contract)
  const int64_t npan = cdiv(M, kNR);            // 32-wide x^T panels
  const int64_t threads = omp_get_max_threads();
  // y^T column blocks (multiples of 32, the last ends at Mp) x W row blocks (multiples of 14)
  const Blocks mbl(Mp, kNR, kMB / kNR, 1);
  const Blocks nbl(N, kMR, kNB / kMR, mbl.count >= threads ? 1 : cdiv(threads, mbl.count));
  Scratch xs(t_pack, npan * K2 * kNR);
  // x^T: per reduction chunk [k0, k0 + kc), the chunk's npan panels [kc][32] one after another
  // (a chunk is contiguous: panels K2 apart would share L2 sets whenever K2 * 128 B is a multiple
  // of the set stride, and the chunk must stay L2-resident)
  float* xT = xs.get();
  const int64_t kblk = cdiv(K, 16), rblk = cdiv(rr, 16);

#pragma omp parallel
  {
    // ---- pack x^T (then u^T) in 16 x 16 blocks
#pragma omp for collapse(2) schedule(static)
    for (int64_t h = 0; h < npan * 2; ++h)
      for (int64_t kb = 0; kb < kblk + rblk; ++kb) {
        const bool lora_part = kb >= kblk;
        const int64_t c0 = lora_part ? (kb - kblk) * 16 : kb * 16;  // column in x or in u
        const int64_t len = lora_part ? rr : K, ld = lora_part ? rr : K;
        const int cnt = static_cast<int>(std::min<int64_t>(16, len - c0));
        __m512 v[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t m = h * 16 + j;
          v[j] = m >= M ? _mm512_setzero_ps()
                 : lora_part ? load16(u, DType::kF32, m * ld + c0, cnt)
                             : load16(x, dtype, m * ld + c0, cnt);
        }
        transpose16(v);
        for (int j = 0; j < cnt; ++j) {
          const int64_t k = (lora_part ? K : 0) + c0 + j;  // reduction column
          const int64_t k0 = k / kKC * kKC, kc = std::min(kKC, K2 - k0);
          _mm512_storeu_ps(xT + (k0 * npan + (h / 2) * kc + (k - k0)) * kNR + (h % 2) * 16, v[j]);
        }
      }

    // ---- tasks: (W row block) x (y^T column block), whole reduction each
    Scratch cb(t_cblock, kNB * kMB);
    float* cblk = cb.get();  // the task's y^T block [nhi - nlo][mhi - mlo]
    alignas(64) float arows[16 * kKC];   // W micro-panel rows [16][kKC] as decoded (rows >= mr: 0)
    alignas(64) float apanel[kKC * kMR];  // the same packed [kc][14] for the micro-kernel, L1
    std::fill_n(arows, 16 * kKC, 0.0f);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t tn = 0; tn < nbl.count; ++tn)
      for (int64_t tm = 0; tm < mbl.count; ++tm) {
        const int64_t nlo = nbl.lo(tn), nhi = nbl.hi(tn);
        const int64_t mlo = mbl.lo(tm), mhi = mbl.hi(tm);
        for (int64_t k0 = 0; k0 < K2; k0 += kKC) {
          const int64_t kc = std::min(kKC, K2 - k0);
          const int64_t kw = std::max<int64_t>(0, std::min(K, k0 + kc) - k0);  // W columns in chunk
          for (int64_t i0 = nlo; i0 < nhi; i0 += kMR) {
            const int64_t mr = std::min<int64_t>(kMR, nhi - i0);
            for (int64_t i = 0; i < mr; ++i) {
              const int64_t n = i0 + i;
              float* dst = arows + i * kKC;
              if (kw > 0) dec.flat(n * K + k0, kw, dst);
              for (int64_t k = kw; k < kc; ++k) dst[k] = scaling * B[n * r + (k0 + k - K)];
            }
            if (mr < kMR)  // stale rows of the previous micro-panel: never read, but keep them finite
              std::fill(arows + mr * kKC, arows + kMR * kKC, 0.0f);
            pack_a(arows, kKC, kc, apanel);
            // the next micro-panel's NF4 bytes (from L3 / DRAM) arrive while this one computes
            if (kw > 0)
              for (int64_t n = i0 + kMR; n < std::min(nhi, i0 + 2 * kMR); ++n) dec.prefetch(n * K + k0, kw);
            for (int64_t p0 = mlo; p0 < mhi; p0 += kNR)
              run_tile(mr, mhi - p0, apanel, xT + (k0 * npan + (p0 / kNR) * kc) * kNR, kc,
                       cblk + (i0 - nlo) * (mhi - mlo) + (p0 - mlo), mhi - mlo, k0 > 0);
          }
        }
        copy_block(cblk, mhi - mlo, nhi - nlo, mhi - mlo, yT + nlo * Mp + mlo, Mp);
      }
  }
}

void gemm_backward_dx(const NF4Weight& w, const float* dy, int64_t M, float* dxacc, int64_t ldc) {
  const Decoder dec(w);
  const int64_t N = w.N, K = w.K;
  const int64_t Kp = rup(K, 16);
  const int64_t nmp = cdiv(M, kMR);  // 14-row dy micro-panels
  const int64_t threads = omp_get_max_threads();
  const Blocks mbl(M, kMR, kMBdx / kMR, 1);
  const Blocks kbl(K, kNR, kKB / kNR, mbl.count >= threads ? 1 : cdiv(threads, mbl.count));
  Scratch ds(t_pack, nmp * N * kMR);
  float* dyp = ds.get();  // [nmp][N][14]
  const int64_t nblk = cdiv(N, 16);

#pragma omp parallel
  {
    // ---- pack dy into 14-row micro-panels, 16 x 16 blocks (rows 14, 15 of a block unused)
#pragma omp for collapse(2) schedule(static)
    for (int64_t mp = 0; mp < nmp; ++mp)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t n0 = b * 16;
        const int cnt = static_cast<int>(std::min<int64_t>(16, N - n0));
        __m512 v[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t m = mp * kMR + j;
          v[j] = (j < kMR && m < M) ? load16(dy, DType::kF32, m * N + n0, cnt) : _mm512_setzero_ps();
        }
        transpose16(v);
        float* dst = dyp + (mp * N + n0) * kMR;
        for (int j = 0; j < cnt; ++j) _mm512_mask_storeu_ps(dst + j * kMR, 0x3fff, v[j]);
      }

    // ---- tasks: (dx column block) x (dy row block), whole reduction each
    Scratch wb(t_panel, kNC * kKB + 32);
    float* wbuf = wb.get();  // [cols/32][nc][32]
    Scratch cb(t_cblock, kMBdx * kKB);
    float* cblk = cb.get();  // the task's dx block [mhi - mlo][npanel * 32]
    alignas(64) float row[kKB + 32];
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t tk = 0; tk < kbl.count; ++tk)
      for (int64_t tm = 0; tm < mbl.count; ++tm) {
        const int64_t klo = kbl.lo(tk), khi = kbl.hi(tk);
        const int64_t cend = std::min(Kp, rup(khi, 16));  // columns written (>= K: scratch)
        const int64_t npanel = cdiv(cend - klo, kNR);
        const int64_t mlo = mbl.lo(tm), mhi = mbl.hi(tm);
        for (int64_t n0 = 0; n0 < N; n0 += kNC) {
          const int64_t nc = std::min(kNC, N - n0);
          for (int64_t i = 0; i < nc; ++i) {
            dec.flat((n0 + i) * K + klo, khi - klo, row);
            std::fill(row + (khi - klo), row + npanel * kNR, 0.0f);
            for (int64_t cp = 0; cp < npanel; ++cp) {
              float* d = wbuf + (cp * nc + i) * kNR;
              _mm512_storeu_ps(d, _mm512_loadu_ps(row + cp * kNR));
              _mm512_storeu_ps(d + 16, _mm512_loadu_ps(row + cp * kNR + 16));
            }
          }
          // the next chunk's NF4 rows (2 KB+ apart: no hardware stream) are prefetched a few rows
          // per dy micro-panel, so they arrive while this chunk computes
          const int64_t nnext = std::min(kNC, std::max<int64_t>(0, N - (n0 + kNC)));
          const int64_t steps = cdiv(mhi - mlo, kMR);
          for (int64_t m0 = mlo; m0 < mhi; m0 += kMR) {
            const int64_t mr = std::min<int64_t>(kMR, mhi - m0);
            const float* a = dyp + ((m0 / kMR) * N + n0) * kMR;
            const int64_t st = (m0 - mlo) / kMR;
            for (int64_t i = st * nnext / steps; i < (st + 1) * nnext / steps; ++i)
              dec.prefetch((n0 + kNC + i) * K + klo, khi - klo);
            for (int64_t cp = 0; cp < npanel; ++cp) {
              const int64_t c = klo + cp * kNR;
              run_tile(mr, cend - c, a, wbuf + cp * nc * kNR, nc,
                       cblk + (m0 - mlo) * npanel * kNR + cp * kNR, npanel * kNR, n0 > 0);
            }
          }
        }
        copy_block(cblk, npanel * kNR, mhi - mlo, cend - klo, dxacc + mlo * ldc + klo, ldc);
      }
  }
}

}  // namespace avx512lin
}  // namespace nf4lora
