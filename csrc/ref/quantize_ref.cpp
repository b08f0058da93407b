// Scalar reference of NF4 quantize/dequantize and absmax double quantization. Written for clarity:
// one element at a time, exactly the rules of DESIGN.md "NF4 format".
#include "ref/quantize_ref.h"

#include <cmath>

#include "nf4lora/dynamic_map.h"

namespace nf4lora {

void nf4_quantize_blocks_ref(const void* w, DType dtype, int64_t n, int64_t blocksize, int64_t b0,
                             int64_t b1, uint8_t* packed, float* absmax, bool* nonfinite) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = begin + blocksize < n ? begin + blocksize : n;
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float v = load_as_f32(w, dtype, i);
      if (!std::isfinite(v)) *nonfinite = true;
      const float a = std::fabs(v);
      amax = a > amax ? a : amax;
    }
    absmax[b] = amax;
    const float inv = nf4_inv_scale(amax);
    // blocksize is even, so a block starts on a byte boundary.
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t hi = nf4_encode(load_as_f32(w, dtype, i) * inv);
      const uint8_t lo = i + 1 < end ? nf4_encode(load_as_f32(w, dtype, i + 1) * inv) : kNF4Zero;
      packed[i / 2] = nf4_pack(hi, lo);
    }
  }
}

Status nf4_quantize_ref(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                        float* absmax) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!w || !packed || !absmax) return Status::kNullPointer;
  bool nonfinite = false;
  nf4_quantize_blocks_ref(w, dtype, n, blocksize, 0, n_blocks(n, blocksize), packed, absmax,
                          &nonfinite);
  return nonfinite ? Status::kNonFinite : Status::kOk;
}

Status nf4_dequantize_ref(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                          int64_t blocksize, void* out, DType dtype) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!packed || !out) return Status::kNullPointer;
  if (scales.check() != Status::kOk) return scales.check();
  nf4_dequantize_elems_ref(packed, scales, blocksize, 0, n, out, dtype);
  return Status::kOk;
}

void nf4_dequantize_elems_ref(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                              int64_t i0, int64_t i1, void* out, DType dtype) {
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i % 2 == 0) ? nf4_hi(byte) : nf4_lo(byte);
    store_from_f32(out, dtype, i, nf4_decode(code) * scales.block(i / blocksize));
  }
}

void absmax_quantize_groups_ref(const float* absmax, int64_t nblocks, float offset,
                                const float* code8, int64_t g0, int64_t g1, uint8_t* qabsmax,
                                float* absmax2, bool* nonfinite) {
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = g * kNestedBlocksize;
    const int64_t end = begin + kNestedBlocksize < nblocks ? begin + kNestedBlocksize : nblocks;
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(absmax[i])) *nonfinite = true;
      const float a = std::fabs(absmax[i] - offset);
      amax = a > amax ? a : amax;
    }
    absmax2[g] = amax;
    const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      qabsmax[i] = amax > 0.0f ? code8_encode(code8, (absmax[i] - offset) * inv)
                               : static_cast<uint8_t>(kDynamicSignedZero);
    }
  }
}

Status absmax_quantize_ref(const float* absmax, int64_t nblocks, float offset, const float* code8,
                           uint8_t* qabsmax, float* absmax2) {
  if (nblocks <= 0) return Status::kBadSize;
  if (!absmax || !code8 || !qabsmax || !absmax2) return Status::kNullPointer;
  bool nonfinite = false;
  absmax_quantize_groups_ref(absmax, nblocks, offset, code8, 0, n_nested_blocks(nblocks), qabsmax,
                             absmax2, &nonfinite);
  return nonfinite ? Status::kNonFinite : Status::kOk;
}

Status absmax_dequantize_ref(const uint8_t* qabsmax, const float* absmax2, const float* code8,
                             float offset, int64_t nblocks, float* absmax) {
  if (nblocks <= 0) return Status::kBadSize;
  if (!qabsmax || !absmax2 || !code8 || !absmax) return Status::kNullPointer;
  for (int64_t b = 0; b < nblocks; ++b)
    absmax[b] = dq_absmax(qabsmax[b], code8, absmax2[b / kNestedBlocksize], offset);
  return Status::kOk;
}

}  // namespace nf4lora
