// CPU fused QLoRA linear: argument checks, path dispatch (GEMV / GEMM / scalar reference), the
// small LoRA pieces (u = D(x) A^T, dA = s g^T D(x)) and the epilogues (bias, LoRA term, dropout,
// conversion to the activation dtype). The AVX2 inner kernels live in linear_avx2.cpp.
#include "cpu/linear.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/kept_scratch.h"
#include "cpu/linear_bf16.h"

namespace nf4lora {

namespace {

Status check_args(const NF4Weight& w, const LinearEpilogue& epi, bool bwd, int64_t M,
                  const void* in, const void* out) {
  if (Status s = w.check(); s != Status::kOk) return s;
  if (Status s = epi.check(bwd); s != Status::kOk) return s;
  if (!in || !out) return Status::kNullPointer;
  if (M <= 0) return Status::kBadSize;
  return Status::kOk;
}

// Row m of an activation matrix [M, K] in dtype -> fp32 dst, with the dropout mask applied when
// `drop` is active.
void load_row(const void* x, DType dtype, int64_t m, int64_t K, const DropoutMask* drop, float* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = load_as_f32(x, dtype, m * K + k);
  if (drop && drop->active()) {
    const uint32_t row = drop->row(m);
    for (int64_t k = 0; k < K; ++k) dst[k] = drop->apply(row, k, dst[k]);
  }
}

// x [n] -> xp [n] in the lane order the GEMV decodes produce: per group of `group` elements, the
// even ones then the odd ones ([x0 x2 .. | x1 x3 ..]); group 8 for AVX2, 32 for AVX-512.
void permute_even_odd(const float* x, int64_t n, int group, float* xp) {
  const int half = group / 2;
  for (int64_t i = 0; i < n; i += group)
    for (int j = 0; j < half; ++j) {
      xp[i + j] = x[i + 2 * j];
      xp[i + half + j] = x[i + 2 * j + 1];
    }
}

// Per calling thread, kept between calls (kept_scratch.h): the GEMM's y^T, dx's fp32 dy copy and
// accumulator.
thread_local KeptBuf t_gemm_out, t_gemm_in;

// u [M, r] = D(x) A^T
void lora_u(const void* x, DType dtype, int64_t M, int64_t K, const LinearEpilogue& lora, float* u) {
  // A parallel region costs a fork/join; for a few rows one thread is cheaper.
#pragma omp parallel if (M * K * lora.r >= (1 << 20))
  {
    std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      load_row(x, dtype, m, K, &lora.drop, row.data());
      for (int64_t j = 0; j < lora.r; ++j) u[m * lora.r + j] = avx2lin::dot(row.data(), lora.A + j * K, K);
    }
  }
}

}  // namespace

namespace {
// Largest M the GEMV takes: on AVX-512 the AVX-512 GEMV up to kGemv512MaxRows and the AVX-512 GEMM
// above it (faster than the AVX2 GEMV there, measured); on AVX2 the AVX2 GEMV up to kGemvMaxRows.
int64_t gemv_max_rows() { return use_avx512() ? kGemv512MaxRows : kGemvMaxRows; }

// The bf16 tile kernel for bf16 activations on this CPU (nullptr: none; the fp32 paths run).
const bf16lin::TileKernel* bf16_kernel(DType dtype) {
  if (dtype != DType::kBF16) return nullptr;
  if (use_amx()) return &bf16lin::kAmxKernel;
  if (use_avx512bf16()) return &bf16lin::kDpbf16Kernel;
  return nullptr;
}
}  // namespace

const char* forward_path(int64_t M, int64_t N, int64_t K, DType dtype) {
  if (!use_avx2()) return "ref";
  if (const bf16lin::TileKernel* t = bf16_kernel(dtype); t && M >= kBf16TileMinRows) return t->name;
  if (K % 32 == 0 && M <= gemv_max_rows()) return use_avx512() ? "gemv512" : "gemv";
  return use_avx512() ? "gemm512" : "gemm";
}

const char* backward_path(int64_t M, int64_t N, int64_t K, DType dtype) {
  if (!use_avx2()) return "ref";
  if (const bf16lin::TileKernel* t = bf16_kernel(dtype)) return t->name;
  return use_avx512() ? "gemm512" : "gemm";
}

