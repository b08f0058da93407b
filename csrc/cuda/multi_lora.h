// CUDA multi-adapter LoRA term (DESIGN.md "Many adapters in one batch"; the CPU twin is
// csrc/cpu/multi_lora.h, the oracle csrc/ref/multi_lora_ref.h):
//
//   y[m] += s_e (x[m] A_e^T) B_e^T  for rows with e = idx[m] in [0, E); y holds the base on entry
//
// Two kernels on one stream: shrink u [M, r] = x A_e^T (float32 workspace from torch), expand
// y += s u B_e^T in place. A block handles a tile of T consecutive positions of `order` (a row
// permutation; null = identity) and, inside it, each run of equal adapter ids at once:
//   BGMV  T = 1, order null: one row per block, any row order (decode batches: M blocks).
//   SGMV  T = kSgmvTile, order = rows sorted by adapter (torch.argsort, stable): a run's A_e row /
//         B_e row is loaded once per tile and used for up to T rows.
// Shrink: one A row j per warp (blockIdx.y picks the group of 8 ranks, so a decode batch of one row
// still spreads r / 8 blocks); a lane sums k = lane, lane + 32, ... for every row of the run, then
// a butterfly of __shfl_xor_sync. Expand: one output column per
// thread, kExpandCols per block; the thread reads B_e[n, 0:r] and adds s * u[row] . B_e[n] to each
// row of the run. Rows whose id is outside [0, E) are skipped (the Python layer rejects them first).
//
// The per-thread pieces are __host__ __device__ so tests/test_cuda_host.py runs them lane by lane
// on the CPU (csrc/bindings/cuda_multi_lora.cpp: multi_lora_emulate_host).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/nf4.h"
#include "nf4lora/status.h"

namespace nf4lora {
namespace cuda {
namespace mlora {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kExpandCols = kThreads;  // one output column per thread
constexpr int kSgmvTile = 8;           // rows per block on the SGMV path

NF4LORA_HD int64_t row_at(const int64_t* order, int64_t p) { return order ? order[p] : p; }

// Shrink grid: blocks along y for r ranks, and the rank warp w of block y computes (>= r: none)
NF4LORA_HD int64_t shrink_blocks_y(int64_t r) { return (r + kWarps - 1) / kWarps; }
NF4LORA_HD int64_t shrink_rank(int64_t block_y, int warp) { return block_y * kWarps + warp; }

// The run of equal adapter ids that starts at position p (< p1) of a tile ending at p1: fills
// rows[0:n] (rows[n:T] repeat rows[0], so every read stays in bounds), *adapter, *n; returns the
// next p. Every index is a compile-time constant after unrolling (no local memory on the GPU).
template <int T>
NF4LORA_HD int64_t next_run(const int64_t* idx, const int64_t* order, int64_t p, int64_t p1,
                            int64_t* adapter, int64_t rows[T], int* n) {
  const int64_t e = idx[row_at(order, p)];
  int c = 0;
  bool open = true;
  NF4LORA_UNROLL
  for (int t = 0; t < T; ++t) {
    open = open && p + t < p1 && idx[row_at(order, p + t)] == e;
    rows[t] = open ? row_at(order, p + t) : rows[0];
    c += open ? 1 : 0;
  }
  *adapter = e;
  *n = c;
  return p + c;
}

// One lane's shrink partials: acc[t] = sum over k = lane, lane + 32, ... < K of x[rows[t], k] a[k]
// (a: A_e's row j, elements a0 .. a0 + K of the pool A in pdt)
template <int T>
NF4LORA_HD void shrink_lane(const void* x, DType dt, int64_t K, const int64_t rows[T],
                            const void* A, DType pdt, int64_t a0, int lane, float acc[T]) {
  NF4LORA_UNROLL
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const float a = load_as_f32(A, pdt, a0 + k);
    NF4LORA_UNROLL
    for (int t = 0; t < T; ++t) acc[t] += a * load_as_f32(x, dt, rows[t] * K + k);
  }
}

// One thread's expand sums for its column: acc[t] = u[rows[t], :] . b[0:r] (b: B_e's row n,
// elements b0 .. b0 + r of the pool B in pdt)
template <int T>
NF4LORA_HD void expand_col(const float* u, int64_t r, const int64_t rows[T], const void* B,
                           DType pdt, int64_t b0, float acc[T]) {
  NF4LORA_UNROLL
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
  for (int64_t j = 0; j < r; ++j) {
    const float b = load_as_f32(B, pdt, b0 + j);
    NF4LORA_UNROLL
    for (int t = 0; t < T; ++t) acc[t] += u[rows[t] * r + j] * b;
  }
}

// y[i] (in dt) += s * v, formed in fp32 and rounded once
NF4LORA_HD void add_out(void* y, DType dt, int64_t i, float s, float v) {
  store_from_f32(y, dt, i, load_as_f32(y, dt, i) + s * v);
}

}  // namespace mlora

// The launcher (device pointers; pools in pdt = f32/f16/bf16; `u` float32 [M, r] workspace;
// order required when sgmv).
Status multi_lora_add(const void* x, DType dt, int64_t M, int64_t K, int64_t N,
                      const void* A_pool, const void* B_pool, DType pdt, const int64_t* idx,
                      const int64_t* order, const float* scalings, int64_t E, int64_t r, float* u,
                      void* y, bool sgmv, cudaStream_t stream);

}  // namespace cuda
}  // namespace nf4lora
