// NF4 (4-bit NormalFloat) code table and the per-element encode/decode rules shared by every
// backend (scalar reference, AVX2, CUDA). Bit-compatible with bitsandbytes; DESIGN.md "NF4 format".
#pragma once
#include <cstdint>

// NF4LORA_HD: callable from host and device code (the per-element rules are shared, and the host
// side is unit-tested on machines without a GPU).
#if defined(__CUDACC__)
#define NF4LORA_HD __host__ __device__ __forceinline__
#else
#define NF4LORA_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define NF4LORA_UNROLL _Pragma("unroll")
#else
#define NF4LORA_UNROLL  // gcc -O3 fully unrolls the fixed 15-step loops by itself
#endif

namespace nf4lora {

// The 16 NF4 values, index = 4-bit code. Sorted ascending; code 7 is exactly 0.0.
#define NF4LORA_NF4_VALUES                                                                 \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,           \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

// Decision thresholds: float32 midpoints (c[i] + c[i+1]) / 2 evaluated in float32, exactly as
// bitsandbytes computes them (torch float32: (code[:-1] + code[1:]) / 2).
#define NF4LORA_MID(a, b) ((a) + (b)) / 2.0f
#define NF4LORA_NF4_MIDPOINTS                                                                  \
  NF4LORA_MID(-1.0f, -0.6961928009986877f), NF4LORA_MID(-0.6961928009986877f, -0.5250730514526367f), \
      NF4LORA_MID(-0.5250730514526367f, -0.39491748809814453f),                                \
      NF4LORA_MID(-0.39491748809814453f, -0.28444138169288635f),                               \
      NF4LORA_MID(-0.28444138169288635f, -0.18477343022823334f),                               \
      NF4LORA_MID(-0.18477343022823334f, -0.09105003625154495f),                               \
      NF4LORA_MID(-0.09105003625154495f, 0.0f), NF4LORA_MID(0.0f, 0.07958029955625534f),       \
      NF4LORA_MID(0.07958029955625534f, 0.16093020141124725f),                                 \
      NF4LORA_MID(0.16093020141124725f, 0.24611230194568634f),                                 \
      NF4LORA_MID(0.24611230194568634f, 0.33791524171829224f),                                 \
      NF4LORA_MID(0.33791524171829224f, 0.44070982933044434f),                                 \
      NF4LORA_MID(0.44070982933044434f, 0.5626170039176941f),                                  \
      NF4LORA_MID(0.5626170039176941f, 0.7229568362236023f), NF4LORA_MID(0.7229568362236023f, 1.0f)

// Host copies (C++ and the host side of .cu files) ...
static constexpr float kNF4[16] = {NF4LORA_NF4_VALUES};
static constexpr float kNF4Mid[15] = {NF4LORA_NF4_MIDPOINTS};
#if defined(__CUDACC__)
// ... and device copies: nvcc forbids device code from reading host constexpr arrays.
static constexpr __device__ float kNF4Dev[16] = {NF4LORA_NF4_VALUES};
static constexpr __device__ float kNF4MidDev[15] = {NF4LORA_NF4_MIDPOINTS};
#endif

// The table for whichever side is compiling.
NF4LORA_HD const float* nf4_values() {
#if defined(__CUDA_ARCH__)
  return kNF4Dev;
#else
  return kNF4;
#endif
}
NF4LORA_HD const float* nf4_midpoints() {
#if defined(__CUDA_ARCH__)
  return kNF4MidDev;
#else
  return kNF4Mid;
#endif
}

constexpr uint8_t kNF4Zero = 7;          // code of 0.0: all-zero blocks and odd-count padding
constexpr int kNestedBlocksize = 256;     // double quantization: absmax blocks of 256
constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;

// Smallest scale used to form 1/absmax. bitsandbytes clamps absmax to 1e-38 before inverting, so a
// block whose absmax is 0 or subnormal scales by 1e38 instead of inf (0 * inf would be NaN). The
// stored absmax is the unclamped one.
constexpr float kMinAbsmax = 1e-38f;

NF4LORA_HD float nf4_inv_scale(float absmax) {
  return 1.0f / (absmax > kMinAbsmax ? absmax : kMinAbsmax);
}

// Code of a scaled value x = w * (1/absmax): the number of midpoints strictly below x
// (x > t goes up, so a tie goes to the lower code). Branch-free: 15 compares.
NF4LORA_HD uint8_t nf4_encode(float x) {
  const float* mid = nf4_midpoints();
  int q = 0;
  NF4LORA_UNROLL
  for (int i = 0; i < 15; ++i) q += (x > mid[i]) ? 1 : 0;
  return static_cast<uint8_t>(q);
}

NF4LORA_HD float nf4_decode(uint8_t code) { return nf4_values()[code & 15]; }

// Packing: element 2i in the HIGH nibble of byte i, element 2i+1 in the low nibble.
NF4LORA_HD uint8_t nf4_pack(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even << 4) | (odd & 15));
}
NF4LORA_HD uint8_t nf4_hi(uint8_t byte) { return byte >> 4; }
NF4LORA_HD uint8_t nf4_lo(uint8_t byte) { return byte & 15; }

// The NF4 decode of one little-endian 32-bit word of packed codes (bytes k = 0..3 hold elements
// 2k (high nibble) and 2k+1 (low nibble)) into 8 values code_value * scale, float32. `table` is the
// 16-entry code table (kNF4 on the host, a shared-memory copy on the device). One multiply per
// value, no contraction possible: the same bits as the scalar reference.
NF4LORA_HD void nf4_decode_word(uint32_t w, const float* table, float scale, float* v) {
  NF4LORA_UNROLL
  for (int k = 0; k < 4; ++k) {
    const uint32_t byte = (w >> (8 * k)) & 0xffu;
    v[2 * k] = table[byte >> 4] * scale;
    v[2 * k + 1] = table[byte & 15u] * scale;
  }
}

// Double-quantized absmax: absmax = code8[q] * absmax2 + offset, two float32 roundings in that
// order (bitsandbytes: dequantize_blockwise then "+ offset"). Never fuse into an FMA: the library
// builds with -ffp-contract=off, and CUDA code uses __fmul_rn/__fadd_rn through this function.
NF4LORA_HD float dq_absmax(uint8_t q, const float* code8, float absmax2, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(code8[q], absmax2), offset);
#else
  return code8[q] * absmax2 + offset;
#endif
}

// Exact-nearest 8-bit code of x in a sorted 256-entry table: the binary search + midpoint test of
// bitsandbytes' CUDA dQuantize (the path that wrote the checkpoints people download). Nearest
// value; on an exact midpoint tie the choice follows that search (measure-zero in practice).
NF4LORA_HD uint8_t code8_encode(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  // Branch-free form of the search (selects, not jumps: the path depends on the data).
  for (int i = 64; i > 0; i >>= 1) {
    const bool gt = x > val;
    lower_pivot = gt ? pivot : lower_pivot;
    lower = gt ? val : lower;
    upper_pivot = gt ? upper_pivot : pivot;
    upper = gt ? upper : val;
    pivot = gt ? pivot + i : pivot - i;
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float mid = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > mid ? upper_pivot : pivot);
  }
  const float mid = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < mid ? lower_pivot : pivot);
}

}  // namespace nf4lora
