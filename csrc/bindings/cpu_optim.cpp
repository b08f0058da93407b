// Bindings of the CPU fused AdamW launchers (csrc/ref/optim_ref.h, csrc/cpu/optim.h). The seven
// float32 step constants arrive in AdamWScalars order (nf4lora._optim_ops.adamw_scalars).
#include <pybind11/stl.h>

#include <vector>

#include "bindings/common.h"
#include "bindings/cpu_bindings.h"
#include "cpu/optim.h"

namespace nf4lora {

using namespace bind;

void register_cpu_optim(py::module_& m) {
  m.def(
      "adamw32",
      [](uintptr_t param, uintptr_t grad, int dtype, uintptr_t exp_avg, uintptr_t exp_avg_sq,
         int64_t n, float decay, float beta2, float omb1, float omb2, float step_size,
         float bias2_sqrt, float eps, int64_t page_elems, const std::string& impl) {
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        const AdamWScalars s = AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps};
        Status st;
        {
          py::gil_scoped_release nogil;
          st = ref ? adamw32_ref(ptr<void>(param), ptr<const void>(grad), d, ptr<float>(exp_avg),
                                 ptr<float>(exp_avg_sq), n, s)
                   : adamw32_cpu(ptr<void>(param), ptr<const void>(grad), d, ptr<float>(exp_avg),
                                 ptr<float>(exp_avg_sq), n, s, page_elems);
        }
        check(st, "adamw32", st == Status::kBadArgument ? kAdamWRangeHelp : "");
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("exp_avg"),
      py::arg("exp_avg_sq"), py::arg("n"), py::arg("decay"), py::arg("beta2"), py::arg("omb1"),
      py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("eps"),
      py::arg("page_elems"), py::arg("impl") = "fast");

  m.def(
      "adamw8",
      [](uintptr_t param, uintptr_t grad, int dtype, uintptr_t qm, uintptr_t qv,
         uintptr_t absmax_m, uintptr_t absmax_v, int64_t n, float decay, float beta2, float omb1,
         float omb2, float step_size, float bias2_sqrt, float eps, int64_t page_elems,
         const std::string& impl) {
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        const AdamWScalars s = AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps};
        Status st;
        {
          py::gil_scoped_release nogil;
          st = ref ? adamw8_ref(ptr<void>(param), ptr<const void>(grad), d, ptr<uint8_t>(qm),
                                ptr<uint8_t>(qv), ptr<float>(absmax_m), ptr<float>(absmax_v), n, s)
                   : adamw8_cpu(ptr<void>(param), ptr<const void>(grad), d, ptr<uint8_t>(qm),
                                ptr<uint8_t>(qv), ptr<float>(absmax_m), ptr<float>(absmax_v), n, s,
                                page_elems);
        }
        check(st, "adamw8", st == Status::kBadArgument ? kAdamWRangeHelp : "");
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("qm"), py::arg("qv"),
      py::arg("absmax_m"), py::arg("absmax_v"), py::arg("n"), py::arg("decay"), py::arg("beta2"),
      py::arg("omb1"), py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"),
      py::arg("eps"), py::arg("page_elems"), py::arg("impl") = "fast");

  // Multi-tensor forms: parallel lists of addresses (one entry per tensor) and element counts.
  m.def(
      "adamw32_multi",
      [](const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
         const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
         const std::vector<int64_t>& ns, int dtype, float decay, float beta2, float omb1,
         float omb2, float step_size, float bias2_sqrt, float eps, int64_t page_elems) {
        const size_t count = params.size();
        if (grads.size() != count || exp_avgs.size() != count || exp_avg_sqs.size() != count ||
            ns.size() != count)
          throw py::value_error("adamw32_multi: the lists must have one entry per tensor");
        const DType d = to_dtype(dtype);
        const AdamWScalars s = AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps};
        std::vector<AdamW32Tensor> ts(count);
        for (size_t i = 0; i < count; ++i)
          ts[i] = {ptr<void>(params[i]), ptr<const void>(grads[i]), ptr<float>(exp_avgs[i]),
                   ptr<float>(exp_avg_sqs[i]), ns[i]};
        Status st;
        {
          py::gil_scoped_release nogil;
          st = adamw32_cpu_multi(ts.data(), static_cast<int64_t>(count), d, s, page_elems);
        }
        check(st, "adamw32_multi", st == Status::kBadArgument ? kAdamWRangeHelp : "");
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("ns"), py::arg("dtype"), py::arg("decay"), py::arg("beta2"), py::arg("omb1"),
      py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("eps"),
      py::arg("page_elems"));

  m.def(
      "adamw8_multi",
      [](const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
         const std::vector<uintptr_t>& qms, const std::vector<uintptr_t>& qvs,
         const std::vector<uintptr_t>& absmax_ms, const std::vector<uintptr_t>& absmax_vs,
         const std::vector<int64_t>& ns, int dtype, float decay, float beta2, float omb1,
         float omb2, float step_size, float bias2_sqrt, float eps, int64_t page_elems) {
        const size_t count = params.size();
        if (grads.size() != count || qms.size() != count || qvs.size() != count ||
            absmax_ms.size() != count || absmax_vs.size() != count || ns.size() != count)
          throw py::value_error("adamw8_multi: the lists must have one entry per tensor");
        const DType d = to_dtype(dtype);
        const AdamWScalars s = AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps};
        std::vector<AdamW8Tensor> ts(count);
        for (size_t i = 0; i < count; ++i)
          ts[i] = {ptr<void>(params[i]), ptr<const void>(grads[i]), ptr<uint8_t>(qms[i]),
                   ptr<uint8_t>(qvs[i]), ptr<float>(absmax_ms[i]), ptr<float>(absmax_vs[i]), ns[i]};
        Status st;
        {
          py::gil_scoped_release nogil;
          st = adamw8_cpu_multi(ts.data(), static_cast<int64_t>(count), d, s, page_elems);
        }
        check(st, "adamw8_multi", st == Status::kBadArgument ? kAdamWRangeHelp : "");
      },
      py::arg("params"), py::arg("grads"), py::arg("qms"), py::arg("qvs"), py::arg("absmax_ms"),
      py::arg("absmax_vs"), py::arg("ns"), py::arg("dtype"), py::arg("decay"), py::arg("beta2"),
      py::arg("omb1"), py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"),
      py::arg("eps"), py::arg("page_elems"));

