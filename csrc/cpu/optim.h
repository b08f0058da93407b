// CPU fused AdamW update (PagedAdamW): the parameter's flat range is walked page by page
// (page_elems elements, a multiple of 256) in one fused pass: a page splits into 256-aligned chunks
// that one OpenMP region shares out over the threads, AVX2 per chunk when the CPU has it, the scalar reference (csrc/ref/optim_ref.h) otherwise and
// for tails. Same ABI and bit-identical results as the reference.
#pragma once
#include "ref/optim_ref.h"

namespace nf4lora {

constexpr int64_t kDefaultPageElems = int64_t{1} << 20;

// page_elems: > 0 and a multiple of 256 (kBadSize otherwise).
Status adamw32_cpu(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
                   const AdamWScalars& s, int64_t page_elems);
Status adamw8_cpu(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                  float* absmax_m, float* absmax_v, int64_t n, const AdamWScalars& s,
                  int64_t page_elems);

// Exact-nearest 8-bit code of x[i] (code8_encode semantics) through the table-driven fast
// encoder, for tests: the fast kernel's encoder against the reference search. fast=false runs
// code8_encode itself.
Status code8_encode_cpu(const float* x, int64_t n, bool is_signed, uint8_t* out, bool fast);

// ---------------------------------------------------------------- the fast encoder's table
// Key = top 16 bits of the float32 x (sign, exponent, 7 mantissa bits). Over one key's range of
// floats at most one decision midpoint mid[j] = (code[j] + code[j+1]) / 2 can lie (checked when the
// table is built), so with c = number of midpoints below the range's lowest value:
//   entry bits  0..15  low 16 bits of that midpoint (its high 16 bits are the key itself)
//               16..23 c
//               24     the range holds a midpoint
// code(x) = c + (x > mid), and on x == mid exactly the even one of (c, c + 1): the final pivot of
// code8_encode's binary search (127 +- 64 +- ... +- 1) is always even, and a tie keeps the pivot.
struct Code8Lut {
  uint32_t entry[65536];
  bool ok = false;  // false if some key range held two midpoints (then the fast path is not used)
};
const Code8Lut& code8_lut(bool is_signed);  // built once, thread-safe

// AVX2 kernels (csrc/cpu/optim_avx2.cpp). [i0, i1) a multiple of 8 long; [b0, b1) full blocks.
void adamw32_elems_avx2(void* param, const void* grad, DType dtype, float* m, float* v, int64_t i0,
                        int64_t i1, const AdamWScalars& s);
void adamw8_blocks_avx2(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                        float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                        const AdamWScalars& s, const uint32_t* lut_m, const uint32_t* lut_v);
void code8_encode_avx2(const float* x, int64_t n8, const uint32_t* lut, uint8_t* out);

// AVX-512 twins (csrc/cpu/optim_avx512.cpp), used when use_avx512(). [i0, i1) a multiple of 16.
void adamw32_elems_avx512(void* param, const void* grad, DType dtype, float* m, float* v,
                          int64_t i0, int64_t i1, const AdamWScalars& s);
void adamw8_blocks_avx512(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                          float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                          const AdamWScalars& s, const uint32_t* lut_m, const uint32_t* lut_v);
void code8_encode_avx512(const float* x, int64_t n16, const uint32_t* lut, uint8_t* out);

}  // namespace nf4lora
