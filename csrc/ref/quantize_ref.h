// Scalar reference of NF4 quantization and its double quantization: the tests' oracle and the
// fallback for CPUs without AVX2. Pointers are raw buffers the caller allocated:
//   w       [n] in `dtype`                packed  [(n+1)/2] uint8
//   absmax  [ceil(n/blocksize)] float32   qabsmax [n_blocks] uint8, absmax2 [ceil(n_blocks/256)]
#pragma once
#include <cstdint>

#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"
#include "nf4lora/status.h"

namespace nf4lora {

// W (flattened) -> packed NF4 codes + float32 absmax per block. kNonFinite on NaN/Inf (outputs are
// then unspecified); kBadBlocksize / kBadSize / kNullPointer checked before anything is read.
Status nf4_quantize_ref(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                        float* absmax);

// Quantize blocks [b0, b1) (shared by the fast path for the partial last block).
void nf4_quantize_blocks_ref(const void* w, DType dtype, int64_t n, int64_t blocksize, int64_t b0,
                             int64_t b1, uint8_t* packed, float* absmax, bool* nonfinite);

// Elements [i0, i1) of a valid state -> out (shared by the fast path for partial blocks).
void nf4_dequantize_elems_ref(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                              int64_t i0, int64_t i1, void* out, DType dtype);

// packed NF4 + scales -> out [n] in `dtype` (float32 product code*absmax, then RNE to dtype).
Status nf4_dequantize_ref(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                          int64_t blocksize, void* out, DType dtype);

// Double quantization of absmax: v = absmax - offset in blocks of 256, absmax2 = max|v| per block,
// qabsmax = exact-nearest code8 index of v * (1/absmax2) (127, i.e. 0.0, when absmax2 == 0).
Status absmax_quantize_ref(const float* absmax, int64_t nblocks, float offset, const float* code8,
                           uint8_t* qabsmax, float* absmax2);

// Nested groups [g0, g1) of the above (shared by the OpenMP version); *nonfinite set on NaN/Inf.
void absmax_quantize_groups_ref(const float* absmax, int64_t nblocks, float offset,
                                const float* code8, int64_t g0, int64_t g1, uint8_t* qabsmax,
                                float* absmax2, bool* nonfinite);

// Inverse: absmax[b] = code8[qabsmax[b]] * absmax2[b/256] + offset.
Status absmax_dequantize_ref(const uint8_t* qabsmax, const float* absmax2, const float* code8,
                             float offset, int64_t nblocks, float* absmax);

}  // namespace nf4lora
