// Shared launcher plumbing for csrc/cuda: stream handle type and the "check the last launch" rule.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4lora/status.h"

namespace nf4lora {
namespace cuda {

// Streams travel through the ABI as integers (torch.cuda.current_stream().cuda_stream).
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Status of the launch just made (configuration errors surface here, not at sync).
inline Status last_launch_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

// Message of the most recent CUDA error (for the bindings' RuntimeError text).
const char* last_error_string();

}  // namespace cuda
}  // namespace nf4lora
