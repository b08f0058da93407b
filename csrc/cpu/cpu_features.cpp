#include "cpu/cpu_features.h"

#include <omp.h>

#include <atomic>

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
int cpu_num_threads() { return omp_get_max_threads(); }

}  // namespace nf4lora
