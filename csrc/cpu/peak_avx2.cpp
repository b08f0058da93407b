// Machine ceiling for the benchmarks: sustained fp32 FMA throughput of all OpenMP threads, from a
// loop of independent register FMAs (12 accumulator chains hide the FMA latency). Not a kernel.
#include <immintrin.h>
#include <omp.h>

#include <chrono>

#include "cpu/cpu_features.h"

namespace nf4lora {

double fma_peak_gflops(int64_t iters) {
  double total_flops = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : total_flops)
  {
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    float sink = 0.0f;
    for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);
    total_flops += 12.0 * 16.0 * static_cast<double>(iters) + (sink == 12345.0f ? 1.0 : 0.0);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return total_flops / s / 1e9;
}

}  // namespace nf4lora
