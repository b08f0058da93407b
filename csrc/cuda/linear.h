// CUDA NF4 linear launchers (the kernel ABI: raw device pointers, sizes, a stream; a Status back).
// W is the bitsandbytes NF4 state of a [N, K] weight (flattened blocks along K, any K).
//
//   nf4_linear_fwd: y  [M, N] = x  [M, K] W^T (+ bias + scaling * U lora_B^T)
//   nf4_linear_bwd: dx [M, K] = dy [M, N] W   (+ scaling * D(G lora_A))
//   lora_u:         U  [M, r] = D(x) lora_A^T          (float32)
//   lora_grad_a:    dA [r, K] = scaling * G^T D(x)     (float32)
// Activations x/dy/y/dx are row-major contiguous in one dtype (f32/f16/bf16); everything on the
// LoRA side is float32. `ws` is a float32 workspace of linear_workspace_floats(...) elements (may
// be null when that is 0). All pointers are device memory; work is enqueued on `stream`.
#pragma once
#include <cuda_runtime.h>

#include "cuda/linear_plan.h"
#include "cuda/nf4_frag.h"
#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace cuda {

using NF4Weight = ::nf4lora::NF4Weight;  // csrc/include/nf4lora/layout.h, shared with the CPU

// SM count and compute capability of the current device (cached per device).
Status device_info(int* sm_count, int* cc);

// The plan the launcher will use on the current device (same inputs -> same plan).
Status linear_plan_current(int64_t M, int64_t N, int64_t K, bool bwd, DType dt, bool aligned,
                           LinearPlan* plan, int force = -1);

Status nf4_linear_fwd(const void* x, DType dt, int64_t M, const NF4Weight& w,
                      const LinearEpilogue& epi, void* y, float* ws, int64_t ws_floats,
                      cudaStream_t stream, int force_path = -1);
Status nf4_linear_bwd(const void* dy, DType dt, int64_t M, const NF4Weight& w,
                      const LinearEpilogue& epi, void* dx, float* ws, int64_t ws_floats,
                      cudaStream_t stream, int force_path = -1);
Status lora_u(const void* x, DType dt, int64_t M, int64_t K, const float* lora_A, int64_t r,
              const DropoutMask& mask, float* u, cudaStream_t stream);
// ws: float32 [lora_grad_a_ws_floats(M, K, r)] (may be 0 -> null)
int64_t lora_grad_a_splits(int64_t M);
Status lora_grad_a(const float* g, const void* x, DType dt, int64_t M, int64_t K, int64_t r,
                   float scaling, const DropoutMask& mask, float* da, float* ws, cudaStream_t stream);

// Per-path entry points (linear.cu dispatches to these; each file owns its kernels).
Status launch_gemv(const LinearPlan& p, const void* x, DType dt, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, void* y, float* ws, cudaStream_t stream);
Status launch_gemm(const LinearPlan& p, bool bwd, const void* a, DType dt, int64_t M,
                   const NF4Weight& w, const LinearEpilogue& epi, void* out, float* ws,
                   cudaStream_t stream);
Status launch_simt(bool bwd, const void* a, DType dt, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, void* out, cudaStream_t stream);
// Sum the split partials ws [splits, M, ncols], apply the epilogue, store in dt.
Status launch_finalize(int splits, const float* ws, bool bwd, DType dt, int64_t M, int64_t ncols,
                       const LinearEpilogue& epi, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace nf4lora
