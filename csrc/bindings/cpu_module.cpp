// nf4lora._C: the CPU kernels (scalar reference + AVX2/OpenMP) for the Python layer.
#include <pybind11/pybind11.h>

#include "bindings/cpu_bindings.h"
#include "cpu/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4lora CPU kernels (scalar reference + AVX2/OpenMP); raw-pointer ABI, no torch";
  m.def("has_avx2", &nf4lora::cpu_has_avx2, "CPU has AVX2 + FMA + F16C");
  m.def("set_force_scalar", &nf4lora::set_force_scalar, "Force the scalar fallback (tests)");
  m.def("uses_avx2", &nf4lora::use_avx2, "The fast kernels currently take the AVX2 path");
  m.def("num_threads", &nf4lora::cpu_num_threads, "OpenMP threads the kernels use");
  nf4lora::register_cpu_quantize(m);
  nf4lora::register_cpu_linear(m);
  nf4lora::register_cpu_optim(m);
}
