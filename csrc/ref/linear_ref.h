// Scalar reference of the fused QLoRA linear (DESIGN.md "The fused QLoRA linear"): the tests'
// oracle. Every element of W is decoded from the packed NF4 state on the fly, one at a time.
//
//   forward:   u = D(x) A^T   [M, r]          y  = x W^T + bias + s u B^T   [M, N]
//   backward:  dx = dy W + s D(g A)  [M, K]   dA = s g^T D(x)  [r, K]
//
// x, y, dy, dx: row-major activations in `dtype`; the LoRA side and bias in a LinearEpilogue
// (nf4lora/epilogue.h: A [r, K], B [N, r], bias [N], u, g [M, r], all fp32).
#pragma once
#include <cstdint>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/epilogue.h"
#include "nf4lora/layout.h"
#include "nf4lora/status.h"

namespace nf4lora {

// y = x W^T + epi.bias (+ s D(x) A^T B^T when epi.r > 0; then epi.u [M, r] receives D(x) A^T).
Status qlora_forward_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* y);

// dx = dy W (+ s D(g A) when epi.r > 0; epi.g [M, r] = dy B computed by the caller).
Status qlora_backward_dx_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                             const LinearEpilogue& epi, void* dx);

// The same two with every W element rounded to bf16 first (ties to even): the math of the bf16
// paths (csrc/cpu/linear_bf16.h), which multiply the bf16 numbers dequantize_nf4(q, bfloat16) gives.
Status qlora_forward_bf16w_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                               const LinearEpilogue& epi, void* y);
Status qlora_backward_dx_bf16w_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                                   const LinearEpilogue& epi, void* dx);

// dA = s g^T D(x)   g [M, r] fp32, x [M, K] in dtype  ->  dA [r, K] fp32.
Status lora_grad_a_ref(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                       float scaling, const DropoutMask& drop, float* dA);

}  // namespace nf4lora
