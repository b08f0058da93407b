// Run-time CPU feature check: the AVX2 kernels (files *_avx2.cpp, the only ones compiled with
// -mavx2 -mfma -mf16c) run only when the CPU has AVX2, FMA and F16C; otherwise the scalar path.
// The AVX-512 kernels (files *_avx512.cpp) run only when use_avx512(); else their AVX2 twins.
// Files *_avx512vbmi.cpp also use AVX512_VBMI and run only when use_avx512vbmi();
// *_avx512bf16.cpp (VDPBF16PS) only when use_avx512bf16(); *_amx.cpp (AMX-BF16 tiles) only when
// use_amx(), which also needs the kernel's per-process XTILEDATA permission (asked once).
#pragma once
#include <cstdint>

namespace nf4lora {

bool cpu_has_avx2();          // AVX2 + FMA + F16C, checked once
void set_force_scalar(bool);  // tests: force the scalar fallback to exercise it
bool use_avx2();              // cpu_has_avx2() && !forced scalar && cap >= avx2
bool cpu_has_avx512();        // AVX-512 F + BW + VL + DQ (and OS zmm state), checked once
// tests/benchmarks: keep the AVX2 kernels even on an AVX-512 CPU. Starts from the environment:
// NF4LORA_FORCE_AVX2=1 (any value but "" or "0").
void set_force_avx2(bool);
bool use_avx512();            // use_avx2() && cpu_has_avx512() && !forced AVX2 && cap >= avx512
bool cpu_has_avx512vbmi();    // cpu_has_avx512() and AVX512_VBMI (byte permutes), checked once
bool use_avx512vbmi();        // use_avx512() && cpu_has_avx512vbmi(): the *_avx512vbmi.cpp kernels
bool cpu_has_avx512bf16();    // cpu_has_avx512() and AVX512_BF16 (VDPBF16PS), checked once
bool use_avx512bf16();        // use_avx512() && cpu_has_avx512bf16() && cap >= avx512_bf16
bool cpu_has_amx_bf16();      // CPUID AMX-TILE + AMX-BF16 and XCR0 tile state enabled by the OS
// The per-process XTILEDATA permission (arch_prctl ARCH_REQ_XCOMP_PERM), requested on the first
// call: true when granted. amx_status() says why not otherwise ("not present", "refused: ...").
// NF4LORA_NO_AMX=1 in the environment makes it refuse (tests of the fallback).
bool amx_ready();
const char* amx_status();
bool use_amx();               // use_avx512() && amx_ready() && cap >= amx

// The highest ISA tier the kernels may use: tests and benchmarks lower it to run a slower path
// on a CPU that has a faster one (never raises it above what the CPU has). Starts from the
// environment: NF4LORA_MAX_ISA=scalar|avx2|avx512|avx512_bf16|amx (unset: amx, i.e. no cap).
enum class IsaTier : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };
void set_isa_cap(IsaTier);
IsaTier isa_cap();
const char* isa_tier_name(IsaTier);
bool isa_tier_from_name(const char* name, IsaTier* out);  // false for an unknown name

int cpu_num_threads();        // OpenMP threads the kernels will use
// Benchmarks' ceiling: sustained fp32 FMA GFLOP/s over all threads (peak_avx2.cpp; AVX2 only).
double fma_peak_gflops(int64_t iters);

}  // namespace nf4lora
