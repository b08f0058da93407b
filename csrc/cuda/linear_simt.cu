// CUDA NF4 linear: the general-shape SIMT path and the small LoRA kernels.
//   simt_linear_kernel<BWD>: any M, N, K (K need not be a multiple of anything; NF4 blocks may
//       straddle W rows), any activation dtype. 64 x 64 outputs per block, 256 threads, 4 x 4 per
//       thread, reduction tile 16; W elements fetched one by one through nf4_element(). The slow,
//       always-correct path (awkward K, unaligned pointers, fp32 activations at M > 16, pre-sm_80).
//   finalize_kernel: sums split-K partials [splits, M, ncols] and applies the epilogue.
//   lora_u_kernel: U [M, r] = D(x) A^T (float32), 64 rows x 16 ranks per block: the LoRA shrink
//       every forward launch with a LoRA term runs first (linear.cu), into the caller's u.
//   lora_grad_a_kernel: partial dA over an M-split, then a reduce kernel (deterministic order).
// Register / shared-memory report (nvcc 13.0, -Xptxas -v): see the block at the end of this file.
#include "cuda/launch.h"
#include "cuda/linear.h"

namespace nf4lora {
namespace cuda {
namespace {

__device__ __forceinline__ float act_load(const void* p, DType d, int64_t i) { return load_as_f32(p, d, i); }

template <bool BWD>
__global__ void __launch_bounds__(kSimtThreads, 2)
    simt_linear_kernel(const void* __restrict__ a, DType dt, int64_t M, NF4Weight w,
                       LinearEpilogue epi, void* __restrict__ out) {
  // forward: out [M, N] = a [M, K] W^T  (reduction over k, output column n)
  // backward: out [M, K] = a [M, N] W   (reduction over n, output column k)
  const int64_t red = BWD ? w.N : w.K;
  const int64_t ncols = BWD ? w.K : w.N;
  __shared__ float as[kSimtBK][kSimtTile + 1];
  __shared__ float ws[kSimtBK][kSimtTile + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSimtTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kSimtTile;
  float acc[4][4] = {};
  for (int64_t r0 = 0; r0 < red; r0 += kSimtBK) {
    for (int e = tid; e < kSimtBK * kSimtTile; e += kSimtThreads) {
      const int kk = e % kSimtBK, mm = e / kSimtBK;  // consecutive threads: consecutive reduction
      const int64_t m = m0 + mm, r = r0 + kk;
      as[kk][mm] = (m < M && r < red) ? act_load(a, dt, m * red + r) : 0.0f;
    }
    for (int e = tid; e < kSimtBK * kSimtTile; e += kSimtThreads) {
      int kk, cc;
      if (BWD) {  // W row = reduction index, consecutive threads along the row (output columns)
        kk = e / kSimtTile;
        cc = e % kSimtTile;
      } else {    // W row = output column, consecutive threads along the row (reduction)
        kk = e % kSimtBK;
        cc = e / kSimtBK;
      }
      const int64_t r = r0 + kk, c = c0 + cc;
      float v = 0.0f;
      if (r < red && c < ncols) {
        v = BWD ? nf4_element(w.packed, w.scales, w.blocksize, w.K, r, c)
                : nf4_element(w.packed, w.scales, w.blocksize, w.K, c, r);
      }
      ws[kk][cc] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c >= ncols) continue;
      store_from_f32(out, dt, m * ncols + c, epilogue_value(epi, BWD, m, c, ncols, acc[i][j]));
    }
  }
}

__global__ void finalize_kernel(int splits, const float* __restrict__ ws, bool bwd, DType dt,
                                int64_t M, int64_t ncols, LinearEpilogue epi, void* __restrict__ out) {
  const int64_t total = M * ncols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += ws[k * total + i];  // fixed order: deterministic
    const int64_t m = i / ncols, c = i % ncols;
    store_from_f32(out, dt, i, epilogue_value(epi, bwd, m, c, ncols, s));
  }
}

// U [M, r] = D(x) A^T. Block: 64 rows x 16 ranks (grid.y over rank chunks), 128 threads, each
// 4 rows x 2 ranks; K staged 64 at a time.
constexpr int kLuRows = 64, kLuRanks = 16, kLuK = 64, kLuThreads = 128;
__global__ void __launch_bounds__(kLuThreads)
    lora_u_kernel(const void* __restrict__ x, DType dt, int64_t M, int64_t K,
                  const float* __restrict__ A, int64_t r, DropoutMask mask, float* __restrict__ u) {
  __shared__ float xs[kLuRows][kLuK + 1];
  __shared__ float ash[kLuRanks][kLuK + 1];
  const int tid = threadIdx.x;
  const int rg = tid & 15, jg = tid >> 4;  // rows rg + 16i, ranks jg + 8jj
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kLuRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kLuRanks;
  float acc[4][2] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kLuK) {
    for (int e = tid; e < kLuRows * kLuK; e += kLuThreads) {
      const int mm = e / kLuK, kk = e % kLuK;
      const int64_t m = m0 + mm, k = k0 + kk;
      float v = 0.0f;
      if (m < M && k < K) {
        v = load_as_f32(x, dt, m * K + k);
        if (mask.active()) v = mask.apply(mask.row(m), k, v);
      }
      xs[mm][kk] = v;
    }
    for (int e = tid; e < kLuRanks * kLuK; e += kLuThreads) {
      const int jj = e / kLuK, kk = e % kLuK;
      const int64_t j = j0 + jj, k = k0 + kk;
      ash[jj][kk] = (j < r && k < K) ? A[j * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kLuK; ++kk) {
      float xv[4], av[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xs[rg + 16 * i][kk];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) av[jj] = ash[jg + 8 * jj][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) acc[i][jj] = fmaf(xv[i], av[jj], acc[i][jj]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + rg + 16 * i;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int64_t j = j0 + jg + 8 * jj;
      if (m < M && j < r) u[m * r + j] = acc[i][jj];
    }
  }
}

// Partial dA over rows [m_begin, m_end) of one split: part [r, K] = G^T D(x). Block: 16 ranks x
// 64 columns, 256 threads, each 1 rank x 4 columns; M staged 32 rows at a time.
constexpr int kGaRanks = 16, kGaCols = 64, kGaRows = 32, kGaThreads = 256;
__global__ void __launch_bounds__(kGaThreads)
    lora_grad_a_kernel(const float* __restrict__ g, const void* __restrict__ x, DType dt, int64_t M,
                       int64_t K, int64_t r, DropoutMask mask, int64_t rows_per_split,
                       float* __restrict__ part) {
  __shared__ float gs[kGaRows][kGaRanks + 1];
  __shared__ float xs[kGaRows][kGaCols + 1];
  const int tid = threadIdx.x;
  const int jj = tid >> 4, cg = tid & 15;  // rank jj, columns cg + 16q
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kGaCols;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kGaRanks;
  const int64_t mb = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t me = mb + rows_per_split < M ? mb + rows_per_split : M;
  float acc[4] = {};
  for (int64_t m0 = mb; m0 < me; m0 += kGaRows) {
    for (int e = tid; e < kGaRows * kGaRanks; e += kGaThreads) {
      const int mm = e / kGaRanks, j = e % kGaRanks;
      const int64_t m = m0 + mm;
      gs[mm][j] = (m < me && j0 + j < r) ? g[m * r + j0 + j] : 0.0f;
    }
    for (int e = tid; e < kGaRows * kGaCols; e += kGaThreads) {
      const int mm = e / kGaCols, cc = e % kGaCols;
      const int64_t m = m0 + mm, c = c0 + cc;
      float v = 0.0f;
      if (m < me && c < K) {
        v = load_as_f32(x, dt, m * K + c);
        if (mask.active()) v = mask.apply(mask.row(m), c, v);
      }
      xs[mm][cc] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < kGaRows; ++mm) {
      const float gv = gs[mm][jj];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(gv, xs[mm][cg + 16 * q], acc[q]);
    }
    __syncthreads();
  }
  const int64_t j = j0 + jj;
  if (j >= r) return;
  float* dst = part + static_cast<int64_t>(blockIdx.z) * r * K + j * K;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t c = c0 + cg + 16 * q;
    if (c < K) dst[c] = acc[q];
  }
}

__global__ void lora_grad_a_reduce_kernel(const float* __restrict__ part, int splits, int64_t n,
                                          float scaling, float* __restrict__ da) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += part[k * n + i];
    da[i] = scaling * s;
  }
}

