// Bindings of the CPU fused QLoRA linear (csrc/ref/linear_ref.h, csrc/cpu/linear.h). The weight
// arrives as (packed, absmax | qabsmax+absmax2+code8, offset, blocksize, N, K) addresses/values.
#include "bindings/common.h"
#include "bindings/cpu_bindings.h"
#include "cpu/linear.h"

namespace nf4lora {

using namespace bind;

namespace {
// impl: "fast" (dispatched kernels), "ref" (exact scalar reference), "ref_bf16w" (scalar
// reference of the bf16 paths: W rounded to bf16)
enum class Impl { kFast, kRef, kRefBf16w };
Impl parse_impl(const std::string& impl) {
  if (impl == "ref_bf16w") return Impl::kRefBf16w;
  return use_ref(impl) ? Impl::kRef : Impl::kFast;
}
}  // namespace

void register_cpu_linear(py::module_& m) {
  // The launch convention of nf4lora/epilogue.h, as _C_cuda.qlora_forward / qlora_backward_dx
  // take it (those add the workspace, the stream and a forced path).
  m.def(
      "qlora_forward",
      [](uintptr_t x, int dtype, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t code8, float offset, int64_t blocksize, int64_t N, int64_t K,
         uintptr_t bias, uintptr_t A, uintptr_t B, int64_t r, float scaling, double dropout_p,
         int64_t seed, uintptr_t y, uintptr_t u, const std::string& impl) {
        const NF4Weight w = make_weight(packed, absmax, qabsmax, absmax2, code8, offset, blocksize, N, K);
        const LinearEpilogue e = make_epilogue(bias, A, B, r, scaling, dropout_p, seed, u, 0);
        const DType d = to_dtype(dtype);
        const Impl which = parse_impl(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          auto fn = which == Impl::kRef ? qlora_forward_ref
                    : which == Impl::kRefBf16w ? qlora_forward_bf16w_ref : qlora_forward_cpu;
          s = fn(ptr<const void>(x), d, M, w, e, ptr<void>(y));
        }
        check(s, "qlora_forward");
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
      py::arg("blocksize"), py::arg("N"), py::arg("K"), py::arg("bias"), py::arg("A"), py::arg("B"),
      py::arg("r"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("y"),
      py::arg("u"), py::arg("impl") = "fast");

  m.def(
      "qlora_backward_dx",
      [](uintptr_t dy, int dtype, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t code8, float offset, int64_t blocksize, int64_t N, int64_t K,
         uintptr_t A, int64_t r, float scaling, double dropout_p, int64_t seed, uintptr_t g,
         uintptr_t dx, const std::string& impl) {
        const NF4Weight w = make_weight(packed, absmax, qabsmax, absmax2, code8, offset, blocksize, N, K);
        const LinearEpilogue e = make_epilogue(0, A, 0, r, scaling, dropout_p, seed, 0, g);
        const DType d = to_dtype(dtype);
        const Impl which = parse_impl(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          auto fn = which == Impl::kRef ? qlora_backward_dx_ref
                    : which == Impl::kRefBf16w ? qlora_backward_dx_bf16w_ref : qlora_backward_dx_cpu;
          s = fn(ptr<const void>(dy), d, M, w, e, ptr<void>(dx));
        }
        check(s, "qlora_backward_dx");
      },
      py::arg("dy"), py::arg("dtype"), py::arg("M"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
      py::arg("blocksize"), py::arg("N"), py::arg("K"), py::arg("A"), py::arg("r"),
      py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("g"), py::arg("dx"),
      py::arg("impl") = "fast");

  m.def(
      "lora_grad_a",
      [](uintptr_t g, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t r, float scaling,
         double dropout_p, int64_t seed, uintptr_t dA, const std::string& impl) {
        const DropoutMask drop = make_mask(dropout_p, seed);
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          s = ref ? lora_grad_a_ref(ptr<const float>(g), ptr<const void>(x), d, M, K, r, scaling, drop,
                                    ptr<float>(dA))
                  : lora_grad_a_cpu(ptr<const float>(g), ptr<const void>(x), d, M, K, r, scaling, drop,
                                    ptr<float>(dA));
        }
        check(s, "lora_grad_a");
      },
      py::arg("g"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("r"),
      py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("dA"),
      py::arg("impl") = "fast");

  m.def(
      "forward_path",
      [](int64_t M, int64_t N, int64_t K, int dtype) { return std::string(forward_path(M, N, K, to_dtype(dtype))); },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype") = 0,
      "Which CPU path qlora_forward takes: 'amx', 'avx512_bf16', 'gemv512', 'gemv', 'gemm512', 'gemm' or 'ref'");
  m.attr("GEMV_MAX_ROWS") = kGemvMaxRows;
  m.attr("GEMV512_MAX_ROWS") = kGemv512MaxRows;
  m.attr("BF16_TILE_MIN_ROWS") = kBf16TileMinRows;
  m.def(
      "backward_path",
      [](int64_t M, int64_t N, int64_t K, int dtype) { return std::string(backward_path(M, N, K, to_dtype(dtype))); },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype") = 0,
      "Which CPU path qlora_backward_dx takes: 'amx', 'avx512_bf16', 'gemm512', 'gemm' or 'ref'");
}

}  // namespace nf4lora
