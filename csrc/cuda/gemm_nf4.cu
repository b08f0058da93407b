// CUDA NF4 linear, tensor-core tile (mma.sync.m16n8k16, bf16/fp16 in, fp32 accumulate; sm_80+).
//   forward  (BWD = false): out [M, N] = x  [M, K] W^T    reduction over k, W tile = BN rows of W
//   backward (BWD = true):  out [M, K] = dy [M, N] W      reduction over n, W tile = BK rows of W
// Both read the bitsandbytes layout directly: 32 consecutive codes of a W row are 16 aligned
// bytes (K % 32 == 0 on this path) and one NF4 block, so one cp.async moves them and one scale
// covers them. A multi-stage cp.async pipeline stages x/dy, packed W and the per-chunk scales
// (double-quantized absmax decoded when staged); codes are decoded in registers (warp-shuffle
// table, times the scale, rounded to the activation dtype) straight into B fragments.
// The reduction order inside each mma step is permuted (nf4_frag.h kperm) so that a thread's
// A values are one 8-byte load and its codes are whole bytes (fwd) or whole words (bwd).
// Epilogue: LoRA term with tensor cores (scaling * U lora_B^T, or scaling * D(G lora_A) with the
// dropout mask applied per element), bias, store in the activation dtype; with split-K the fp32
// partials go to the workspace and linear_simt.cu's finalize applies the epilogue.
// Tiles: linear_plan.h kGemmCfgs (each row instantiated below for bf16/fp16 x fwd/bwd).
// Register / shared-memory report: see the end of this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launch.h"
#include "cuda/linear.h"

namespace nf4lora {
namespace cuda {
namespace {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // src-size 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <DType D>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<DType::kBF16>(float c[4], const uint32_t a[4],
                                                        const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<DType::kF16>(float c[4], const uint32_t a[4],
                                                       const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <DType D>
__device__ __forceinline__ void store_out(void* out, int64_t i, float v) {
  if (D == DType::kBF16)
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(out)[i] = __float2half_rn(v);
}

template <DType D, bool BWD, int MF, int NF, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(32 * WM * WN, 1)
    gemm_nf4_kernel(const void* __restrict__ act, int64_t M, NF4Weight w, LinearEpilogue epi,
                    void* __restrict__ out, float* __restrict__ ws, int64_t split_len) {
  using Tile = GemmTile<MF, NF, WM, WN, STAGES>;
  constexpr int BN = Tile::BN, BM = Tile::BM, T = Tile::kThreads;
  constexpr int kSPerRow = BWD ? BN / kChunk : kGemmBK / kChunk;  // scale slots per W tile row
  constexpr int kWStride = BWD ? BN / 2 + 16 : kWStrideFwd;
  extern __shared__ __align__(16) uint8_t smem[];

  const int64_t red = BWD ? w.N : w.K;
  const int64_t ncols = BWD ? w.K : w.N;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * 16 * MF, wn0 = (warp % WN) * 8 * NF;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.z) * split_len;
  const int64_t r_end = r_begin + split_len < red ? r_begin + split_len : red;
  const int ntiles = static_cast<int>(ceil_div(r_end - r_begin, kGemmBK));
  const uint8_t* act8 = static_cast<const uint8_t*>(act);

  auto stage_a = [&](int st) { return smem + st * Tile::kStageBytes; };
  auto stage_w = [&](int st) { return smem + st * Tile::kStageBytes + Tile::kABytes; };
  auto stage_s = [&](int st) {
    return reinterpret_cast<float*>(smem + st * Tile::kStageBytes + Tile::kABytes + Tile::kWBytes);
  };
  auto issue_copies = [&](int st, int64_t r0) {
#pragma unroll
    for (int q = 0; q < Tile::kACopies / T; ++q) {
      const int i = tid + q * T;
      const CopyOp op = a_copy_op(i, m0, r0, M, red, r_end);
      cp_async16(stage_a(st) + op.dst, op.valid ? act8 + op.src * 2 : act8, op.valid);
    }
#pragma unroll
    for (int q = 0; q < Tile::kWCopies / T; ++q) {
      const int i = tid + q * T;
      const CopyOp op = w_copy_op(BWD, i, BN, c0, r0, r_end, w.N, w.K);
      cp_async16(stage_w(st) + op.dst, op.valid ? w.packed + op.src : w.packed, op.valid);
    }
  };
  constexpr int kSPerThread = Tile::kScales / T;
  auto fetch_scales = [&](int64_t r0, float (&v)[kSPerThread]) {
#pragma unroll
    for (int q = 0; q < kSPerThread; ++q) {
      const int64_t b = scale_block_op(BWD, tid + q * T, BN, c0, r0, r_end, w.N, w.K, w.blocksize);
      v[q] = b >= 0 ? w.scales.block(b) : 0.0f;
    }
  };
  auto put_scales = [&](int st, const float (&v)[kSPerThread]) {
#pragma unroll
    for (int q = 0; q < kSPerThread; ++q) stage_s(st)[tid + q * T] = v[q];
  };

  // prologue: stages 0 .. STAGES-2
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ntiles) {
      issue_copies(st, r_begin + st * kGemmBK);
      float v[kSPerThread];
      fetch_scales(r_begin + st * kGemmBK, v);
      put_scales(st, v);
    }
    cp_async_commit();
  }
  cp_async_wait<STAGES - 2>();
  __syncthreads();

