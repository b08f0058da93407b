// CUDA NF4 linear launchers (the kernel ABI: raw device pointers, sizes, a stream; a Status back).
// W is the bitsandbytes NF4 state of a [N, K] weight (flattened blocks along K, any K). The LoRA
// side comes in the LinearEpilogue every backend shares (nf4lora/epilogue.h), with the CPU's
// launch convention (csrc/cpu/linear.h): the forward computes the shrink itself.
//
//   qlora_forward:     U  [M, r] = D(x) lora_A^T                       (into epi.u, float32)
//                      y  [M, N] = x  [M, K] W^T (+ bias + scaling * U lora_B^T)
//   qlora_backward_dx: dx [M, K] = dy [M, N] W   (+ scaling * D(G lora_A)), G = epi.g
//   lora_grad_a:       dA [r, K] = scaling * G^T D(x)                  (float32)
// Activations x/dy/y/dx are row-major contiguous in one dtype (f32/f16/bf16); everything on the
// LoRA side is float32. `ws` is a float32 workspace of linear_workspace_floats(...) elements
// (csrc/cuda/linear_plan.h, with device_info's SM count and compute capability; may be null when
// that is 0). All pointers are device memory; work is enqueued on `stream`.
#pragma once
#include <cuda_runtime.h>

#include "cuda/linear_plan.h"
#include "cuda/nf4_frag.h"
#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/epilogue.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace cuda {

using NF4Weight = ::nf4lora::NF4Weight;            // nf4lora/layout.h, shared with the CPU
using LinearEpilogue = ::nf4lora::LinearEpilogue;  // nf4lora/epilogue.h, shared with the CPU

// SM count and compute capability of the current device (cached per device).
Status device_info(int* sm_count, int* cc);

// The plan the launcher will use on the current device (same inputs -> same plan).
Status linear_plan_current(int64_t M, int64_t N, int64_t K, bool bwd, DType dt, bool aligned,
                           LinearPlan* plan, int force = -1);

Status qlora_forward(const void* x, DType dt, int64_t M, const NF4Weight& w,
                     const LinearEpilogue& epi, void* y, float* ws, int64_t ws_floats,
                     cudaStream_t stream, int force_path = -1);
Status qlora_backward_dx(const void* dy, DType dt, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* dx, float* ws, int64_t ws_floats,
                         cudaStream_t stream, int force_path = -1);
// ws: float32 [lora_grad_a_ws_floats(M, K, r)] (linear_plan.h; may be 0 -> null)
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
// U = D(x) A^T into epi.u (the forward's shrink; epi.has_lora(false)).
Status launch_lora_u(const void* x, DType dt, int64_t M, int64_t K, const LinearEpilogue& epi,
                     cudaStream_t stream);
// Sum the split partials ws [splits, M, ncols], apply the epilogue, store in dt.
Status launch_finalize(int splits, const float* ws, bool bwd, DType dt, int64_t M, int64_t ncols,
                       const LinearEpilogue& epi, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace nf4lora
