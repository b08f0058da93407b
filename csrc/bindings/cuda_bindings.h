// One registration function per job; cuda_module.cpp calls each.
#pragma once
#include <pybind11/pybind11.h>

namespace nf4lora {
void register_cuda_quantize(pybind11::module_& m);
void register_cuda_optim(pybind11::module_& m);
void register_cuda_linear(pybind11::module_& m);
}  // namespace nf4lora