Status qlora_forward_cpu(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* y) {
  if (Status s = check_args(w, epi, false, M, x, y); s != Status::kOk) return s;
  if (!use_avx2()) return qlora_forward_ref(x, dtype, M, w, epi, y);
  if (const bf16lin::TileKernel* t = bf16_kernel(dtype); t && M >= kBf16TileMinRows)
    return bf16lin::forward(*t, static_cast<const uint16_t*>(x), M, w, epi,
                            static_cast<uint16_t*>(y));
  const LinearEpilogue* lora = epi.has_lora(false) ? &epi : nullptr;
  const float* bias = epi.bias;
  float* u = epi.u;
  const int64_t N = w.N, K = w.K;
  const int64_t r = lora ? lora->r : 0;
  if (lora) lora_u(x, dtype, M, K, *lora, u);

  if (M <= gemv_max_rows() && K % 32 == 0) {
    // GEMV: x (fp32, lane-permuted for the decode that runs) stays in L1/L2 while W streams once.
    const bool wide = use_avx512();  // the "gemv512" path
    std::vector<float> xf(static_cast<size_t>(M * K)), xp(xf.size()), acc(static_cast<size_t>(M * N));
    for (int64_t m = 0; m < M; ++m) load_row(x, dtype, m, K, nullptr, xf.data() + m * K);
    permute_even_odd(xf.data(), M * K, wide ? 32 : 8, xp.data());
    std::vector<float> bt;  // s * B^T [r, N] for a vectorised LoRA epilogue
    if (lora) {
      bt.resize(static_cast<size_t>(r * N));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < r; ++j) bt[j * N + n] = lora->scaling * lora->B[n * r + j];
    }
    constexpr int64_t kRowsPerTask = 16;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t n0 = 0; n0 < N; n0 += kRowsPerTask) {
      const int64_t n1 = std::min(N, n0 + kRowsPerTask);
      if (wide)
        avx512lin::gemv_forward(w, xp.data(), M, n0, n1, acc.data());
      else
        avx2lin::gemv_forward(w, xp.data(), M, n0, n1, acc.data());
      for (int64_t m = 0; m < M; ++m) {
        float* a = acc.data() + m * N;
        if (bias)
          for (int64_t n = n0; n < n1; ++n) a[n] += bias[n];
        for (int64_t j = 0; j < r; ++j) avx2lin::axpy(u[m * r + j], bt.data() + j * N + n0, a + n0, n1 - n0);
        for (int64_t n = n0; n < n1; ++n) store_from_f32(y, dtype, m * N + n, a[n]);
      }
    }
    return Status::kOk;
  }

  // GEMM: y^T accumulates in fp32 [N, Mp]; LoRA rides as r extra K columns.
  const int64_t Mp = (M + 15) / 16 * 16, Np = (N + 5) / 6 * 6;  // micro-tiles are 6 W rows
  // (every element transpose_out stores comes from the GEMM's first K chunk, written unaccumulated)
  KeptScratch<float> yT_buf(t_gemm_out, Np * Mp);
  float* yT = yT_buf.get();
  if (yT == nullptr) return Status::kOutOfMemory;
  (use_avx512() ? avx512lin::gemm_forward : avx2lin::gemm_forward)(  // "gemm512" / "gemm"
      w, x, dtype, M, lora ? u : nullptr, lora ? lora->B : nullptr, r, lora ? lora->scaling : 0.0f, yT);
  // Transpose out in 8 x 8 register tiles (yT rows are Mp >= m0 + 8 long); the last N % 8
  // columns element by element.
  const int64_t N8 = N / 8 * 8;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t m0 = 0; m0 < Mp; m0 += 8)
    for (int64_t n0 = 0; n0 < N8; n0 += 8)
      if (m0 < M) avx2lin::transpose_out(yT, Mp, M, N, m0, n0, bias, y, dtype);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = N8; n < N; ++n)
      store_from_f32(y, dtype, m * N + n, yT[n * Mp + m] + (bias ? bias[n] : 0.0f));
  return Status::kOk;
}

