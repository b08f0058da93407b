// Dropout on the LoRA input as a mask regenerated from a seed (never stored), identical on every
// backend (python/nf4lora/backends/default.py: dropout_mask is the readable twin):
//   row(i)  = hash32(hash32(i ^ seed))
//   h(i, k) = hash32(row(i) + k)            (mod 2^32)
//   keep    = (h >> 8) >= threshold,  threshold = round(p * 2^24);  kept values scale by 1/(1-p)
#pragma once
#include <cstdint>

#include "nf4lora/nf4.h"

namespace nf4lora {

NF4LORA_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x6d2b79f5u;
  x ^= x >> 16;
  return x;
}

struct DropoutMask {
  uint32_t seed = 0;
  uint32_t threshold = 0;  // 0: keep everything
  float scale = 1.0f;      // 1 / (1 - p)

  NF4LORA_HD bool active() const { return threshold != 0; }
  NF4LORA_HD uint32_t row(int64_t i) const {
    return hash32(hash32(static_cast<uint32_t>(i) ^ seed));
  }
  NF4LORA_HD bool keep(uint32_t row_hash, int64_t k) const {
    return (hash32(row_hash + static_cast<uint32_t>(k)) >> 8) >= threshold;
  }
  // x * mask * scale for element (row_hash, k)
  NF4LORA_HD float apply(uint32_t row_hash, int64_t k, float x) const {
    return keep(row_hash, k) ? x * scale : 0.0f;
  }
};

// p in [0, 1): threshold = round(p * 2^24) (the Python layer passes the same integer).
inline DropoutMask make_dropout(double p, int64_t seed) {
  DropoutMask m;
  m.seed = static_cast<uint32_t>(seed & 0xffffffff);
  m.threshold = static_cast<uint32_t>(p * 16777216.0 + 0.5);
  m.scale = p > 0.0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  return m;
}

}  // namespace nf4lora
