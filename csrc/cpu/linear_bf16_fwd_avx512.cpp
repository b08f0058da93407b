// Forward driver of the bf16 tile path (csrc/cpu/linear_bf16.h): y = x W^T + bias + s u B^T.
// AVX-512 F/BW code, run only when use_avx512() and the micro-kernel's own check hold.
//
// y^T = W x^T: tasks of W rows (fwd_shape) decode each K chunk once into a row-major A panel and
// run it against every 32-row group of x, whose VNNI tiles were packed once per call (pack_x, in
// the same pass as the LoRA shrink u = D(x) A^T); the task's fp32 y^T accumulator is transposed out
// with the bias and the LoRA expand.
#include <omp.h>

#include <atomic>
#include <vector>

#include "cpu/bf16_tiles_avx512.h"

namespace nf4lora {
namespace bf16lin {

namespace {

// Task shape: W rows per task and K steps (of 32) per decoded chunk. Small M is bound by the
// decode: one tile pair per task over 4096-column row segments (long prefetch streams; A read back
// from L2 once per x row group). Larger M is bound by tile loads: 128-row tasks over 1024-column
// chunks keep the task's y^T accumulator (128 x Mp fp32) and the chunk's operands in L2, each x
// tile meeting 4 row pairs, C held in tiles over a whole chunk (the mirror of the dx driver).
struct FwdShape {
  int64_t rows, kcs;
};
inline FwdShape fwd_shape(int64_t Mp, const TileKernel& kern) {
  return Mp <= 64 ? FwdShape{32, kKCS} : FwdShape{128, 2 * kern.sub_steps};
}

void lora_shrink_row(const uint16_t* xr, int64_t m, int64_t K, const LinearEpilogue& lora, float* row, float* um) {
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
               const LinearEpilogue& epi, uint16_t* y) {
  const LinearEpilogue* lora = epi.has_lora(false) ? &epi : nullptr;
  const float* bias = epi.bias;
  float* u = epi.u;
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

  // Task shape (fwd_shape): W rows per task and K steps (of 32) per decoded chunk.
  const FwdShape shape = fwd_shape(Mp, kern);
  const int64_t tr = shape.rows, pairs_per_task = tr / 32, ntasks = (N + tr - 1) / tr;
  std::atomic<bool> alloc_failed{false};
#pragma omp parallel
  {
    // The task's decoded W rows, row-major with one spare 64-byte line per row: row i's step s at
    // pbuf + i * ldw + 32 s, so the decode writes each row sequentially and an A tile (16 rows,
    // stride ldw) spreads over L1 sets instead of landing in one (a 2^k-byte stride would).
    Scratch<uint16_t> pbuf(kSlotPanel, tr * (shape.kcs + 1) * 32);
    Scratch<float> acc(kSlotAcc, tr * Mp);  // the task's y^T [tr][Mp], fp32
    const bool ok = pbuf.ok() && acc.ok();
    if (!ok) alloc_failed.store(true);
    if (ok) kern.thread_begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      if (!ok) continue;
      const int64_t n0 = t * tr, rows = std::min(tr, N - n0);
      const int64_t pairs = std::min(pairs_per_task, (rows + 31) / 32);
      for (int64_t kc0 = 0; kc0 < ksteps; kc0 += shape.kcs) {
        const int64_t kcs = std::min(shape.kcs, ksteps - kc0), ldw = (kcs + 1) * 32;
        for (int64_t i = 0; i < pairs * 32; ++i)
          decode_row(w, lb, n0 + i, kc0, kcs, pbuf.get() + i * ldw, 32, tr);
        // each x row group's chunk tiles meet every row pair of the task while in L1/L2
        for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
          const int64_t mt = m0 / 16;
          const uint16_t* b0 = xpack.get() + (mt * ksteps + kc0) * kTile;
          const uint16_t* b1 = m0 + 16 < Mp ? xpack.get() + ((mt + 1) * ksteps + kc0) * kTile : nullptr;
          for (int64_t p = 0; p < pairs; ++p)
            kern.block(pbuf.get() + 32 * p * ldw, pbuf.get() + (32 * p + 16) * ldw, 32, ldw, b0, b1, kTile, kcs,
                       acc.get() + p * 32 * Mp + m0, Mp, kc0 > 0);
        }
      }
      forward_epilogue(acc.get(), Mp, M, N, n0, rows, bias, lora ? u : nullptr, sBt.data(), Np16, r, y);
    }
    if (ok) kern.thread_end();
  }
  return alloc_failed ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace bf16lin
}  // namespace nf4lora
