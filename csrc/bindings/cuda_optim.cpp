// Bindings of the CUDA fused AdamW launchers (csrc/cuda/optim.h). Device pointers for param, grad,
// resident state and staging; host pointers for paged state; streams as integers
// (torch.cuda.Stream.cuda_stream). The seven float32 step constants arrive in AdamWScalars order.
#include "bindings/common.h"
#include "bindings/cuda_bindings.h"
#include "cuda/launch.h"
#include "cuda/optim.h"

namespace nf4lora {

using namespace bind;

void register_cuda_optim(py::module_& m) {
  m.attr("PAGED_SLOTS") = cuda::kPagedSlots;
  m.def("paged_slot_bytes", &cuda::paged_slot_bytes, py::arg("bits"), py::arg("page_elems"),
        "Bytes of one device staging slot of the paged AdamW pipeline");
  m.def(
      "paged_plan",
      [](int bits, int64_t n, int64_t page_elems) {
        if ((bits != 8 && bits != 32) || n <= 0 || page_elems <= 0 || page_elems % kOptimBlock)
          throw py::value_error("paged_plan: bits must be 8 or 32, n > 0, page_elems a positive multiple of 256");
        py::list out;
        for (int64_t i = 0; i * page_elems < n; ++i) {
          const cuda::PagedPage pg = cuda::paged_page(bits, n, page_elems, i);
          py::dict d;
          d["slot"] = pg.slot;
          d["off"] = pg.off;
          d["len"] = pg.len;
          d["block_off"] = pg.block_off;
          d["nblocks"] = pg.nblocks;
          d["m_at"] = pg.m_at;
          d["v_at"] = pg.v_at;
          d["am_at"] = pg.am_at;
          d["av_at"] = pg.av_at;
          d["m_bytes"] = pg.m_bytes;
          out.append(d);
        }
        return out;
      },
      py::arg("bits"), py::arg("n"), py::arg("page_elems"),
      "The paged launcher's page/slot plan (host code it runs; tests emulate the pipeline with it)");
  m.def(
      "adamw32",
      [](uintptr_t param, uintptr_t grad, int dtype, uintptr_t exp_avg, uintptr_t exp_avg_sq,
         int64_t n, float decay, float beta2, float omb1, float omb2, float step_size,
         float bias2_sqrt, float eps, uintptr_t stream) {
        check_cuda(cuda::adamw32(ptr<void>(param), ptr<const void>(grad), to_dtype(dtype),
                                 ptr<float>(exp_avg), ptr<float>(exp_avg_sq), n,
                                 AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps},
                                 cuda::as_stream(stream)),
                   "adamw32", kAdamWRangeHelp);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("exp_avg"),
      py::arg("exp_avg_sq"), py::arg("n"), py::arg("decay"), py::arg("beta2"), py::arg("omb1"),
      py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("eps"),
      py::arg("stream"));
  m.def(
      "adamw8",
      [](uintptr_t param, uintptr_t grad, int dtype, uintptr_t qm, uintptr_t qv,
         uintptr_t absmax_m, uintptr_t absmax_v, uintptr_t code_m, uintptr_t code_v, int64_t n,
         float decay, float beta2, float omb1, float omb2, float step_size, float bias2_sqrt,
         float eps, uintptr_t stream) {
        check_cuda(cuda::adamw8(ptr<void>(param), ptr<const void>(grad), to_dtype(dtype),
                                ptr<uint8_t>(qm), ptr<uint8_t>(qv), ptr<float>(absmax_m),
                                ptr<float>(absmax_v), ptr<const float>(code_m),
                                ptr<const float>(code_v), n,
                                AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps},
                                cuda::as_stream(stream)),
                   "adamw8", kAdamWRangeHelp);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("qm"), py::arg("qv"),
      py::arg("absmax_m"), py::arg("absmax_v"), py::arg("code_m"), py::arg("code_v"),
      py::arg("n"), py::arg("decay"), py::arg("beta2"), py::arg("omb1"), py::arg("omb2"),
      py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("eps"), py::arg("stream"));
  m.def(
      "adamw_paged",
      [](uintptr_t param, uintptr_t grad, int dtype, int bits, uintptr_t m_host, uintptr_t v_host,
         uintptr_t absmax_m_host, uintptr_t absmax_v_host, uintptr_t code_m, uintptr_t code_v,
         int64_t n, float decay, float beta2, float omb1, float omb2, float step_size,
         float bias2_sqrt, float eps, int64_t page_elems, uintptr_t staging,
         int64_t staging_bytes, uintptr_t compute, uintptr_t copy_in, uintptr_t copy_out) {
        check_cuda(cuda::adamw_paged(ptr<void>(param), ptr<const void>(grad), to_dtype(dtype), bits,
                                     ptr<void>(m_host), ptr<void>(v_host), ptr<float>(absmax_m_host),
                                     ptr<float>(absmax_v_host), ptr<const float>(code_m),
                                     ptr<const float>(code_v), n,
                                     AdamWScalars{decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps},
                                     page_elems, ptr<void>(staging), staging_bytes,
                                     cuda::as_stream(compute), cuda::as_stream(copy_in),
                                     cuda::as_stream(copy_out)),
                   "adamw_paged", kAdamWRangeHelp);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("bits"), py::arg("m_host"),
      py::arg("v_host"), py::arg("absmax_m_host"), py::arg("absmax_v_host"), py::arg("code_m"),
      py::arg("code_v"), py::arg("n"), py::arg("decay"), py::arg("beta2"), py::arg("omb1"),
      py::arg("omb2"), py::arg("step_size"), py::arg("bias2_sqrt"), py::arg("eps"),
      py::arg("page_elems"), py::arg("staging"), py::arg("staging_bytes"), py::arg("compute"),
      py::arg("copy_in"), py::arg("copy_out"));
}

}  // namespace nf4lora
