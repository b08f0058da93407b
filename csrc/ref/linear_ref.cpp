// Scalar reference of the fused QLoRA linear: plain loops, float32 accumulation in the natural
// order, W decoded element by element. Clarity over speed.
#include "ref/linear_ref.h"

#include <vector>

namespace nf4lora {

namespace {
// W[n, k] exactly, or rounded to bf16 as the bf16 paths decode it (dequantize_nf4(q, bfloat16))
float weight(const NF4Weight& w, int64_t n, int64_t k, bool bf16w) {
  const float v = w.at(n, k);
  return bf16w ? bf16_to_f32(f32_to_bf16(v)) : v;
}

Status forward_impl(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                    const LinearEpilogue& epi, void* y, bool bf16w) {
  if (Status s = w.check(); s != Status::kOk) return s;
  if (Status s = epi.check(false); s != Status::kOk) return s;
  if (!x || !y) return Status::kNullPointer;
  const LinearEpilogue* lora = epi.has_lora(false) ? &epi : nullptr;
  const float* bias = epi.bias;
  float* u = epi.u;
  if (M <= 0) return Status::kBadSize;
  const int64_t N = w.N, K = w.K;
  std::vector<float> xd(K);
  for (int64_t m = 0; m < M; ++m) {
    if (lora) {  // u[m] = D(x[m]) A^T
      const uint32_t row = lora->drop.row(m);
      for (int64_t k = 0; k < K; ++k) {
        const float v = load_as_f32(x, dtype, m * K + k);
        xd[k] = lora->drop.active() ? lora->drop.apply(row, k, v) : v;
      }
      for (int64_t j = 0; j < lora->r; ++j) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += xd[k] * lora->A[j * K + k];
        u[m * lora->r + j] = acc;
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += load_as_f32(x, dtype, m * K + k) * weight(w, n, k, bf16w);
      if (bias) acc += bias[n];
      if (lora) {
        float l = 0.0f;
        for (int64_t j = 0; j < lora->r; ++j) l += u[m * lora->r + j] * lora->B[n * lora->r + j];
        acc += lora->scaling * l;
      }
      store_from_f32(y, dtype, m * N + n, acc);
    }
  }
  return Status::kOk;
}

Status backward_dx_impl(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                        const LinearEpilogue& epi, void* dx, bool bf16w) {
  if (Status s = w.check(); s != Status::kOk) return s;
  if (Status s = epi.check(true); s != Status::kOk) return s;
  if (!dy || !dx) return Status::kNullPointer;
  const LinearEpilogue* lora = epi.has_lora(true) ? &epi : nullptr;
  const float* g = epi.g;
  if (M <= 0) return Status::kBadSize;
  const int64_t N = w.N, K = w.K;
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t row = lora ? lora->drop.row(m) : 0;
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.0f;
      for (int64_t n = 0; n < N; ++n) acc += load_as_f32(dy, dtype, m * N + n) * weight(w, n, k, bf16w);
      if (lora) {
        float l = 0.0f;
        for (int64_t j = 0; j < lora->r; ++j) l += g[m * lora->r + j] * lora->A[j * K + k];
        if (lora->drop.active()) l = lora->drop.apply(row, k, l);
        acc += lora->scaling * l;
      }
      store_from_f32(dx, dtype, m * K + k, acc);
    }
  }
  return Status::kOk;
}

}  // namespace

Status qlora_forward_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* y) {
  return forward_impl(x, dtype, M, w, epi, y, false);
}
Status qlora_forward_bf16w_ref(const void* x, DType dtype, int64_t M, const NF4Weight& w,
                               const LinearEpilogue& epi, void* y) {
  return forward_impl(x, dtype, M, w, epi, y, true);
}
Status qlora_backward_dx_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                             const LinearEpilogue& epi, void* dx) {
  return backward_dx_impl(dy, dtype, M, w, epi, dx, false);
}
Status qlora_backward_dx_bf16w_ref(const void* dy, DType dtype, int64_t M, const NF4Weight& w,
                                   const LinearEpilogue& epi, void* dx) {
  return backward_dx_impl(dy, dtype, M, w, epi, dx, true);
}

Status lora_grad_a_ref(const float* g, const void* x, DType dtype, int64_t M, int64_t K, int64_t r,
                       float scaling, const DropoutMask& drop, float* dA) {
  if (!g || !x || !dA) return Status::kNullPointer;
  if (M <= 0 || K <= 0 || r <= 0) return Status::kBadSize;
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        float v = load_as_f32(x, dtype, m * K + k);
        if (drop.active()) v = drop.apply(drop.row(m), k, v);
        acc += g[m * r + j] * v;
      }
      dA[j * K + k] = scaling * acc;
    }
  }
  return Status::kOk;
}

}  // namespace nf4lora
