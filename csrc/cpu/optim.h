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

// Multi-tensor forms: every tensor of the list in ONE OpenMP region (the chunks of all their
// pages shared out together), as torch's fused AdamW does for a param list. A model's LoRA
// adapters are hundreds of small tensors: one call each would pay a fork/join and a Python op
// dispatch per tensor. The tensors share dtype and step constants; each is checked (n > 0, no
// null pointer) before any is touched. The single-tensor launchers above are count = 1.
struct AdamW32Tensor {
  void* param;
  const void* grad;
  float* m;
  float* v;
  int64_t n;
};
struct AdamW8Tensor {
  void* param;
  const void* grad;
  uint8_t* qm;
  uint8_t* qv;
  float* absmax_m;
  float* absmax_v;
  int64_t n;
};
Status adamw32_cpu_multi(const AdamW32Tensor* ts, int64_t count, DType dtype, const AdamWScalars& s,
                         int64_t page_elems);
Status adamw8_cpu_multi(const AdamW8Tensor* ts, int64_t count, DType dtype, const AdamWScalars& s,
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

// ---------------------------------------------------------------- the AVX-512 encoder's tables
// An arithmetic exact-nearest encoder with no 256 KB table. The positive codes split into
// segments of evenly spaced codes (one per decade of the dynamic map, plus single codes: 0, 1.0,
// the smallest ones); the binary exponent of |x| picks one of at most two segments per binade, a
// compare against that binade's threshold (the decision midpoint between the segments) picks
// between them, and in the segment
//   ti = trunc(|x| * scale - offset)      (one FMA; fixed point with kFracBits fraction bits)
//   index = min(ti >> kFracBits, last)    (offset folds in the segment's first code index)
// so ti / 2^kFracBits ~ index + 0.5 at a code and ~ index + 1 at the midpoint above it.
// ti is approximate, so a lane is re-done by code8_encode when its fraction bits lie within `near`
// of an integer, or when |x| > 1.5 / NaN / Inf (never from a finite state). The builder proves the
// rest exact: ti is monotone in x and at every decision midpoint inside a segment it lies within
// max_err < near of the integer it decides, so a lane whose ti is at least `near` away from every
// integer is on the right side of every midpoint. A tie on a binade threshold (x == midpoint)
// goes to the even code, as code8_encode: thresholds whose tie goes up are stored one float lower.
// Signed table (m): negatives mirror the positives, index(-a) = 254 - index(a), clamped at 0
// (there is no -1.0). Checked exhaustively against code8_encode by the tests.
struct Code8Arith {
  static constexpr int kBinades = 32;   // key = clamp(biased exponent of |x| - kKeyBias, 0, 31)
  static constexpr int kKeyBias = 96;   // key 0: |x| < 2^-30 (and 0); key 31: |x| in [1, 2)
  static constexpr int kSegments = 16;
  static constexpr int kFracBits = 16;
  float thresh[kBinades];     // |x| > thresh[key]: segment seg[key] + 1; +Inf: one segment
  int32_t seg[kBinades];
  float scale[kSegments];     // per segment
  float offset[kSegments];
  int32_t last[kSegments];    // the segment's last code index (256-table index)
  int32_t near = 0;           // in units of 2^-kFracBits
  float max_err = 0.0f;       // largest |ti(midpoint) - integer * 2^kFracBits| (tests)
  bool ok = false;            // false: a check failed, the fast path is not used
};
const Code8Arith& code8_arith(bool is_signed);  // built once, thread-safe
// code8_encode itself, compiled in the baseline file: the fast kernels' slow lanes call this (an
// inline from an ISA-flagged file could be the copy baseline callers get; see CMakeLists.txt).
uint8_t code8_encode_scalar(bool is_signed, float x);

// AVX-512 + VBMI 8-bit kernel (csrc/cpu/optim8_avx512vbmi.cpp), used when use_avx512vbmi().
// Same contract as adamw8_blocks_avx2; the encoder is Code8Arith's.
void adamw8_blocks_avx512vbmi(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                              float* absmax_m, float* absmax_v, int64_t b0, int64_t b1,
                              const AdamWScalars& s);
void code8_encode_avx512vbmi(const float* x, int64_t n16, bool is_signed, uint8_t* out);

// AVX-512 32-bit twin (csrc/cpu/optim_avx512.cpp), used when use_avx512(). [i0, i1) a multiple of 16.
void adamw32_elems_avx512(void* param, const void* grad, DType dtype, float* m, float* v,
                          int64_t i0, int64_t i1, const AdamWScalars& s);

}  // namespace nf4lora