Status qlora_backward_dx_cpu(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                             const LinearEpilogue& epi, void* dx) {
  if (Status s = check_args(w, epi, true, M, dy, dx); s != Status::kOk) return s;
  if (!use_avx2()) return qlora_backward_dx_ref(dy, dtype, M, w, epi, dx);
  if (const bf16lin::TileKernel* t = bf16_kernel(dtype))
    return bf16lin::backward_dx(*t, static_cast<const uint16_t*>(dy), M, w, epi,
                                static_cast<uint16_t*>(dx));
  const LinearEpilogue* lora = epi.has_lora(true) ? &epi : nullptr;
  const float* g = epi.g;
  const int64_t N = w.N, K = w.K;
  const int64_t Kp = (K + 15) / 16 * 16;
  // fp32 dy is read in place; fp32 dx with K % 16 == 0 is the accumulator itself.
  // (the GEMM writes every column < K of the accumulator before the epilogue reads it)
  KeptScratch<float> dy_buf(t_gemm_in, dtype != DType::kF32 ? M * N : 1);
  const float* dyp = static_cast<const float*>(dy);
  if (dtype != DType::kF32) {
    float* dyf = dy_buf.get();
    if (dyf == nullptr) return Status::kOutOfMemory;
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) load_row(dy, dtype, m, N, nullptr, dyf + m * N);
    dyp = dyf;
  }
  const bool in_place = dtype == DType::kF32 && Kp == K;
  KeptScratch<float> acc_buf(t_gemm_out, in_place ? 1 : M * Kp);
  float* acc = in_place ? static_cast<float*>(dx) : acc_buf.get();
  if (acc == nullptr) return Status::kOutOfMemory;
  (use_avx512() ? avx512lin::gemm_backward_dx : avx2lin::gemm_backward_dx)(w, dyp, M, acc, Kp);
  // Epilogue: dx = acc + s D(g A), vectorised over k through axpy on rows of A.
#pragma omp parallel
  {
    std::vector<float> l(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      float* a = acc + m * Kp;
      if (lora) {
        std::fill(l.begin(), l.end(), 0.0f);
        for (int64_t j = 0; j < lora->r; ++j) avx2lin::axpy(g[m * lora->r + j], lora->A + j * K, l.data(), K);
        if (lora->drop.active()) {
          const uint32_t row = lora->drop.row(m);
          for (int64_t k = 0; k < K; ++k) l[k] = lora->drop.apply(row, k, l[k]);
        }
        avx2lin::axpy(lora->scaling, l.data(), a, K);
      }
      if (!in_place) avx2lin::store_row(a, K, dx, dtype, m * K);
    }
  }
  return Status::kOk;
}

Status lora_grad_a_cpu(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                       float scaling, const DropoutMask& drop, float* dA) {
  if (!g || !x || !dA) return Status::kNullPointer;
  if (M <= 0 || K <= 0 || r <= 0) return Status::kBadSize;
  if (!use_avx2()) return lora_grad_a_ref(g, x, dtype, M, K, r, scaling, drop, dA);
  if (use_avx512()) {
    avx512lin::lora_grad_a(g, x, dtype, M, K, r, scaling, drop, dA);
    return Status::kOk;
  }
  constexpr int64_t kCols = 512;
  std::fill_n(dA, r * K, 0.0f);
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(kCols));
#pragma omp for schedule(dynamic, 1)
    for (int64_t k0 = 0; k0 < K; k0 += kCols) {
      const int64_t kc = std::min(kCols, K - k0);
      for (int64_t m = 0; m < M; ++m) {
        const uint32_t rh = drop.active() ? drop.row(m) : 0;
        for (int64_t k = 0; k < kc; ++k) {
          const float v = load_as_f32(x, dtype, m * K + k0 + k);
          row[k] = drop.active() ? drop.apply(rh, k0 + k, v) : v;
        }
        for (int64_t j = 0; j < r; ++j) avx2lin::axpy(g[m * r + j], row.data(), dA + j * K + k0, kc);
      }
      for (int64_t j = 0; j < r; ++j)
        for (int64_t k = 0; k < kc; ++k) dA[j * K + k0 + k] *= scaling;
    }
  }
  return Status::kOk;
}

}  // namespace nf4lora
