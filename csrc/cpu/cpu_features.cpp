#include "cpu/cpu_features.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace nf4lora {

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
}

static std::atomic<bool> g_force_scalar{false};
void set_force_scalar(bool v) { g_force_scalar.store(v); }
bool use_avx2() { return cpu_has_avx2() && !g_force_scalar.load(); }

bool cpu_has_avx512() {
  // libgcc's check includes XCR0 (the OS saves zmm state), not only the CPUID bits.
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
}

static std::atomic<bool> g_force_avx2{[] {
  const char* e = std::getenv("NF4LORA_FORCE_AVX2");
  return e != nullptr && *e != '\0' && std::strcmp(e, "0") != 0;
}()};
void set_force_avx2(bool v) { g_force_avx2.store(v); }
bool use_avx512() { return use_avx2() && cpu_has_avx512() && !g_force_avx2.load(); }
bool cpu_has_avx512vbmi() {
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
  }();
  return has;
}
bool use_avx512vbmi() { return use_avx512() && cpu_has_avx512vbmi(); }
int cpu_num_threads() { return omp_get_max_threads(); }

}  // namespace nf4lora
