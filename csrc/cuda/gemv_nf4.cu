// CUDA NF4 linear, GEMV path (M <= 2 rows of activations; larger batches take the 16-row
// tensor-core tile of gemm_nf4.cu, since at M >= 3 fp32 FMAs, not memory, would bound a SIMT
// kernel). y [M, N] = x [M, K] W^T (+ bias + scaling * U lora_B^T).
//   Block: 4 warps; warp w owns kGemvRowsPerWarp = 8 consecutive W rows (output features) and
//   walks its reduction split 1024 codes at a time: lane l loads 16 bytes (32 codes) of each of
//   its 8 rows with an evict-first hint (ld.global.cs: weights are read once, so activations and
//   everything else keep L2), plus the 32 matching activations per x row (kept in registers and
//   reused by the 8 rows). Codes are decoded with a warp-shuffle register table (no memory table),
//   sum(code * x) per 32-chunk in fp32, times the chunk's absmax (double-quantized absmax decoded
//   here), accumulated in fp32; a butterfly reduction ends each row.
//   Split-K: grid.y reduction splits when N alone cannot fill the GPU (linear_plan.h); partials
//   go to the workspace and linear_simt.cu's finalize adds the epilogue.
// Register / shared-memory report: see the end of this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launch.h"
#include "cuda/linear.h"

namespace nf4lora {
namespace cuda {
namespace {

// 32 activations x[i .. i+31] (16-byte aligned) as float32.
template <DType D>
__device__ __forceinline__ void load_x32(const void* x, int64_t i, float v[32]) {
  if (D == DType::kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float4 f = __ldg(p + q);
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + i);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 u = __ldg(p + q);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const uint16_t lo = static_cast<uint16_t>(words[h] & 0xffffu);
        const uint16_t hi = static_cast<uint16_t>(words[h] >> 16);
        if (D == DType::kBF16) {
          v[8 * q + 2 * h] = bf16_to_f32(lo);
          v[8 * q + 2 * h + 1] = bf16_to_f32(hi);
        } else {
          v[8 * q + 2 * h] = __half2float(__ushort_as_half(lo));
          v[8 * q + 2 * h + 1] = __half2float(__ushort_as_half(hi));
        }
      }
    }
  }
}

template <DType D, int MT>
__global__ void __launch_bounds__(32 * kGemvWarps)
    gemv_nf4_kernel(const void* __restrict__ x, int64_t M, NF4Weight w, LinearEpilogue epi,
                    void* __restrict__ y, float* __restrict__ ws, int64_t split_len) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * R;
  if (n0 >= w.N) return;  // whole warp
  const int64_t ks = static_cast<int64_t>(blockIdx.y) * split_len;
  const int64_t ke = ks + split_len < w.K ? ks + split_len : w.K;
  const float tbl = nf4_table_reg(lane);

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  for (int64_t w0 = ks; w0 < ke; w0 += kGemvWindow) {
    const int64_t k = w0 + 32 * lane;
    const bool kv = k < ke;  // whole 32-chunk valid (K % 32 == 0 on this path)
    uint4 q[R];
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      const int64_t e = n * w.K + k;
      const bool ok = kv && n < w.N;
      q[r] = ok ? __ldcs(reinterpret_cast<const uint4*>(w.packed + e / 2)) : make_uint4(0, 0, 0, 0);
      sc[r] = ok ? w.scales.block(e / w.blocksize) : 0.0f;
    }
    float xv[MT][32];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (kv && m < M) {
        load_x32<D>(x, m * w.K + k, xv[m]);
      } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) xv[m][j] = 0.0f;
      }
    }
    // NOTE: decode runs on every lane (full-mask shuffles); invalid lanes have sc = 0, x = 0.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t words[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
      float part[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) part[m] = 0.0f;
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        float v[8];
        nf4_decode8(words[wi], tbl, v);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int m = 0; m < MT; ++m) part[m] = fmaf(v[i], xv[m][8 * wi + i], part[m]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(part[m], sc[r], acc[r][m]);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);

  // lane r*MT + m stores (row m, feature n0 + r)
  float v = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (lane == r * MT + m) v = acc[r][m];
  const int r = lane / MT, m = lane % MT;
  const int64_t n = n0 + r;
  if (lane < R * MT && m < M && n < w.N) {
    if (gridDim.y > 1) {
      ws[(static_cast<int64_t>(blockIdx.y) * M + m) * w.N + n] = v;
    } else {
      const float out = epilogue_value(epi, false, m, n, w.N, v);
      if (D == DType::kF32)
        static_cast<float*>(y)[m * w.N + n] = out;
      else if (D == DType::kBF16)
        static_cast<__nv_bfloat16*>(y)[m * w.N + n] = __float2bfloat16_rn(out);
      else
        static_cast<__half*>(y)[m * w.N + n] = __float2half_rn(out);
    }
  }
}

template <DType D>
Status launch_dtype(const LinearPlan& p, const void* x, int64_t M, const NF4Weight& w,
                    const LinearEpilogue& epi, void* y, float* ws, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  if (p.gemv_mt == 1)
    gemv_nf4_kernel<D, 1><<<grid, 32 * kGemvWarps, 0, stream>>>(x, M, w, epi, y, ws, p.split_len);
  else
    gemv_nf4_kernel<D, 2><<<grid, 32 * kGemvWarps, 0, stream>>>(x, M, w, epi, y, ws, p.split_len);
  return last_launch_status();
}

}  // namespace

Status launch_gemv(const LinearPlan& p, const void* x, DType dt, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, void* y, float* ws, cudaStream_t stream) {
  if (p.grid_x > 0x7fffffff || p.grid_y > 65535 || M > 2) return Status::kBadSize;
  switch (dt) {
    case DType::kF32: return launch_dtype<DType::kF32>(p, x, M, w, epi, y, ws, stream);
    case DType::kF16: return launch_dtype<DType::kF16>(p, x, M, w, epi, y, ws, stream);
    case DType::kBF16: return launch_dtype<DType::kBF16>(p, x, M, w, epi, y, ws, stream);
  }
  return Status::kBadDtype;
}

}  // namespace cuda
}  // namespace nf4lora

// ---------------------------------------------------------------------------------------------
// ptxas report (nvcc 13.0, -O3 -lineinfo, -Xptxas -v; sm_80 and sm_90 machine code, the compute_90
// PTX is JIT-compiled). No spills anywhere; a kernel change must keep it so.
//   sm_80  gemv<bf16,mt2>                   168 regs  stack  0 B  spills 0/0 B  
//   sm_80  gemv<bf16,mt1>                   128 regs  stack  0 B  spills 0/0 B  
//   sm_80  gemv<f16,mt2>                    168 regs  stack  0 B  spills 0/0 B  
//   sm_80  gemv<f16,mt1>                    128 regs  stack  0 B  spills 0/0 B  
//   sm_80  gemv<f32,mt2>                    168 regs  stack  0 B  spills 0/0 B  
//   sm_80  gemv<f32,mt1>                    127 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<bf16,mt2>                   168 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<bf16,mt1>                   128 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<f16,mt2>                    168 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<f16,mt1>                    128 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<f32,mt2>                    168 regs  stack  0 B  spills 0/0 B  
//   sm_90  gemv<f32,mt1>                    128 regs  stack  0 B  spills 0/0 B  
