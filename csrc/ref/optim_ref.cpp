// Scalar reference of the fused AdamW update: one element at a time, exactly the rules of
// optim_ref.h. Written for clarity; the AVX2 and CUDA kernels must match it bit for bit.
#include "ref/optim_ref.h"

#include "nf4lora/dynamic_map.h"
#include "nf4lora/layout.h"

namespace nf4lora {

void adamw32_elems_ref(void* param, const void* grad, DType dtype, float* m, float* v, int64_t i0,
                       int64_t i1, const AdamWScalars& s) {
  for (int64_t i = i0; i < i1; ++i) {
    const float p = load_as_f32(param, dtype, i);
    const float g = load_as_f32(grad, dtype, i);
    store_from_f32(param, dtype, i, adamw_elem(p, g, &m[i], &v[i], s));
  }
}

void adamw8_blocks_ref(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                       float* absmax_m, float* absmax_v, int64_t n, int64_t b0, int64_t b1,
                       const AdamWScalars& s) {
  float mb[kOptimBlock], vb[kOptimBlock];  // the block's updated float32 state
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kOptimBlock;
    const int64_t end = begin + kOptimBlock < n ? begin + kOptimBlock : n;
    const float sm = absmax_m[b], sv = absmax_v[b];
    float amax_m = 0.0f, amax_v = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      float m = state8_decode(kDynamicSigned, qm[i], sm);
      float v = state8_decode(kDynamicUnsigned, qv[i], sv);
      const float p = load_as_f32(param, dtype, i);
      const float g = load_as_f32(grad, dtype, i);
      store_from_f32(param, dtype, i, adamw_elem(p, g, &m, &v, s));
      mb[i - begin] = m;
      vb[i - begin] = v;
      const float am = std::fabs(m), av = std::fabs(v);
      amax_m = am > amax_m ? am : amax_m;
      amax_v = av > amax_v ? av : amax_v;
    }
    absmax_m[b] = amax_m;
    absmax_v[b] = amax_v;
    const float inv_m = nf4_inv_scale(amax_m), inv_v = nf4_inv_scale(amax_v);
    for (int64_t i = begin; i < end; ++i) {
      qm[i] = state8_encode(kDynamicSigned, mb[i - begin], inv_m);
      qv[i] = state8_encode(kDynamicUnsigned, vb[i - begin], inv_v);
    }
  }
}

Status adamw32_ref(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
                   const AdamWScalars& s) {
  if (n <= 0) return Status::kBadSize;
  if (!param || !grad || !m || !v) return Status::kNullPointer;
  if (s.check() != Status::kOk) return s.check();
  adamw32_elems_ref(param, grad, dtype, m, v, 0, n, s);
  return Status::kOk;
}

Status adamw8_ref(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                  float* absmax_m, float* absmax_v, int64_t n, const AdamWScalars& s) {
  if (n <= 0) return Status::kBadSize;
  if (!param || !grad || !qm || !qv || !absmax_m || !absmax_v) return Status::kNullPointer;
  if (s.check() != Status::kOk) return s.check();
  adamw8_blocks_ref(param, grad, dtype, qm, qv, absmax_m, absmax_v, n, 0,
                    ceil_div(n, int64_t{kOptimBlock}), s);
  return Status::kOk;
}

}  // namespace nf4lora
