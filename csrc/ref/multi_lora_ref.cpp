// Scalar reference of the multi-adapter LoRA term: plain loops, float32 sums in natural order.
#include "ref/multi_lora_ref.h"

#include <vector>

namespace nf4lora {

Status check_multi_lora(const MultiLoraArgs& a, int64_t M, int64_t K, int64_t N, const void* x,
                        const void* y) {
  if (M < 0 || K <= 0 || N <= 0 || a.E <= 0 || a.r <= 0) return Status::kBadSize;
  if (M == 0) return Status::kOk;
  if (!x || !y || !a.A_pool || !a.B_pool || !a.idx || !a.scalings) return Status::kNullPointer;
  for (int64_t m = 0; m < M; ++m)
    if (a.idx[m] < -1 || a.idx[m] >= a.E) return Status::kBadArgument;
  return Status::kOk;
}

Status multi_lora_add_ref(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                          const MultiLoraArgs& a, void* y) {
  if (Status s = check_multi_lora(a, M, K, N, x, y); s != Status::kOk) return s;
  const int64_t r = a.r;
  std::vector<float> u(static_cast<size_t>(r));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t e = a.idx[m];
    if (e < 0) continue;
    const int64_t a0 = e * r * K, b0 = e * N * r;  // element offsets of A_e, B_e
    for (int64_t j = 0; j < r; ++j) {  // u = x[m] A_e^T
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        acc += load_as_f32(x, dtype, m * K + k) * load_as_f32(a.A_pool, a.pool_dtype, a0 + j * K + k);
      u[j] = acc;
    }
    for (int64_t n = 0; n < N; ++n) {  // y[m] += s_e u B_e^T
      float l = 0.0f;
      for (int64_t j = 0; j < r; ++j) l += u[j] * load_as_f32(a.B_pool, a.pool_dtype, b0 + n * r + j);
      store_from_f32(y, dtype, m * N + n, load_as_f32(y, dtype, m * N + n) + a.scalings[e] * l);
    }
  }
  return Status::kOk;
}

}  // namespace nf4lora
