// nf4lora._C_cuda: the CUDA kernels for the Python layer. Importing it needs no GPU (cudart is
// linked statically and loads the driver lazily); calls without a GPU raise RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "bindings/cuda_bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "nf4lora CUDA kernels; raw-pointer + stream ABI, no torch";
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver/device" error
      return 0;
    }
    return n;
  });
  m.def("compiled_archs", [] { return std::string(NF4LORA_CUDA_ARCHS); });
  nf4lora::register_cuda_quantize(m);
  nf4lora::register_cuda_optim(m);
  nf4lora::register_cuda_linear(m);
  nf4lora::register_cuda_multi_lora(m);
}