  const float tbl = nf4_table_reg(lane);
  float acc[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][f][e] = 0.0f;

  for (int t = 0; t < ntiles; ++t) {
    const int pf = t + STAGES - 1;
    float pend[kSPerThread];
    if (pf < ntiles) {
      issue_copies(pf % STAGES, r_begin + static_cast<int64_t>(pf) * kGemmBK);
      fetch_scales(r_begin + static_cast<int64_t>(pf) * kGemmBK, pend);  // lands during the MMAs
    }
    cp_async_commit();

    const int st = t % STAGES;
    const uint8_t* at = stage_a(st);
    const uint8_t* wt = stage_w(st);
    const float* sc = stage_s(st);
#pragma unroll
    for (int s = 0; s < kGemmBK / 16; ++s) {
      uint32_t b[NF][2];
      if (BWD) {
        frag_b_bwd<D, NF>(wt, kWStride, sc, kSPerRow, wn0, s, lane, tbl, b);
      } else {
#pragma unroll
        for (int f = 0; f < NF; ++f) frag_b_fwd<D>(wt, sc, wn0 + 8 * f, s, lane, tbl, b[f]);
      }
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        uint32_t a[4];
        frag_a(at, wm0 + 16 * i, s, lane, a);
#pragma unroll
        for (int f = 0; f < NF; ++f) mma16816<D>(acc[i][f], a, b[f]);
      }
    }
    if (pf < ntiles) put_scales(pf % STAGES, pend);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
  }
  cp_async_wait<0>();

  // ------------------------------------------------------------------ epilogue
  const bool partial = gridDim.z > 1;
  if (!partial && epi.has_lora(BWD)) {
    uint32_t row_hash[MF][2];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        row_hash[i][h] = epi.drop.row(m0 + wm0 + 16 * i + (lane >> 2) + 8 * h);
    for (int64_t j0 = 0; j0 < epi.r; j0 += 16) {
      uint32_t la[MF][4];
#pragma unroll
      for (int i = 0; i < MF; ++i)
        frag_lora_a<D>(epi.left(BWD), epi.r, M, epi.scaling, m0 + wm0 + 16 * i, j0, lane, la[i]);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        const int64_t col = c0 + wn0 + (BWD ? bwd_col(f, lane >> 2, NF) : 8 * f + (lane >> 2));
        uint32_t lb[2];
        frag_lora_b<D>(BWD, epi.right(BWD), epi.r, ncols, col, j0, lane, lb);
#pragma unroll
        for (int i = 0; i < MF; ++i) {
          float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma16816<D>(tmp, la[i], lb);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (BWD && epi.drop.active()) {
              const RowCol rc = acc_coord(true, NF, wm0, wn0, i, f, lane, e);
              tmp[e] = epi.drop.apply(row_hash[i][e >> 1], c0 + rc.col, tmp[e]);
            }
            acc[i][f][e] += tmp[e];
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_coord(BWD, NF, wm0, wn0, i, f, lane, e);
        const int64_t m = m0 + rc.row, c = c0 + rc.col;
        if (m >= M || c >= ncols) continue;
        float v = acc[i][f][e];
        if (partial) {
          ws[(static_cast<int64_t>(blockIdx.z) * M + m) * ncols + c] = v;
        } else {
          if (!BWD && epi.bias != nullptr) v += epi.bias[c];
          store_out<D>(out, m * ncols + c, v);
        }
      }
}

// Raise the dynamic shared-memory limit of one kernel instance once per device.
template <typename Kernel>
Status prepare(Kernel k, int smem_bytes) {
  static unsigned long long done = 0;  // bit d: device d prepared
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return Status::kCudaError;
  if (dev < 64 && (done >> dev) & 1ull) return Status::kOk;
  if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess)
    return Status::kCudaError;
  if (dev < 64) done |= 1ull << dev;
  return Status::kOk;
}

template <DType D, bool BWD, int CFG>
Status launch_cfg(const LinearPlan& p, const void* a, int64_t M, const NF4Weight& w,
                  const LinearEpilogue& epi, void* out, float* ws, cudaStream_t stream) {
  constexpr GemmCfg c = kGemmCfgs[CFG];
  using Tile = GemmTile<c.mfrags, c.nfrags, c.warps_m, c.warps_n, c.stages>;
  auto kernel = gemm_nf4_kernel<D, BWD, c.mfrags, c.nfrags, c.warps_m, c.warps_n, c.stages>;
  Status s = prepare(kernel, Tile::kSmemBytes);
  if (s != Status::kOk) return s;
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y),
                  static_cast<unsigned>(p.grid_z));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(a, M, w, epi, out, ws, p.split_len);
  return last_launch_status();
}

