// CPU NF4 quantize/dequantize: OpenMP over blocks, AVX2 per block when the CPU has it, the scalar
// reference (csrc/ref) otherwise and for the partial last block. Same ABI and results (bit-exact)
// as csrc/ref/quantize_ref.h.
#pragma once
#include "ref/quantize_ref.h"

namespace nf4lora {

Status nf4_quantize_cpu(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                        float* absmax);
Status nf4_dequantize_cpu(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                          int64_t blocksize, void* out, DType dtype);
// Double quantization of absmax (csrc/ref rules), OpenMP over groups of 256 blocks.
Status absmax_quantize_cpu(const float* absmax, int64_t nblocks, float offset, const float* code8,
                           uint8_t* qabsmax, float* absmax2);

// AVX2 block kernels (csrc/cpu/quantize_avx2.cpp). Full blocks only: [b0, b1) must not include a
// partial last block.
void nf4_quantize_blocks_avx2(const void* w, DType dtype, int64_t blocksize, int64_t b0, int64_t b1,
                              uint8_t* packed, float* absmax, bool* nonfinite);
void nf4_dequantize_blocks_avx2(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                                int64_t b0, int64_t b1, void* out, DType dtype);

}  // namespace nf4lora
