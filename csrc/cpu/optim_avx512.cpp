// AVX-512 fused AdamW update with 32-bit state, 16 lanes of float32 at a time (dispatch: optim.cpp,
// when use_avx512(); the AVX2 twin in optim_avx2.cpp is the fallback): load p, g (fp32/fp16/bf16),
// m, v -> update -> store p, m, v. Bit-identical to adamw_elem (see optim_avx512.h). The 8-bit
// state kernel is optim8_avx512vbmi.cpp.
#include "cpu/optim_avx512.h"

#include "cpu/optim.h"

namespace nf4lora {

void adamw32_elems_avx512(void* param, const void* grad, DType dtype, float* m, float* v,
                          int64_t i0, int64_t i1, const AdamWScalars& s) {
  const Consts k(s);
  for (int64_t i = i0; i < i1; i += 16) {
    __m512 mm = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
    const __m512 p = adamw16(load16(param, dtype, i), load16(grad, dtype, i), &mm, &vv, k);
    store16(param, dtype, i, p);
    _mm512_storeu_ps(m + i, mm);
    _mm512_storeu_ps(v + i, vv);
  }
}

}  // namespace nf4lora