  m.def(
      "code8_encode",
      [](uintptr_t x, int64_t n, bool is_signed, uintptr_t out, const std::string& impl) {
        const bool ref = use_ref(impl);
        Status st;
        {
          py::gil_scoped_release nogil;
          st = code8_encode_cpu(ptr<const float>(x), n, is_signed, ptr<uint8_t>(out), !ref);
        }
        check(st, "code8_encode");
      },
      py::arg("x"), py::arg("n"), py::arg("is_signed"), py::arg("out"), py::arg("impl") = "fast",
      "Exact-nearest 8-bit dynamic code of float32 x[n] (tests: 'fast' = the AVX-512 arithmetic "
      "encoder where uses_avx512vbmi(), else the AVX2 key-table encoder)");

  m.def(
      "code8_lut_ok", [](bool is_signed) { return code8_lut(is_signed).ok; }, py::arg("is_signed"),
      "The AVX2 encoder's key table holds at most one midpoint per key (else the scalar path runs)");
  m.def(
      "code8_arith_info",
      [](bool is_signed) {
        const Code8Arith& a = code8_arith(is_signed);
        py::dict d;
        d["ok"] = a.ok;
        d["near"] = a.near;
        d["max_err"] = a.max_err;
        return d;
      },
      py::arg("is_signed"),
      "The AVX-512 encoder's tables: ok (all proofs passed, else it is not used), near and max_err "
      "(in units of 2^-16 of an index)");
}

}  // namespace nf4lora
