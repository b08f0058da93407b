// Bindings of the CUDA multi-adapter LoRA term (csrc/cuda/multi_lora.h) and a host emulation that
// runs both kernels block by block, warp by warp, lane by lane through the same per-thread
// functions (the shuffle butterfly emulated), for tests/test_cuda_host.py. Only
// multi_lora_add needs a GPU.
#include <algorithm>
#include <array>
#include <vector>

#include "bindings/common.h"
#include "bindings/cuda_bindings.h"
#include "cuda/multi_lora.h"

namespace nf4lora {

using namespace bind;

namespace {

// __shfl_xor_sync butterfly of the shrink kernel's warp_sum, all lanes at once
template <int T>
void warp_sum_host(std::array<std::array<float, T>, 32>& v) {
  for (int off = 16; off > 0; off >>= 1) {
    const auto before = v;
    for (int lane = 0; lane < 32; ++lane)
      for (int t = 0; t < T; ++t) v[lane][t] = before[lane][t] + before[lane ^ off][t];
  }
}

template <int T>
void emulate(const void* x, DType dt, int64_t M, int64_t K, int64_t N, const void* A_pool,
             const void* B_pool, DType pdt, const int64_t* idx, const int64_t* order, const float* scalings,
             int64_t E, int64_t r, float* u, void* y) {
  using namespace cuda::mlora;
  const int64_t gx = (M + T - 1) / T, gy = (N + kExpandCols - 1) / kExpandCols;
  for (int64_t b = 0; b < gx; ++b)  // shrink_kernel: blocks (b, by), warps, lanes
    for (int64_t by = 0; by < shrink_blocks_y(r); ++by)
      for (int warp = 0; warp < kWarps; ++warp) {
        const int64_t j = shrink_rank(by, warp);
        if (j >= r) continue;
        const int64_t p0 = b * T, p1 = std::min(M, p0 + T);
        for (int64_t p = p0; p < p1;) {
          int64_t e, rows[T];
          int n;
          p = next_run<T>(idx, order, p, p1, &e, rows, &n);
          if (e < 0 || e >= E) continue;
          std::array<std::array<float, T>, 32> acc;
          for (int lane = 0; lane < 32; ++lane)
            shrink_lane<T>(x, dt, K, rows, A_pool, pdt, (e * r + j) * K, lane, acc[lane].data());
          warp_sum_host<T>(acc);
          for (int t = 0; t < n; ++t) u[rows[t] * r + j] = acc[0][t];
        }
      }
  for (int64_t b = 0; b < gx; ++b)  // expand_kernel
    for (int64_t by = 0; by < gy; ++by)
      for (int th = 0; th < kThreads; ++th) {
        const int64_t col = by * kExpandCols + th;
        if (col >= N) continue;
        const int64_t p0 = b * T, p1 = std::min(M, p0 + T);
        for (int64_t p = p0; p < p1;) {
          int64_t e, rows[T];
          int n;
          p = next_run<T>(idx, order, p, p1, &e, rows, &n);
          if (e < 0 || e >= E) continue;
          float acc[T];
          expand_col<T>(u, r, rows, B_pool, pdt, (e * N + col) * r, acc);
          for (int t = 0; t < n; ++t) add_out(y, dt, rows[t] * N + col, scalings[e], acc[t]);
        }
      }
}

}  // namespace

void register_cuda_multi_lora(py::module_& m) {
  m.def(
      "multi_lora_add",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, uintptr_t A_pool,
         uintptr_t B_pool, uintptr_t idx, uintptr_t order, uintptr_t scalings, int64_t E, int64_t r,
         uintptr_t u, uintptr_t y, bool sgmv, uintptr_t stream, int pool_dtype) {
        const DType d = to_dtype(dtype), pd = to_dtype(pool_dtype);
        py::gil_scoped_release nogil;
        check_cuda(cuda::multi_lora_add(ptr<const void>(x), d, M, K, N, ptr<const void>(A_pool),
                                        ptr<const void>(B_pool), pd, ptr<const int64_t>(idx),
                                        ptr<const int64_t>(order), ptr<const float>(scalings), E, r,
                                        ptr<float>(u), ptr<void>(y), sgmv, cuda::as_stream(stream)),
                   "multi_lora_add");
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("A_pool"),
      py::arg("B_pool"), py::arg("idx"), py::arg("order"), py::arg("scalings"), py::arg("E"),
      py::arg("r"), py::arg("u"), py::arg("y"), py::arg("sgmv"), py::arg("stream"),
      py::arg("pool_dtype") = 0);
  m.def(
      "multi_lora_emulate_host",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, uintptr_t A_pool,
         uintptr_t B_pool, uintptr_t idx, uintptr_t order, uintptr_t scalings, int64_t E, int64_t r,
         uintptr_t u, uintptr_t y, bool sgmv, int pool_dtype) {
        const DType d = to_dtype(dtype), pd = to_dtype(pool_dtype);
        if (M < 0 || K <= 0 || N <= 0 || E <= 0 || r <= 0) throw py::value_error("bad sizes");
        if (sgmv && !order) throw py::value_error("sgmv needs order");
        py::gil_scoped_release nogil;
        (sgmv ? emulate<cuda::mlora::kSgmvTile> : emulate<1>)(
            ptr<const void>(x), d, M, K, N, ptr<const void>(A_pool), ptr<const void>(B_pool), pd,
            ptr<const int64_t>(idx), sgmv ? ptr<const int64_t>(order) : nullptr,
            ptr<const float>(scalings), E, r, ptr<float>(u), ptr<void>(y));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("A_pool"),
      py::arg("B_pool"), py::arg("idx"), py::arg("order"), py::arg("scalings"), py::arg("E"),
      py::arg("r"), py::arg("u"), py::arg("y"), py::arg("sgmv"), py::arg("pool_dtype") = 0,
      "CPU emulation of the multi_lora_add kernels on host memory (tests)");
  m.attr("MULTI_LORA_SGMV_TILE") = cuda::mlora::kSgmvTile;
}

}  // namespace nf4lora
