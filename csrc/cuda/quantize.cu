// CUDA NF4 quantize / dequantize and absmax double quantization.
//   nf4_quantize:    one warp per NF4 block (blocksize 32..4096): warp max-reduce of |w|, then each
//                    lane encodes element pairs and writes whole bytes.        grid: ceil(nb/8) x 256
//   nf4_dequantize:  one thread per 16 packed bytes (32 values, one uint4 load, one block scale),
//                    code table in shared memory, 16/32-byte vector stores; a scalar kernel (one
//                    thread per 8 values) for buffers that are not 16-byte aligned.
//   absmax_quantize: one warp per 256-block of absmax (offset = torch's float32 mean, passed in).
// Index arithmetic is 64-bit throughout.
//
// ptxas report (nvcc 13.0, -O3 -lineinfo --fmad=true -Xptxas -v, the CMake flags; rerun with
// cmake -DNF4LORA_PTXAS_VERBOSE=ON). No stack frame and no spills anywhere:
//   sm_80 nf4_dequantize_vec_kernel<bf16|half|float>  32 regs, 0 stack, 0/0 spill, 64 B smem
//   sm_80 nf4_dequantize_kernel (unaligned fallback)  28 regs, 0 stack, 0/0 spill
//   sm_80 nf4_quantize_kernel                         30 regs, 0 stack, 0/0 spill
//   sm_80 absmax_quantize_kernel                      32 regs, 0 stack, 0/0 spill
//   sm_90 nf4_dequantize_vec_kernel<bf16|half|float>  32 regs, 0 stack, 0/0 spill, 64 B smem
//   sm_90 nf4_dequantize_kernel                       32 regs, 0 stack, 0/0 spill
//   sm_90 nf4_quantize_kernel                         30 regs, 0 stack, 0/0 spill
//   sm_90 absmax_quantize_kernel                      32 regs, 0 stack, 0/0 spill
//   (124 B gmem: the NF4 value/midpoint tables; sm_90 PTX is also embedded for newer GPUs)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/quantize.h"
#include "nf4lora/dynamic_map.h"

namespace nf4lora {
namespace cuda {

const char* last_error_string() { return cudaGetErrorString(cudaGetLastError()); }

namespace {

constexpr int kWarpsPerCta = 8;

__device__ __forceinline__ float load_elem(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ void store_elem(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kF32: static_cast<float*>(p)[i] = v; break;
    case DType::kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void nf4_quantize_kernel(const void* __restrict__ w, DType dtype, int64_t n,
                                    int64_t blocksize, int64_t nblocks, uint8_t* __restrict__ packed,
                                    float* __restrict__ absmax, int* __restrict__ nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (b >= nblocks) return;
  const int64_t begin = b * blocksize;
  const int64_t end = min(begin + blocksize, n);
  float amax = 0.0f;
  bool bad = false;
  for (int64_t i = begin + lane; i < end; i += 32) {
    const float a = fabsf(load_elem(w, dtype, i));
    bad |= !(a <= 3.402823466e38f);  // NaN or Inf
    amax = fmaxf(amax, a);
  }
  amax = warp_max(amax);
  if (__any_sync(0xffffffffu, bad) && lane == 0) atomicExch(nonfinite, 1);
  if (lane == 0) absmax[b] = amax;
  const float inv = nf4_inv_scale(amax);
  for (int64_t i = begin + 2 * lane; i < end; i += 64) {
    const uint8_t hi = nf4_encode(__fmul_rn(load_elem(w, dtype, i), inv));
    const uint8_t lo = i + 1 < end ? nf4_encode(__fmul_rn(load_elem(w, dtype, i + 1), inv)) : kNF4Zero;
    packed[i / 2] = nf4_pack(hi, lo);
  }
}

// Scalar fallback: one thread per 8 values. Used when packed or out is not 16-byte aligned (views).
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Scales scales,
                                      int64_t n, int64_t blocksize, void* __restrict__ out,
                                      DType dtype) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i0 = t * 8;  // 8 values = 4 bytes; blocksize >= 32 so one scale covers them
  if (i0 >= n) return;
  const float scale = scales.block(i0 / blocksize);
  const int64_t i1 = min(i0 + 8, n);
  for (int64_t i = i0; i < i1; i += 2) {
    const uint8_t byte = packed[i / 2];
    store_elem(out, dtype, i, __fmul_rn(nf4_decode(nf4_hi(byte)), scale));
    if (i + 1 < i1) store_elem(out, dtype, i + 1, __fmul_rn(nf4_decode(nf4_lo(byte)), scale));
  }
}

// 8 float32 values -> 8 outputs at dst with 16-byte stores (dst 16-byte aligned).
__device__ __forceinline__ void store8(float* dst, const float* v) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ uint32_t pack2(__half a, __half b) {
  return static_cast<uint32_t>(__half_as_ushort(a)) | (static_cast<uint32_t>(__half_as_ushort(b)) << 16);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 a, __nv_bfloat16 b) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(a)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(b)) << 16);
}
__device__ __forceinline__ void store8(__half* dst, const float* v) {
  uint4 u;
  u.x = pack2(__float2half_rn(v[0]), __float2half_rn(v[1]));
  u.y = pack2(__float2half_rn(v[2]), __float2half_rn(v[3]));
  u.z = pack2(__float2half_rn(v[4]), __float2half_rn(v[5]));
  u.w = pack2(__float2half_rn(v[6]), __float2half_rn(v[7]));
  *reinterpret_cast<uint4*>(dst) = u;
}
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float* v) {
  uint4 u;
  u.x = pack2(__float2bfloat16_rn(v[0]), __float2bfloat16_rn(v[1]));
  u.y = pack2(__float2bfloat16_rn(v[2]), __float2bfloat16_rn(v[3]));
  u.z = pack2(__float2bfloat16_rn(v[4]), __float2bfloat16_rn(v[5]));
  u.w = pack2(__float2bfloat16_rn(v[6]), __float2bfloat16_rn(v[7]));
  *reinterpret_cast<uint4*>(dst) = u;
}

