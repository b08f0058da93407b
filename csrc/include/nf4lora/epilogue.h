// The LoRA side (and bias) of the fused QLoRA linear: one struct for every backend (csrc/ref,
// csrc/cpu, csrc/cuda; host and device code) and the launch convention they share
// (DESIGN.md "The fused QLoRA linear"):
//
//   forward:   u = D(x) A^T                  [M, r]  computed by the launcher itself (the shrink)
//              y = x W^T + bias + s u B^T    [M, N]  (base + expand)
//   backward:  dx = dy W + s D(g A)          [M, K]  g = dy B [M, r] comes from the caller
//
// A launcher gets the activations, the NF4 weight and this struct; it does the shrink, the base
// product and the expand in one call. u is an output (kept for the backward's dB = s dy^T u).
// Everything here is float32; pointers are host memory on the CPU, device memory on CUDA.
#pragma once
#include <cstdint>

#include "nf4lora/dropout.h"
#include "nf4lora/nf4.h"
#include "nf4lora/status.h"

namespace nf4lora {

struct LinearEpilogue {
  const float* bias = nullptr;  // [N] (forward only); null: no bias
  const float* A = nullptr;     // lora_A [r, K]
  const float* B = nullptr;     // lora_B [N, r] (forward only)
  float* u = nullptr;           // forward: U = D(x) A^T [M, r], written by the launcher
  const float* g = nullptr;     // backward: G = dy B [M, r], read
  int64_t r = 0;                // rank; 0: no LoRA term (the pointers above are not read)
  float scaling = 0.0f;         // s
  DropoutMask drop;             // on the LoRA input: x in the shrink, g A in the backward

  // The rank-r activations of the expand (forward U, backward G) and the matrix they meet
  // (forward B [N, r], backward A [r, K]).
  NF4LORA_HD const float* left(bool bwd) const { return bwd ? g : u; }
  NF4LORA_HD const float* right(bool bwd) const { return bwd ? A : B; }
  // A LoRA term in this direction (after check(bwd): r > 0). NOTE: the pointer test keeps the
  // tensor-core GEMM at its register budget (r > 0 alone costs the 128 x 64 forward tile 22
  // registers and a block per SM).
  NF4LORA_HD bool has_lora(bool bwd) const { return left(bwd) != nullptr && r > 0; }

  // Every launcher's check of the LoRA side: none (r == 0), or the pointers the direction reads
  // (forward A, B; backward A, g) and writes (forward u).
  Status check(bool bwd) const {
    if (r < 0) return Status::kBadSize;
    if (r == 0) return Status::kOk;
    if (A == nullptr || (bwd ? g == nullptr : (B == nullptr || u == nullptr)))
      return Status::kNullPointer;
    return Status::kOk;
  }
};

}  // namespace nf4lora
