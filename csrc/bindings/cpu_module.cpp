// nf4lora._C: the CPU kernels (scalar reference + AVX2/OpenMP) for the Python layer.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/cpu_bindings.h"
#include "cpu/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4lora CPU kernels (scalar reference + AVX2/OpenMP); raw-pointer ABI, no torch";
  m.def("has_avx2", &nf4lora::cpu_has_avx2, "CPU has AVX2 + FMA + F16C");
  m.def("set_force_scalar", &nf4lora::set_force_scalar, "Force the scalar fallback (tests)");
  m.def("uses_avx2", &nf4lora::use_avx2, "The fast kernels currently take the AVX2 path");
  m.def("has_avx512", &nf4lora::cpu_has_avx512, "CPU has AVX-512 F + BW + VL + DQ");
  m.def("set_force_avx2", &nf4lora::set_force_avx2,
        "Keep the AVX2 kernels on an AVX-512 CPU (tests, benchmarks; env NF4LORA_FORCE_AVX2=1)");
  m.def("uses_avx512", &nf4lora::use_avx512,
        "The AVX-512 kernels (M <= 4 GEMV, 32-bit AdamW) currently run");
  m.def("has_avx512vbmi", &nf4lora::cpu_has_avx512vbmi, "CPU has AVX-512 (as has_avx512) + VBMI");
  m.def("uses_avx512vbmi", &nf4lora::use_avx512vbmi,
        "The AVX-512 + VBMI kernels (8-bit AdamW, its arithmetic encoder) currently run");
  m.def("has_avx512bf16", &nf4lora::cpu_has_avx512bf16, "CPU has AVX-512 (as has_avx512) + AVX512_BF16");
  m.def("has_amx_bf16", &nf4lora::cpu_has_amx_bf16,
        "CPU has AMX-TILE + AMX-BF16 and the OS enabled tile state (permission aside)");
  m.def("amx_status", [] { return std::string(nf4lora::amx_status()); },
        "'granted', 'not present' or 'refused: <why>' (the XTILEDATA permission, asked once)");
  m.def("uses_avx512bf16", &nf4lora::use_avx512bf16, "The AVX512-BF16 tile path currently runs");
  m.def("uses_amx", &nf4lora::use_amx, "The AMX-BF16 tile path currently runs");
  m.def(
      "set_max_isa",
      [](const std::string& name) {
        nf4lora::IsaTier t;
        if (!nf4lora::isa_tier_from_name(name.c_str(), &t))
          throw pybind11::value_error("max_isa must be one of 'scalar', 'avx2', 'avx512', "
                                      "'avx512_bf16', 'amx'; got '" + name + "'");
        nf4lora::set_isa_cap(t);
      },
      pybind11::arg("name"),
      "Cap the ISA tier the kernels use (tests, benchmarks; env NF4LORA_MAX_ISA): 'scalar', "
      "'avx2', 'avx512', 'avx512_bf16' or 'amx' (no cap)");
  m.def("max_isa", [] { return std::string(nf4lora::isa_tier_name(nf4lora::isa_cap())); },
        "The current ISA cap (see set_max_isa)");
  m.def("num_threads", &nf4lora::cpu_num_threads, "OpenMP threads the kernels use");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw pybind11::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
        omp_set_num_threads(n);
      },
      pybind11::arg("n"),
      "OpenMP threads for the kernels called from this thread (nf4lora._native hands torch's count over)");
  m.def(
      "fma_peak_gflops",
      [](int64_t iters) {
        if (!nf4lora::cpu_has_avx2()) throw pybind11::value_error("fma_peak_gflops needs AVX2");
        pybind11::gil_scoped_release nogil;
        return nf4lora::fma_peak_gflops(iters);
      },
      pybind11::arg("iters") = 50000000, "Sustained fp32 FMA GFLOP/s of all threads (benchmarks)");
  nf4lora::register_cpu_quantize(m);
  nf4lora::register_cpu_linear(m);
  nf4lora::register_cpu_optim(m);
  nf4lora::register_cpu_multi_lora(m);
}
