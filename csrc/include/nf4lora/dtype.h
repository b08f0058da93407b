// Activation/storage dtypes of the kernel ABI and exact scalar conversions (host and device).
// Conversions to bf16/fp16 round to nearest even, as torch's .to(dtype) does.
#pragma once
#include <cstdint>
#include <cstring>

#include "nf4lora/nf4.h"

namespace nf4lora {

// Codes shared with the Python layer (python/nf4lora/_dtypes.py).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline bool dtype_valid(int d) { return d >= 0 && d <= 2; }
NF4LORA_HD int dtype_size(DType d) { return d == DType::kF32 ? 4 : 2; }

NF4LORA_HD uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
NF4LORA_HD float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

NF4LORA_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

NF4LORA_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 <-> binary32, exact (subnormals, inf, NaN handled), round to nearest even.
NF4LORA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return (sign ? -v : v);
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

NF4LORA_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;                 // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;                // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                      // |f| < 2^-14: subnormal or zero
    if (a < 0x33000000u) return sign;                         // < 2^-25 rounds to 0
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                          // 14..24 (value = m * 2^(e-150))
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

// Load element i of a typed buffer as float32 / store a float32 into it (scalar paths only).
NF4LORA_HD float load_as_f32(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
NF4LORA_HD void store_from_f32(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kF32: static_cast<float*>(p)[i] = v; break;
    case DType::kF16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
  }
}

}  // namespace nf4lora
