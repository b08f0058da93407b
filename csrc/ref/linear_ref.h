// Scalar reference of the fused QLoRA linear (DESIGN.md "The fused QLoRA linear"): the tests'
// oracle. Every element of W is decoded from the packed NF4 state on the fly, one at a time.
//
//   forward:   u = D(x) A^T   [M, r]          y  = x W^T + bias + s u B^T   [M, N]
//   backward:  dx = dy W + s D(g A)  [M, K]   dA = s g^T D(x)  [r, K]
//
// x, y, dy, dx: row-major activations in `dtype`; A [r, K], B [N, r], bias [N], u, g [M, r] fp32.
#pragma once
#include <cstdint>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"
#include "nf4lora/status.h"

namespace nf4lora {

// The LoRA side of the fused linear. A [r, K], B [N, r] float32; scaling s; dropout on the LoRA input.
struct LoraArgs {
  const float* A = nullptr;
  const float* B = nullptr;
  int64_t r = 0;
  float scaling = 0.0f;
  DropoutMask drop;
};

// y = x W^T + bias (+ s D(x) A^T B^T when lora != nullptr; then u [M, r] receives D(x) A^T).
Status qlora_forward_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                         const float* bias, const LoraArgs* lora, void* y, float* u);

// dx = dy W (+ s D(g A) when lora != nullptr; g [M, r] = dy B computed by the caller).
Status qlora_backward_dx_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                             const LoraArgs* lora, const float* g, void* dx);

// The same two with every W element rounded to bf16 first (ties to even): the math of the bf16
// paths (csrc/cpu/linear_bf16.h), which multiply the bf16 numbers dequantize_nf4(q, bfloat16) gives.
Status qlora_forward_bf16w_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                               const float* bias, const LoraArgs* lora, void* y, float* u);
Status qlora_backward_dx_bf16w_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                                   const LoraArgs* lora, const float* g, void* dx);

// dA = s g^T D(x)   g [M, r] fp32, x [M, K] in dtype  ->  dA [r, K] fp32.
Status lora_grad_a_ref(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                       float scaling, const DropoutMask& drop, float* dA);

}  // namespace nf4lora
