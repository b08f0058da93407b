// Scalar reference of the fused AdamW update (PagedAdamW): the tests' oracle, the fallback for CPUs
// without AVX2 and for the tails the AVX2 kernel leaves. The per-element math lives here as
// NF4LORA_HD inline functions that the CUDA kernel (csrc/cuda/optim.cu) calls too, so every backend
// performs the same float32 operations in the same order (bit-identical results, tested).
//
// Buffers (n = numel of the parameter, flattened; the caller allocated everything):
//   param  [n] in `dtype` (fp32/fp16/bf16), updated in place; math in float32, rounded on store
//   grad   [n] in `dtype`
//   32-bit state: m, v  [n] float32
//   8-bit state:  qm [n] uint8 (signed dynamic code), qv [n] uint8 (unsigned dynamic code),
//                 absmax_m, absmax_v [ceil(n/256)] float32; value = code[q] * absmax[i/256]
//
// The update (torch.optim.AdamW, decoupled weight decay, bias correction), t = step >= 1:
//   p  = p * (1 - lr*wd)
//   m  = m + (1 - b1) * (g - m)                  (torch's lerp_ form)
//   v  = v * b2 + ((1 - b2) * g) * g             (torch's mul_ + addcmul_ form)
//   p  = p - step_size * (m / (sqrt(v) / sqrt(1 - b2^t) + eps)),   step_size = lr / (1 - b1^t)
// 8-bit, per block of 256: dequantize m and v, update in float32 (the parameter step uses the
// unrounded float32 m and v), new absmax = max |m| (resp. v) over the block (NaN ignored), requantize
// x = value * (1 / max(absmax, 1e-38)) to the exact-nearest code (code8_encode).
#pragma once
#include <cmath>
#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/nf4.h"
#include "nf4lora/status.h"

namespace nf4lora {

constexpr int kOptimBlock = 256;          // 8-bit state: elements per absmax block
constexpr int64_t kOptimMin8bit = 4096;   // smaller tensors keep 32-bit state (as bitsandbytes)

// Float32 constants of one AdamW step, derived once per (param group, step) by the Python layer
// (nf4lora._optim_ops.adamw_scalars, in double, then rounded to float32) so that the scalar, AVX2,
// CUDA and pure-torch paths all see identical values.
// What kBadArgument from an AdamW launcher means (the bindings' error text).
constexpr const char* kAdamWRangeHelp =
    "hyper-parameters out of range (lr, eps >= 0, weight_decay, betas in [0, 1), step >= 1)";

struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float beta2;            // b2
  float one_minus_beta1;  // 1 - b1
  float one_minus_beta2;  // 1 - b2
  float step_size;        // lr / (1 - b1^t)
  float bias2_sqrt;       // sqrt(1 - b2^t)
  float eps;

  // Every constant finite; rates in range; bias2_sqrt > 0 (t >= 1 and b2 < 1).
  Status check() const {
    const float all[7] = {decay, beta2, one_minus_beta1, one_minus_beta2, step_size, bias2_sqrt, eps};
    for (float x : all)
      if (!std::isfinite(x)) return Status::kBadArgument;
    if (beta2 < 0.0f || beta2 >= 1.0f || one_minus_beta1 <= 0.0f || one_minus_beta1 > 1.0f ||
        one_minus_beta2 <= 0.0f || one_minus_beta2 > 1.0f || step_size < 0.0f ||
        bias2_sqrt <= 0.0f || eps < 0.0f)
      return Status::kBadArgument;
    return Status::kOk;
  }
};

// Correctly rounded float32 operations, never contracted into FMAs: the host build uses
// -ffp-contract=off, the device side the explicit _rn intrinsics (nvcc builds with --fmad=true).
NF4LORA_HD float op_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
NF4LORA_HD float op_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
NF4LORA_HD float op_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
NF4LORA_HD float op_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
NF4LORA_HD float op_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// One element: updates *m and *v (float32) and returns the new parameter value (float32).
NF4LORA_HD float adamw_elem(float p, float g, float* m, float* v, const AdamWScalars& s) {
  const float m1 = op_add(*m, op_mul(s.one_minus_beta1, op_sub(g, *m)));
  const float v1 = op_add(op_mul(*v, s.beta2), op_mul(op_mul(s.one_minus_beta2, g), g));
  const float denom = op_add(op_div(op_sqrt(v1), s.bias2_sqrt), s.eps);
  *m = m1;
  *v = v1;
  return op_sub(op_mul(p, s.decay), op_mul(s.step_size, op_div(m1, denom)));
}

// 8-bit state value: code[q] * absmax (one float32 rounding).
NF4LORA_HD float state8_decode(const float* code, uint8_t q, float absmax) {
  return op_mul(code[q], absmax);
}

// 8-bit state code of a value given 1 / max(absmax, 1e-38) of its block (nf4_inv_scale).
NF4LORA_HD uint8_t state8_encode(const float* code, float value, float inv_absmax) {
  return code8_encode(code, op_mul(value, inv_absmax));
}

// ---------------------------------------------------------------- launchers (scalar, one thread)

// 32-bit state. kNullPointer / kBadSize / kBadArgument are checked before anything is touched.
Status adamw32_ref(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
                   const AdamWScalars& s);

// 8-bit blockwise state (codes: kDynamicSigned for m, kDynamicUnsigned for v).
Status adamw8_ref(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                  float* absmax_m, float* absmax_v, int64_t n, const AdamWScalars& s);

// Elements [i0, i1) of the 32-bit update (shared by the fast path for its tail).
void adamw32_elems_ref(void* param, const void* grad, DType dtype, float* m, float* v, int64_t i0,
                       int64_t i1, const AdamWScalars& s);

// 8-bit blocks [b0, b1) of an n-element tensor (the last block may be partial).
void adamw8_blocks_ref(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                       float* absmax_m, float* absmax_v, int64_t n, int64_t b0, int64_t b1,
                       const AdamWScalars& s);

}  // namespace nf4lora