template <DType D, bool BWD>
Status launch_dtype(const LinearPlan& p, const void* a, int64_t M, const NF4Weight& w,
                    const LinearEpilogue& epi, void* out, float* ws, cudaStream_t stream) {
  static_assert(kNumGemmCfgs == 3, "instantiate every kGemmCfgs row here");
  switch (p.cfg) {
    case 0: return launch_cfg<D, BWD, 0>(p, a, M, w, epi, out, ws, stream);
    case 1: return launch_cfg<D, BWD, 1>(p, a, M, w, epi, out, ws, stream);
    case 2: return launch_cfg<D, BWD, 2>(p, a, M, w, epi, out, ws, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace

Status launch_gemm(const LinearPlan& p, bool bwd, const void* a, DType dt, int64_t M,
                   const NF4Weight& w, const LinearEpilogue& epi, void* out, float* ws,
                   cudaStream_t stream) {
  if (p.grid_x > 0x7fffffff || p.grid_y > 65535 || p.grid_z > 65535) return Status::kBadSize;
  if (dt == DType::kBF16)
    return bwd ? launch_dtype<DType::kBF16, true>(p, a, M, w, epi, out, ws, stream)
               : launch_dtype<DType::kBF16, false>(p, a, M, w, epi, out, ws, stream);
  if (dt == DType::kF16)
    return bwd ? launch_dtype<DType::kF16, true>(p, a, M, w, epi, out, ws, stream)
               : launch_dtype<DType::kF16, false>(p, a, M, w, epi, out, ws, stream);
  return Status::kBadDtype;
}

}  // namespace cuda
}  // namespace nf4lora

// ---------------------------------------------------------------------------------------------
// ptxas report (nvcc 13.0, -O3 -lineinfo, -Xptxas -v; sm_80 and sm_90 machine code, the compute_90
// PTX is JIT-compiled). No spills anywhere; a kernel change must keep it so.
//   sm_80  gemm<f16,fwd,mf4,nf4,2x2,st4>    168 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_80  gemm<f16,fwd,mf4,nf4,1x4,st4>    168 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_80  gemm<f16,fwd,mf1,nf8,1x4,st4>    140 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_80  gemm<f16,bwd,mf4,nf4,2x2,st4>    238 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_80  gemm<f16,bwd,mf4,nf4,1x4,st4>    214 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_80  gemm<f16,bwd,mf1,nf8,1x4,st4>    154 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_80  gemm<bf16,fwd,mf4,nf4,2x2,st4>   168 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_80  gemm<bf16,fwd,mf4,nf4,1x4,st4>   168 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_80  gemm<bf16,fwd,mf1,nf8,1x4,st4>   140 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_80  gemm<bf16,bwd,mf4,nf4,2x2,st4>   238 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_80  gemm<bf16,bwd,mf4,nf4,1x4,st4>   214 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_80  gemm<bf16,bwd,mf1,nf8,1x4,st4>   154 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_90  gemm<f16,fwd,mf4,nf4,2x2,st4>    168 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_90  gemm<f16,fwd,mf4,nf4,1x4,st4>    168 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_90  gemm<f16,fwd,mf1,nf8,1x4,st4>    155 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_90  gemm<f16,bwd,mf4,nf4,2x2,st4>    193 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_90  gemm<f16,bwd,mf4,nf4,1x4,st4>    164 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_90  gemm<f16,bwd,mf1,nf8,1x4,st4>    161 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_90  gemm<bf16,fwd,mf4,nf4,2x2,st4>   168 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_90  gemm<bf16,fwd,mf4,nf4,1x4,st4>   168 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_90  gemm<bf16,fwd,mf1,nf8,1x4,st4>   155 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
//   sm_90  gemm<bf16,bwd,mf4,nf4,2x2,st4>   193 regs  stack  0 B  spills 0/0 B  94.0 KB dyn smem
//   sm_90  gemm<bf16,bwd,mf4,nf4,1x4,st4>   164 regs  stack  0 B  spills 0/0 B  68.0 KB dyn smem
//   sm_90  gemm<bf16,bwd,mf1,nf8,1x4,st4>   161 regs  stack  0 B  spills 0/0 B  66.0 KB dyn smem
