// CUDA NF4 quantize / dequantize and absmax double quantization.
//   nf4_quantize:    one warp per NF4 block (blocksize 32..4096): warp max-reduce of |w|, then each
//                    lane encodes element pairs and writes whole bytes.        grid: ceil(nb/8) x 256
//   nf4_dequantize:  one thread per 4 packed bytes (8 values), block scale decoded in-kernel.
//   absmax_quantize: one warp per 256-block of absmax (offset = torch's float32 mean, passed in).
// Index arithmetic is 64-bit throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
  const int64_t grid = ceil_div(ceil_div(n, 8), kThreads);
  if (grid > 0x7fffffff) return Status::kBadSize;
  nf4_dequantize_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(packed, scales, n,
                                                                               blocksize, out, dtype);
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
