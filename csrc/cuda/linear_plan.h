// The dispatcher of the CUDA NF4 linear: which kernel (GEMV / tensor-core GEMM / SIMT fallback),
// which tile, how many reduction splits, the grid and the workspace, as a pure function of the
// problem (M, N, K, direction, dtype, alignment) and the device (SM count, compute capability).
// Host-only and free of CUDA calls, so the CPU tests check every decision.
//
// RETUNE HERE: kDispatch (the M thresholds and tile per row) and kGemmCfgs are the only knobs; the
// kernels read their tile shapes from these tables (gemm_nf4.cu instantiates each kGemmCfgs row).
#pragma once
#include <cstdint>

#include "cuda/nf4_frag.h"
#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace cuda {

enum class LinearPath : int { kSimt = 0, kGemv = 1, kGemm = 2 };

// Tensor-core tiles: warp tile (16*mfrags) x (8*nfrags), BK 64. Index = the `cfg` of a plan.
struct GemmCfg {
  int mfrags, nfrags, warps_m, warps_n, stages;
};
constexpr GemmCfg kGemmCfgs[] = {
    {1, 8, 1, 4, 4},  // 0: 16 x 256, 128 threads  (decode-sized batches: one m16 fragment per warp)
    {4, 4, 1, 4, 4},  // 1: 64 x 128, 128 threads  (medium M)
    {4, 4, 2, 2, 4},  // 2: 128 x 64, 128 threads  (large M; 168 regs -> 3 blocks/SM by registers)
};
constexpr int kNumGemmCfgs = sizeof(kGemmCfgs) / sizeof(kGemmCfgs[0]);

// Rows of the dispatch table, first match on M wins (then the eligibility rules of plan_linear).
struct DispatchRow {
  int64_t max_m;
  LinearPath path;
  int gemm_cfg;  // for kGemm (and the tile used when a GEMV row is not eligible)
};
constexpr DispatchRow kDispatch[] = {
    {2, LinearPath::kGemv, 0},
    {16, LinearPath::kGemm, 0},
    {96, LinearPath::kGemm, 1},
    {INT64_MAX, LinearPath::kGemm, 2},
};

// GEMV (M <= 2): 4 warps per block, each warp owns kGemvRowsPerWarp consecutive W rows and walks
// its reduction split 1024 elements (32 lanes x 16 bytes of codes) at a time; x stays in registers.
constexpr int kGemvWindow = 1024;  // reduction indices a warp covers per step
constexpr int kGemvWarps = 4;
constexpr int kGemvRowsPerWarp = 8;
constexpr int kGemvMaxM = 2;
// SIMT fallback: 64 x 64 outputs per block, 256 threads, 4 x 4 per thread, reduction tile 16.
constexpr int kSimtTile = 64;
constexpr int kSimtBK = 16;
constexpr int kSimtThreads = 256;
// Split the reduction until this many blocks per SM are queued.
constexpr int kGemvBlocksPerSm = 4;
constexpr int kGemmBlocksPerSm = 2;
constexpr int kMinKTilesPerSplit = 4;  // GEMM: >= 4 stages of 64 per split

struct LinearPlan {
  bool ok = true;            // false: a forced path is not eligible for this problem
  LinearPath path = LinearPath::kSimt;
  int cfg = 0;               // GEMM: index into kGemmCfgs
  int gemv_mt = 1;           // GEMV: rows of x per kernel instance (1 or 2)
  int splits = 1;            // reduction splits (> 1: float32 partials in the workspace + finalize)
  int64_t split_len = 0;     // reduction indices per split (multiple of the kernel's unit)
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int threads = 0;
  int64_t smem_bytes = 0;    // dynamic shared memory per block
  int64_t ws_floats = 0;     // workspace the caller allocates (float32 elements)
};

inline int gemm_threads(int cfg) { return 32 * kGemmCfgs[cfg].warps_m * kGemmCfgs[cfg].warps_n; }
inline int gemm_bm(int cfg) { return 16 * kGemmCfgs[cfg].mfrags * kGemmCfgs[cfg].warps_m; }
inline int gemm_bn(int cfg) { return 8 * kGemmCfgs[cfg].nfrags * kGemmCfgs[cfg].warps_n; }
inline int64_t gemm_smem(int cfg) {
  const GemmCfg c = kGemmCfgs[cfg];
  const int bm = 16 * c.mfrags * c.warps_m, bn = 8 * c.nfrags * c.warps_n;
  const int a = bm * kAStride * 2;
  const int wf = bn * kWStrideFwd, wb = kGemmBK * (bn / 2 + 16);
  const int w = wf > wb ? wf : wb;
  return static_cast<int64_t>(c.stages) * (a + w + (bn * kGemmBK / kChunk) * 4);
}

