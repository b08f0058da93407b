// Run-time CPU feature check: the AVX2 kernels (files *_avx2.cpp, the only ones compiled with
// -mavx2 -mfma -mf16c) run only when the CPU has AVX2, FMA and F16C; otherwise the scalar path.
// The AVX-512 kernels (files *_avx512.cpp) run only when use_avx512(); else their AVX2 twins.
// Files *_avx512vbmi.cpp also use AVX512_VBMI and run only when use_avx512vbmi().
#pragma once
#include <cstdint>

namespace nf4lora {

bool cpu_has_avx2();          // AVX2 + FMA + F16C, checked once
void set_force_scalar(bool);  // tests: force the scalar fallback to exercise it
bool use_avx2();              // cpu_has_avx2() && !forced scalar
bool cpu_has_avx512();        // AVX-512 F + BW + VL + DQ (and OS zmm state), checked once
// tests/benchmarks: keep the AVX2 kernels even on an AVX-512 CPU. Starts from the environment:
// NF4LORA_FORCE_AVX2=1 (any value but "" or "0").
void set_force_avx2(bool);
bool use_avx512();            // use_avx2() && cpu_has_avx512() && !forced AVX2
bool cpu_has_avx512vbmi();    // cpu_has_avx512() and AVX512_VBMI (byte permutes), checked once
bool use_avx512vbmi();        // use_avx512() && cpu_has_avx512vbmi(): the *_avx512vbmi.cpp kernels
int cpu_num_threads();        // OpenMP threads the kernels will use
// Benchmarks' ceiling: sustained fp32 FMA GFLOP/s over all threads (peak_avx2.cpp; AVX2 only).
double fma_peak_gflops(int64_t iters);

}  // namespace nf4lora
