// Blocking and packing rules of the NF4 format (DESIGN.md "NF4 format"), and the per-block scale
// source every kernel reads: plain float32 absmax, or double-quantized (uint8 code + float32
// second-level scale per 256 blocks + one offset).
#pragma once
#include <cstdint>

#include "nf4lora/nf4.h"
#include "nf4lora/status.h"

namespace nf4lora {

NF4LORA_HD bool blocksize_valid(int64_t bs) {
  return bs >= kMinBlocksize && bs <= kMaxBlocksize && (bs & (bs - 1)) == 0;
}
NF4LORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// n elements -> packed bytes [(n+1)/2] (two codes per byte, odd count padded with code 7).
NF4LORA_HD int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }
NF4LORA_HD int64_t n_blocks(int64_t n, int64_t blocksize) { return ceil_div(n, blocksize); }
NF4LORA_HD int64_t n_nested_blocks(int64_t nblocks) { return ceil_div(nblocks, kNestedBlocksize); }

// Per-block absmax source. Exactly one of {absmax} or {qabsmax, absmax2, code8} is set.
struct NF4Scales {
  const float* absmax = nullptr;    // [n_blocks] float32 (not double-quantized)
  const uint8_t* qabsmax = nullptr; // [n_blocks] uint8 codes into code8 (double-quantized)
  const float* absmax2 = nullptr;   // [ceil(n_blocks / 256)] float32 second-level scales
  const float* code8 = nullptr;     // [256] float32 code (bitsandbytes' nested_quant_map)
  float offset = 0.0f;              // mean of the original absmax (nested_offset)

  NF4LORA_HD bool nested() const { return qabsmax != nullptr; }
  NF4LORA_HD float block(int64_t b) const {
    return nested() ? dq_absmax(qabsmax[b], code8, absmax2[b / kNestedBlocksize], offset) : absmax[b];
  }
  Status check() const {
    if (absmax != nullptr) return Status::kOk;
    if (qabsmax == nullptr || absmax2 == nullptr || code8 == nullptr) return Status::kNullPointer;
    return Status::kOk;
  }
};

// The frozen NF4 weight W [N, K] (flattened blocks of `blocksize` along K, bitsandbytes layout).
struct NF4Weight {
  const uint8_t* packed = nullptr;  // [(N*K+1)/2]
  NF4Scales scales;
  int64_t N = 0, K = 0, blocksize = 64;

  // W[n, k] as float32 (reference decode; the fast kernels decode 32 at a time).
  NF4LORA_HD float at(int64_t n, int64_t k) const {
    const int64_t i = n * K + k;
    const uint8_t byte = packed[i / 2];
    return nf4_decode((i % 2 == 0) ? nf4_hi(byte) : nf4_lo(byte)) * scales.block(i / blocksize);
  }
  Status check() const {
    if (!packed) return Status::kNullPointer;
    if (N <= 0 || K <= 0) return Status::kBadSize;
    if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
    return scales.check();
  }
};

}  // namespace nf4lora
