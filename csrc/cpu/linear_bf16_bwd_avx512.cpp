// Backward driver of the bf16 tile path (csrc/cpu/linear_bf16.h): dx = dy W + s D(g A).
// AVX-512 F/BW code, run only when use_avx512() and the micro-kernel's own check hold.
//
// Tasks of kb dx columns; per N chunk of ncs steps (bwd_shape) the W row pairs of those columns are decoded
// and interleaved (vpermt2w) into VNNI B tiles; A tiles are dy rows, copied once per call into
// tile-contiguous order (pack_rows). The epilogue adds s D(g A) (dropout hashed on 16 lanes).
#include <omp.h>

#include <atomic>

#include "cpu/bf16_tiles_avx512.h"

namespace nf4lora {
namespace bf16lin {

namespace {

// Task shape: dx columns per task (kb) and N steps (of 32) per decoded chunk (ncs). Larger M reuses
// each decoded chunk (1024 x 128 bf16 = 256 KB) over many dy rows; small M is bound by the decode,
// so each W row segment is made longer (512 columns: fewer row starts, longer prefetch streams).
struct BwdShape {
  int64_t kb, ncs;
};
inline BwdShape bwd_shape(int64_t Mp) { return Mp <= 64 ? BwdShape{512, 8} : BwdShape{128, 32}; }

}  // namespace

Status backward_dx(const TileKernel& kern, const uint16_t* dy, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, uint16_t* dx) {
  const LinearEpilogue* lora = epi.has_lora(true) ? &epi : nullptr;
  const float* g = epi.g;
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

  const BwdShape shape = bwd_shape(Mp);
  const int64_t kKB = shape.kb, kNCS = shape.ncs;
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
