// Scalar reference of the multi-adapter (S-LoRA / punica style) LoRA term, the tests' oracle
// (DESIGN.md "Many adapters in one batch"). Row m of a batch uses adapter e = idx[m] of a pool:
//
//   y[m] += s_e * (x[m] A_e^T) B_e^T      (e >= 0; e == -1: the row is left as it is, base only)
//
// A_pool [E, r, K], B_pool [E, N, r] in pool_dtype (fp32, fp16 or bf16: 16-bit pools halve the
// bytes a many-adapter batch reads), scalings [E] float32; x [M, K], y [M, N] in one activation
// dtype (y holds the base x W^T + b on entry; u = x A^T and the LoRA sum are formed in fp32 and
// added to y, rounded once to its dtype). Adapters of smaller rank are zero-padded to r: padded rows of A_e and columns of B_e
// must be zero (they then add exact zeros).
#pragma once
#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"
#include "nf4lora/status.h"

namespace nf4lora {

struct MultiLoraArgs {
  const void* A_pool = nullptr;     // [E, r, K] in pool_dtype
  const void* B_pool = nullptr;     // [E, N, r] in pool_dtype
  const int64_t* idx = nullptr;     // [M], each -1 or in [0, E)
  const float* scalings = nullptr;  // [E]
  int64_t E = 0;
  int64_t r = 0;
  DType pool_dtype = DType::kF32;
};

// Sizes, pointers and every idx in [-1, E) (the launchers' argument check; no kernel runs on
// bad input). M == 0 is valid (nothing to do).
Status check_multi_lora(const MultiLoraArgs& a, int64_t M, int64_t K, int64_t N, const void* x,
                        const void* y);

// y [M, N] (in dtype, holds the base) += the multi-adapter LoRA term, row by row.
Status multi_lora_add_ref(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                          const MultiLoraArgs& a, void* y);

}  // namespace nf4lora
