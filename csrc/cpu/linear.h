// CPU fused QLoRA linear: the launchers the bindings call, with the same ABI and results (to fp32
// rounding) as csrc/ref/linear_ref.h. Dispatch (csrc/cpu/linear.cpp) picks, by shape:
//   GEMV path  (K % 32 == 0; M <= kGemvMaxRows with AVX2, M <= kGemv512MaxRows with AVX-512, where
//              larger M goes to the AVX-512 GEMM): stream each packed W row once, decode 32 codes per
//              16-byte load in registers, FMA against up to 4 activation rows at a time.
//              M <= kGemv512MaxRows on an AVX-512 CPU: the same in linear_avx512.cpp ("gemv512").
//   GEMM path  (otherwise): decode a W panel into an L1/L2-resident fp32 buffer, then a 6x16
//              register-blocked AVX2 micro-kernel ("gemm"), or on an AVX-512 CPU a 14x32 one
//              (linear_gemm_avx512.cpp, "gemm512"); the LoRA term is added in the epilogue.
//   bf16 tile path (bf16 activations, M >= kBf16TileMinRows forward, any M backward, on a CPU
//              with AMX-BF16 or AVX512-BF16): csrc/cpu/linear_bf16.h; W rounded to bf16 as
//              dequantize_nf4 does, fp32 accumulation.
// Without AVX2 every call runs the scalar reference. CPU launchers allocate their own host scratch
// (per-thread panels, an fp32 accumulator the size of the output): never a dense copy of W.
#pragma once
#include "ref/linear_ref.h"

namespace nf4lora {

constexpr int64_t kGemvMaxRows = 16;    // AVX2 GEMV rows (retune from bench/bench_linear.py)
constexpr int64_t kGemv512MaxRows = 8;  // AVX-512 GEMV rows; above them the AVX-512 GEMM is faster
// bf16 activations from this many rows take the bf16 tile path (AMX / AVX512-BF16) where the CPU
// has one; fewer rows take the exact fp32 GEMV (bench/bench_linear.py)
constexpr int64_t kBf16TileMinRows = 3;  // M = 2: the GEMV streams faster

// The launch convention of nf4lora/epilogue.h: the forward computes the shrink epi.u = D(x) A^T
// itself, then y = x W^T + bias + s u B^T; the backward takes epi.g = dy B.
Status qlora_forward_cpu(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* y);
Status qlora_backward_dx_cpu(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                             const LinearEpilogue& epi, void* dx);
Status lora_grad_a_cpu(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                       float scaling, const DropoutMask& drop, float* dA);

// Which path qlora_forward_cpu / qlora_backward_dx_cpu take for these sizes and activation dtype
// (tests, benchmarks and nf4lora.info() report it): "amx", "avx512_bf16" (bf16 tile paths),
// "gemv512", "gemv", "gemm512", "gemm" or "ref".
const char* forward_path(int64_t M, int64_t N, int64_t K, DType dtype);
const char* backward_path(int64_t M, int64_t N, int64_t K, DType dtype);

// ---- AVX2 building blocks (csrc/cpu/linear_avx2.cpp; call only when use_avx2()) ----
namespace avx2lin {
// y_acc[m, n] (fp32, [M, N]) = sum_k x[m, k] W[n, k] for rows n in [n0, n1), all m < M;
// xp = x even/odd-permuted in groups of 8 (linear.cpp); requires K % 32 == 0.
void gemv_forward(const NF4Weight& w, const float* xp, int64_t M, int64_t n0, int64_t n1,
                  float* y_acc);
// Full forward GEMM into yT (fp32, [round_up(N, 6), Mp], Mp = round_up(M, 16), transposed).
// With u != nullptr the LoRA term rides as r extra K columns: yT += (s B) u^T (u [M, r], B [N, r]).
void gemm_forward(const NF4Weight& w, const void* x, DType dtype, int64_t M, const float* u,
                  const float* B, int64_t r, float scaling, float* yT);
// Full dx GEMM: dxacc [M, ldc] (fp32, ldc >= round_up(K, 16); columns >= K are scratch) = dy W,
// dy fp32 [M, N].
void gemm_backward_dx(const NF4Weight& w, const float* dy, int64_t M, float* dxacc, int64_t ldc);
// y[m0 + j, n0 + i] = yT[(n0 + i) * Mp + m0 + j] + bias[n0 + i] for i, j < 8 (rows m >= M skipped),
// converted to dtype: an 8x8 transpose of the GEMM's y^T accumulator.
void transpose_out(const float* yT, int64_t Mp, int64_t M, int64_t N, int64_t m0, int64_t n0,
                   const float* bias, void* y, DType dtype);
// dst[offset : offset + n] (in dtype) = src[0:n] (fp32)
void store_row(const float* src, int64_t n, void* dst, DType dtype, int64_t offset);
// dot products of length n
float dot(const float* a, const float* b, int64_t n);
// y[0:n] += alpha * x[0:n]
void axpy(float alpha, const float* x, float* y, int64_t n);
}  // namespace avx2lin

// ---- AVX-512 GEMV (csrc/cpu/linear_avx512.cpp) and GEMM (csrc/cpu/linear_gemm_avx512.cpp);
// call only when use_avx512() ----
namespace avx512lin {
// As avx2lin::gemv_forward, for 1 <= M <= kGemv512MaxRows; xp even/odd-permuted in groups of 32.
void gemv_forward(const NF4Weight& w, const float* xp, int64_t M, int64_t n0, int64_t n1,
                  float* y_acc);
// ("gemm512", csrc/cpu/linear_gemm_avx512.cpp: a 14x32 zmm micro-kernel.) As avx2lin::gemm_forward:
// yT (fp32, [N, Mp] row-major, Mp = round_up(M, 16); a buffer with more rows is fine, only rows
// < N are written) = W x^T, x [M, K] in dtype; with u != nullptr also + (s B) u^T (u [M, r] fp32,
// B [N, r] fp32) as r extra reduction columns. Columns M..Mp-1 of yT are written (x^T padded
// with zero rows).
void gemm_forward(const NF4Weight& w, const void* x, DType dtype, int64_t M, const float* u,
                  const float* B, int64_t r, float scaling, float* yT);
// As avx2lin::gemm_backward_dx: dxacc [M, ldc] (fp32, ldc >= round_up(K, 16); columns K..ldc-1
// are scratch) = dy W, dy fp32 [M, N], W [N, K].
void gemm_backward_dx(const NF4Weight& w, const float* dy, int64_t M, float* dxacc, int64_t ldc);
// dA [r, K] (fp32) = scaling g^T D(x), g [M, r] fp32, x [M, K] in dtype (csrc/cpu/lora_avx512.cpp)
void lora_grad_a(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                 float scaling, const DropoutMask& drop, float* dA);
}  // namespace avx512lin

}  // namespace nf4lora