unsigned grid_1d(int64_t n, int threads) {
  const int64_t b = ceil_div(n, threads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65536 ? 65536 : b));
}

}  // namespace

Status launch_simt(bool bwd, const void* a, DType dt, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, void* out, cudaStream_t stream) {
  const int64_t ncols = bwd ? w.K : w.N;
  const int64_t gx = ceil_div(ncols, kSimtTile), gy = ceil_div(M, kSimtTile);
  if (gx > 0x7fffffff || gy > 65535) return Status::kBadSize;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (bwd)
    simt_linear_kernel<true><<<grid, kSimtThreads, 0, stream>>>(a, dt, M, w, epi, out);
  else
    simt_linear_kernel<false><<<grid, kSimtThreads, 0, stream>>>(a, dt, M, w, epi, out);
  return last_launch_status();
}

Status launch_finalize(int splits, const float* ws, bool bwd, DType dt, int64_t M, int64_t ncols,
                       const LinearEpilogue& epi, void* out, cudaStream_t stream) {
  finalize_kernel<<<grid_1d(M * ncols, 256), 256, 0, stream>>>(splits, ws, bwd, dt, M, ncols, epi,
                                                                out);
  return last_launch_status();
}

Status launch_lora_u(const void* x, DType dt, int64_t M, int64_t K, const LinearEpilogue& epi,
                     cudaStream_t stream) {
  const int64_t gx = ceil_div(M, kLuRows), gy = ceil_div(epi.r, kLuRanks);
  if (gx > 0x7fffffff || gy > 65535) return Status::kBadSize;
  lora_u_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kLuThreads, 0,
                  stream>>>(x, dt, M, K, epi.A, epi.r, epi.drop, epi.u);
  return last_launch_status();
}

