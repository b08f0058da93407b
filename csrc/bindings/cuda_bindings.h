// One registration function per job; cuda_module.cpp calls each. Plus the CUDA flavour of
// bind::check: a kCudaError carries cudaGetErrorString's text.
#pragma once
#include <pybind11/pybind11.h>

#include "bindings/common.h"
#include "cuda/launch.h"

namespace nf4lora {

inline void check_cuda(Status s, const char* launcher, const char* bad_argument_detail = "") {
  if (s == Status::kCudaError) return bind::check(s, launcher, cuda::last_error_string());
  bind::check(s, launcher, s == Status::kBadArgument ? bad_argument_detail : "");
}

void register_cuda_quantize(pybind11::module_& m);
void register_cuda_optim(pybind11::module_& m);
void register_cuda_linear(pybind11::module_& m);
void register_cuda_multi_lora(pybind11::module_& m);
}  // namespace nf4lora
