#include "cpu/cpu_features.h"

#include <cpuid.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace nf4lora {

namespace {

// XCR0 (which register states the OS saves), read with xgetbv; 0 where OSXSAVE is off.
uint64_t xcr0() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // OSXSAVE
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

IsaTier initial_cap() {
  const char* e = std::getenv("NF4LORA_MAX_ISA");
  IsaTier t = IsaTier::kAmx;
  if (e != nullptr && *e != '\0') isa_tier_from_name(e, &t);  // unknown names leave no cap
  return t;
}
std::atomic<int> g_cap{static_cast<int>(initial_cap())};
bool cap_allows(IsaTier t) { return g_cap.load() >= static_cast<int>(t); }

}  // namespace

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
bool use_avx2() { return cpu_has_avx2() && !g_force_scalar.load() && cap_allows(IsaTier::kAvx2); }

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
bool use_avx512() {
  return use_avx2() && cpu_has_avx512() && !g_force_avx2.load() && cap_allows(IsaTier::kAvx512);
}
bool cpu_has_avx512vbmi() {
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
  }();
  return has;
}
bool use_avx512vbmi() { return use_avx512() && cpu_has_avx512vbmi(); }

bool cpu_has_avx512bf16() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!cpu_has_avx512() || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a & (1u << 5)) != 0;  // CPUID.(7,1):EAX[5] AVX512_BF16
  }();
  return has;
}
bool use_avx512bf16() {
  return use_avx512() && cpu_has_avx512bf16() && cap_allows(IsaTier::kAvx512Bf16);
}

bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);  // CPUID.(7,0):EDX AMX-TILE, AMX-BF16
    const uint64_t tiles = (1ull << 17) | (1ull << 18);       // XCR0 XTILECFG | XTILEDATA
    return tile && bf16 && (xcr0() & tiles) == tiles;
  }();
  return has;
}

namespace {
std::once_flag g_amx_once;
bool g_amx_granted = false;
std::string g_amx_status = "not present";

void request_amx() {
  if (!cpu_has_amx_bf16()) return;
  // NF4LORA_NO_AMX=1: behave as if the kernel refused (tests the fallback and its report)
  const char* off = std::getenv("NF4LORA_NO_AMX");
  if (off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0) {
    g_amx_status = "refused: NF4LORA_NO_AMX is set";
    return;
  }
  // Linux >= 5.16 keeps the 8 KB tile data state off until a process asks for it; using a tile
  // instruction before that raises SIGILL. The permission covers every thread of the process.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) {
    g_amx_granted = true;
    g_amx_status = "granted";
  } else {
    g_amx_status = std::string("refused: arch_prctl(ARCH_REQ_XCOMP_PERM) failed: ") + std::strerror(errno);
  }
}
}  // namespace

bool amx_ready() {
  std::call_once(g_amx_once, request_amx);
  return g_amx_granted;
}
const char* amx_status() {
  amx_ready();
  return g_amx_status.c_str();
}
bool use_amx() { return use_avx512() && amx_ready() && cap_allows(IsaTier::kAmx); }

void set_isa_cap(IsaTier t) { g_cap.store(static_cast<int>(t)); }
IsaTier isa_cap() { return static_cast<IsaTier>(g_cap.load()); }

const char* isa_tier_name(IsaTier t) {
  switch (t) {
    case IsaTier::kScalar: return "scalar";
    case IsaTier::kAvx2: return "avx2";
    case IsaTier::kAvx512: return "avx512";
    case IsaTier::kAvx512Bf16: return "avx512_bf16";
    default: return "amx";
  }
}
bool isa_tier_from_name(const char* name, IsaTier* out) {
  for (int i = 0; i <= static_cast<int>(IsaTier::kAmx); ++i)
    if (std::strcmp(name, isa_tier_name(static_cast<IsaTier>(i))) == 0) {
      *out = static_cast<IsaTier>(i);
      return true;
    }
  return false;
}

int cpu_num_threads() { return omp_get_max_threads(); }

}  // namespace nf4lora