Status lora_grad_a(const float* g, const void* x, DType dt, int64_t M, int64_t K, int64_t r,
                   float scaling, const DropoutMask& mask, float* da, float* ws,
                   cudaStream_t stream) {
  if (M <= 0 || K <= 0 || r <= 0) return Status::kBadSize;
  if (!g || !x || !da) return Status::kNullPointer;
  const int64_t splits = lora_grad_a_splits(M);
  if (splits > 1 && !ws) return Status::kNullPointer;
  const int64_t rows = ceil_div(M, splits);
  const int64_t gx = ceil_div(K, kGaCols), gy = ceil_div(r, kGaRanks);
  if (gx > 0x7fffffff || gy > 65535) return Status::kBadSize;
  float* part = splits > 1 ? ws : da;
  lora_grad_a_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                            static_cast<unsigned>(splits)),
                       kGaThreads, 0, stream>>>(g, x, dt, M, K, r, mask, rows, part);
  Status s = last_launch_status();
  if (s != Status::kOk) return s;
  const int64_t n = r * K;
  if (splits > 1 || scaling != 1.0f) {
    lora_grad_a_reduce_kernel<<<grid_1d(n, 256), 256, 0, stream>>>(part, static_cast<int>(splits),
                                                                   n, scaling, da);
    s = last_launch_status();
  }
  return s;
}

}  // namespace cuda
}  // namespace nf4lora

// ---------------------------------------------------------------------------------------------
// ptxas report (nvcc 13.0, -O3 -lineinfo, -Xptxas -v; sm_80 and sm_90 machine code, the compute_90
// PTX is JIT-compiled). No spills anywhere; a kernel change must keep it so.
//   sm_80  simt_linear_kernel<fwd>           72 regs  stack  0 B  spills 0/0 B  8320 B static smem
//   sm_80  simt_linear_kernel<bwd>           80 regs  stack  0 B  spills 0/0 B  8320 B static smem
//   sm_80  lora_grad_a_reduce_kernel         32 regs  stack  0 B  spills 0/0 B  
//   sm_80  lora_grad_a_kernel                48 regs  stack  0 B  spills 0/0 B  10496 B static smem
//   sm_80  lora_u_kernel                     59 regs  stack  0 B  spills 0/0 B  20800 B static smem
//   sm_80  finalize_kernel                   32 regs  stack  0 B  spills 0/0 B  
//   sm_90  simt_linear_kernel<fwd>           80 regs  stack  0 B  spills 0/0 B  8320 B static smem
//   sm_90  simt_linear_kernel<bwd>           88 regs  stack  0 B  spills 0/0 B  8320 B static smem
//   sm_90  lora_grad_a_reduce_kernel         32 regs  stack  0 B  spills 0/0 B  
//   sm_90  lora_grad_a_kernel                44 regs  stack  0 B  spills 0/0 B  10496 B static smem
//   sm_90  lora_u_kernel                     54 regs  stack  0 B  spills 0/0 B  20800 B static smem
//   sm_90  finalize_kernel                   32 regs  stack  0 B  spills 0/0 B  