// Splits of a reduction of length `len` in units of `unit` so that tiles * splits reaches the
// target occupancy, each split at least `min_units` units long.
inline int choose_splits(int64_t tiles, int64_t len, int64_t unit, int64_t min_units, int sm_count,
                         int blocks_per_sm, int64_t* split_len) {
  const int64_t units = ceil_div(len, unit);
  const int64_t target = static_cast<int64_t>(sm_count) * blocks_per_sm;
  int64_t s = tiles >= target ? 1 : ceil_div(target, tiles);
  const int64_t max_s = units / min_units > 1 ? units / min_units : 1;
  if (s > max_s) s = max_s;
  if (s > 64) s = 64;
  const int64_t per = ceil_div(units, s);
  s = ceil_div(units, per);  // no empty split
  *split_len = per * unit;
  return static_cast<int>(s);
}

// aligned: x/dy, the output and packed are 16-byte aligned (the fast paths use 16-byte loads).
// force: -1 follows kDispatch; 0/1/2 ask for SIMT/GEMV/GEMM (tests), ok = false if not eligible.
inline LinearPlan plan_linear(int64_t M, int64_t N, int64_t K, bool bwd, DType dt, bool aligned,
                              int sm_count, int cc, int force = -1) {
  LinearPlan p;
  if (sm_count < 1) sm_count = 1;
  const int64_t out_cols = bwd ? K : N;
  const int64_t red = bwd ? N : K;
  // Fast paths read 32 consecutive elements of a W row as 16 aligned bytes (K % 32 == 0) and
  // 8 consecutive activations as 16 aligned bytes (the backward's reduction length N % 8 == 0).
  const bool fast_layout = aligned && K % 32 == 0 && (!bwd || N % 8 == 0);
  DispatchRow row = kDispatch[0];
  for (const DispatchRow& d : kDispatch) {
    if (M <= d.max_m) { row = d; break; }
  }
  LinearPath path = row.path;
  int cfg = row.gemm_cfg;
  if (force >= 0) path = static_cast<LinearPath>(force);
  const LinearPath wanted = path;
  if (path == LinearPath::kGemv && (bwd || M > kGemvMaxM)) path = LinearPath::kGemm;
  if (path == LinearPath::kGemm && (dt == DType::kF32 || cc < 80)) path = LinearPath::kSimt;
  if (!fast_layout) path = LinearPath::kSimt;
  if (force >= 0 && path != wanted) p.ok = false;
  p.path = path;
  if (path == LinearPath::kGemv) {
    p.gemv_mt = M <= 1 ? 1 : 2;
    p.threads = 32 * kGemvWarps;
    const int64_t row_blocks = ceil_div(N, kGemvWarps * kGemvRowsPerWarp);
    int64_t split_len = 0;
    p.splits = choose_splits(row_blocks, K, kGemvWindow, 1, sm_count, kGemvBlocksPerSm, &split_len);
    p.split_len = split_len;
    p.grid_x = row_blocks;
    p.grid_y = p.splits;
  } else if (path == LinearPath::kGemm) {
    p.cfg = cfg;
    p.threads = gemm_threads(cfg);
    const int64_t tiles_m = ceil_div(M, gemm_bm(cfg)), tiles_n = ceil_div(out_cols, gemm_bn(cfg));
    int64_t split_len = 0;
    const int s = choose_splits(tiles_m * tiles_n, red, kGemmBK, kMinKTilesPerSplit, sm_count,
                                kGemmBlocksPerSm, &split_len);
    p.splits = s;
    p.split_len = split_len;
    p.grid_x = tiles_n;
    p.grid_y = tiles_m;
    p.grid_z = s;
    p.smem_bytes = gemm_smem(cfg);
  } else {
    p.threads = kSimtThreads;
    p.grid_x = ceil_div(out_cols, kSimtTile);
    p.grid_y = ceil_div(M, kSimtTile);
    p.splits = 1;
    p.split_len = red;
  }
  p.ws_floats = p.splits > 1 ? static_cast<int64_t>(p.splits) * M * out_cols : 0;
  return p;
}

// The float32 workspace a launch needs (the split-K partials), the one definition of its size:
// the binding that Python sizes the allocation with and the launcher's own check both call it.
inline int64_t linear_workspace_floats(int64_t M, int64_t N, int64_t K, bool bwd, DType dt,
                                       bool aligned, int sm_count, int cc, int force = -1) {
  return plan_linear(M, N, K, bwd, dt, aligned, sm_count, cc, force).ws_floats;
}

// lora_grad_a (linear_simt.cu): M split into lora_grad_a_splits(M) row ranges whose partial dA
// [r, K] go to a float32 workspace of lora_grad_a_ws_floats(M, K, r) elements (0: none needed).
inline int64_t lora_grad_a_splits(int64_t M) {
  // ~1024 rows per split, at most 32 splits: enough blocks at K = 4096 (64 column blocks).
  const int64_t s = ceil_div(M, 1024);
  return s < 1 ? 1 : (s > 32 ? 32 : s);
}
inline int64_t lora_grad_a_ws_floats(int64_t M, int64_t K, int64_t r) {
  const int64_t s = lora_grad_a_splits(M);
  return s > 1 ? s * r * K : 0;
}

}  // namespace cuda
}  // namespace nf4lora