__device__ __forceinline__ void store1(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store1(__half* dst, float v) { *dst = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16_rn(v); }

// Vectorized: one thread per 32 values = one 16-byte load of packed codes; blocksize >= 32 is a
// power of two, so the 32 values share one scale. The code table lives in shared memory (16
// distinct words in 16 distinct banks: conflict-free for any codes); per word the shared
// __host__ __device__ nf4_decode_word gives 8 float32 products, stored as 16- or 32-byte vectors.
// packed and out must be 16-byte aligned (the launcher checks; views fall back to the kernel above).
template <typename OutT>
__global__ void nf4_dequantize_vec_kernel(const uint8_t* __restrict__ packed, NF4Scales scales,
                                          int64_t n, int64_t blocksize, OutT* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = nf4_values()[threadIdx.x];
  __syncthreads();
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 32;
  if (i0 >= n) return;
  const float scale = scales.block(i0 / blocksize);
  float v[8];
  if (i0 + 32 <= n) {
    const uint4 p = __ldg(reinterpret_cast<const uint4*>(packed + i0 / 2));
    const uint32_t words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      nf4_decode_word(words[k], table, scale, v);
      store8(out + i0 + 8 * k, v);
    }
    return;
  }
  // the last, partial group of < 32 values: element by element
  for (int64_t i = i0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    store1(out + i, table[(i & 1) ? nf4_lo(byte) : nf4_hi(byte)] * scale);
  }
}

__global__ void absmax_quantize_kernel(const float* __restrict__ absmax, int64_t nblocks,
                                       float offset,
                                       const float* __restrict__ code8, uint8_t* __restrict__ qabsmax,
                                       float* __restrict__ absmax2) {
  const int lane = threadIdx.x & 31;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (g * kNestedBlocksize >= nblocks) return;
  const int64_t begin = g * kNestedBlocksize;
  const int64_t end = min(begin + kNestedBlocksize, nblocks);
  float amax = 0.0f;
  for (int64_t i = begin + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(__fsub_rn(absmax[i], offset)));
  amax = warp_max(amax);
  if (lane == 0) absmax2[g] = amax;
  const float inv = amax > 0.0f ? __frcp_rn(amax) : 0.0f;
  for (int64_t i = begin + lane; i < end; i += 32) {
    qabsmax[i] = amax > 0.0f ? code8_encode(code8, __fmul_rn(__fsub_rn(absmax[i], offset), inv))
                             : static_cast<uint8_t>(kDynamicSignedZero);
  }
}

}  // namespace

Status nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                    float* absmax, int* nonfinite_flag, cudaStream_t stream) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!w || !packed || !absmax || !nonfinite_flag) return Status::kNullPointer;
  const int64_t nb = n_blocks(n, blocksize);
  const int64_t grid = ceil_div(nb, kWarpsPerCta);
  if (grid > 0x7fffffff) return Status::kBadSize;
  nf4_quantize_kernel<<<static_cast<unsigned>(grid), kWarpsPerCta * 32, 0, stream>>>(
      w, dtype, n, blocksize, nb, packed, absmax, nonfinite_flag);
  return last_launch_status();
}

Status nf4_dequantize(const uint8_t* packed, const NF4Scales& scales, int64_t n, int64_t blocksize,
                      void* out, DType dtype, cudaStream_t stream) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!packed || !out) return Status::kNullPointer;
  if (scales.check() != Status::kOk) return scales.check();
  constexpr int kThreads = 256;
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (!aligned) {
    const int64_t grid = ceil_div(ceil_div(n, 8), kThreads);
    if (grid > 0x7fffffff) return Status::kBadSize;
    nf4_dequantize_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        packed, scales, n, blocksize, out, dtype);
    return last_launch_status();
  }
  const int64_t grid = ceil_div(ceil_div(n, 32), kThreads);
  if (grid > 0x7fffffff) return Status::kBadSize;
  const unsigned g = static_cast<unsigned>(grid);
  switch (dtype) {
    case DType::kF32:
      nf4_dequantize_vec_kernel<float><<<g, kThreads, 0, stream>>>(packed, scales, n, blocksize,
                                                                   static_cast<float*>(out));
      break;
    case DType::kF16:
      nf4_dequantize_vec_kernel<__half><<<g, kThreads, 0, stream>>>(packed, scales, n, blocksize,
                                                                    static_cast<__half*>(out));
      break;
    default:
      nf4_dequantize_vec_kernel<__nv_bfloat16><<<g, kThreads, 0, stream>>>(
          packed, scales, n, blocksize, static_cast<__nv_bfloat16*>(out));
      break;
  }
  return last_launch_status();
}

Status absmax_quantize(const float* absmax, int64_t nblocks, float offset,
                       const float* code8, uint8_t* qabsmax, float* absmax2, cudaStream_t stream) {
  if (nblocks <= 0) return Status::kBadSize;
  if (!absmax || !code8 || !qabsmax || !absmax2) return Status::kNullPointer;
  const int64_t grid = ceil_div(n_nested_blocks(nblocks), kWarpsPerCta);
  absmax_quantize_kernel<<<static_cast<unsigned>(grid), kWarpsPerCta * 32, 0, stream>>>(
      absmax, nblocks, offset, code8, qabsmax, absmax2);
  return last_launch_status();
}

}  // namespace cuda
}  // namespace nf4lora
