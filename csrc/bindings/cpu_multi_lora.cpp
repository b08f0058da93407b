// Bindings of the CPU multi-adapter LoRA term (csrc/ref/multi_lora_ref.h, csrc/cpu/multi_lora.h).
// y already holds the base x W^T + b (the Python layer runs the fused linear's base path first).
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "bindings/cpu_bindings.h"
#include "cpu/multi_lora.h"

namespace nf4lora {

using namespace bind;

namespace {
MultiLoraArgs make_args(uintptr_t A_pool, uintptr_t B_pool, uintptr_t idx, uintptr_t scalings,
                        int64_t E, int64_t r, int pool_dtype) {
  MultiLoraArgs a;
  a.A_pool = ptr<const void>(A_pool);
  a.B_pool = ptr<const void>(B_pool);
  a.pool_dtype = to_dtype(pool_dtype);
  a.idx = ptr<const int64_t>(idx);
  a.scalings = ptr<const float>(scalings);
  a.E = E;
  a.r = r;
  return a;
}
}  // namespace

void register_cpu_multi_lora(py::module_& m) {
  m.def(
      "multi_lora_add",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, uintptr_t A_pool,
         uintptr_t B_pool, uintptr_t idx, uintptr_t scalings, int64_t E, int64_t r, uintptr_t y,
         int64_t sgmv_min_rows, const std::string& impl, int pool_dtype) {
        const MultiLoraArgs a = make_args(A_pool, B_pool, idx, scalings, E, r, pool_dtype);
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          s = ref ? multi_lora_add_ref(ptr<const void>(x), d, M, K, N, a, ptr<void>(y))
                  : multi_lora_add_cpu(ptr<const void>(x), d, M, K, N, a, ptr<void>(y), sgmv_min_rows);
        }
        check(s, "multi_lora_add", s == Status::kBadArgument ? "adapter_idx out of range [-1, E)" : "");
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("A_pool"),
      py::arg("B_pool"), py::arg("idx"), py::arg("scalings"), py::arg("E"), py::arg("r"),
      py::arg("y"), py::arg("sgmv_min_rows") = 0, py::arg("impl") = "fast", py::arg("pool_dtype") = 0,
      "y [M, N] (holds the base) += s_e (x A_e^T) B_e^T per row, e = idx[m] >= 0; pools in "
      "pool_dtype (0 f32, 1 f16, 2 bf16)");
  m.def(
      "multi_lora_plan",
      [](uintptr_t idx, int64_t M, int64_t E, int64_t sgmv_min_rows) {
        MultiLoraArgs a;
        a.idx = ptr<const int64_t>(idx);
        a.E = E;
        for (int64_t i = 0; i < M; ++i)
          if (a.idx[i] < -1 || a.idx[i] >= E) throw py::value_error("adapter_idx out of range [-1, E)");
        const MultiLoraPlan p = plan_multi_lora(a.idx, M, sgmv_min_rows);
        py::dict d;
        d["sgmv_groups"] = p.sgmv_groups;
        d["sgmv_rows"] = p.sgmv_rows;
        d["bgmv_rows"] = p.bgmv_rows;
        d["isa"] = std::string(multi_lora_isa());
        return d;
      },
      py::arg("idx"), py::arg("M"), py::arg("E"), py::arg("sgmv_min_rows") = 0,
      "How multi_lora_add groups these rows: SGMV groups / rows, BGMV rows, and the ISA");
  m.attr("MULTI_LORA_SGMV_MIN_ROWS") = kSgmvMinRows;
}

}  // namespace nf4lora
