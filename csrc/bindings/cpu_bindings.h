// One registration function per job; cpu_module.cpp calls each.
#pragma once
#include <pybind11/pybind11.h>

namespace nf4lora {
void register_cpu_quantize(pybind11::module_& m);
void register_cpu_linear(pybind11::module_& m);
void register_cpu_optim(pybind11::module_& m);
void register_cpu_multi_lora(pybind11::module_& m);
}  // namespace nf4lora
