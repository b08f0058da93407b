// CUDA NF4 quantize/dequantize launchers. Same buffers and rules as csrc/ref/quantize_ref.h, all
// pointers device memory, work enqueued on `stream`. Non-finite input is reported through
// `flag` (device int32, set to 1), because the launcher cannot wait for the kernel.
#pragma once
#include <cuda_runtime.h>

#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace cuda {

Status nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                    float* absmax, int* nonfinite_flag, cudaStream_t stream);
Status nf4_dequantize(const uint8_t* packed, const NF4Scales& scales, int64_t n, int64_t blocksize,
                      void* out, DType dtype, cudaStream_t stream);
Status absmax_quantize(const float* absmax, int64_t nblocks, float offset,
                       const float* code8, uint8_t* qabsmax, float* absmax2, cudaStream_t stream);

}  // namespace cuda
}  // namespace nf4lora
