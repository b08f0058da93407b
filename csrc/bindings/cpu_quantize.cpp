// Bindings of the CPU quantize/dequantize launchers (csrc/ref/quantize_ref.h, csrc/cpu/quantize.h).
#include "bindings/common.h"
#include "bindings/cpu_bindings.h"
#include "cpu/quantize.h"

namespace nf4lora {

using namespace bind;

void register_cpu_quantize(py::module_& m) {
  m.def(
      "nf4_quantize",
      [](uintptr_t w, int dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax,
         const std::string& impl) {
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          s = ref ? nf4_quantize_ref(ptr<const void>(w), d, n, blocksize, ptr<uint8_t>(packed),
                                     ptr<float>(absmax))
                  : nf4_quantize_cpu(ptr<const void>(w), d, n, blocksize, ptr<uint8_t>(packed),
                                     ptr<float>(absmax));
        }
        check(s, "nf4_quantize");
      },
      py::arg("w"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"),
      py::arg("absmax"), py::arg("impl") = "fast");

  m.def(
      "nf4_dequantize",
      [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code8,
         float offset, int64_t blocksize, int64_t n, uintptr_t out, int dtype,
         const std::string& impl) {
        const DType d = to_dtype(dtype);
        const bool ref = use_ref(impl);
        const NF4Scales sc = make_scales(absmax, qabsmax, absmax2, code8, offset);
        Status s;
        {
          py::gil_scoped_release nogil;
          s = ref ? nf4_dequantize_ref(ptr<const uint8_t>(packed), sc, n, blocksize, ptr<void>(out), d)
                  : nf4_dequantize_cpu(ptr<const uint8_t>(packed), sc, n, blocksize, ptr<void>(out), d);
        }
        check(s, "nf4_dequantize");
      },
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code8"), py::arg("offset"), py::arg("blocksize"), py::arg("n"), py::arg("out"),
      py::arg("dtype"), py::arg("impl") = "fast");

  // The per-thread NF4 word decode the CUDA kernel runs (nf4.h, __host__ __device__), exposed so
  // the tests check it on machines without a GPU.
  m.def(
      "nf4_decode_word",
      [](uint32_t word, float scale) {
        float v[8];
        nf4_decode_word(word, kNF4, scale, v);
        py::list out;
        for (float x : v) out.append(x);
        return out;
      },
      py::arg("word"), py::arg("scale"));

  m.def(
      "absmax_quantize",
      [](uintptr_t absmax, int64_t nblocks, float offset, uintptr_t code8, uintptr_t qabsmax,
         uintptr_t absmax2, const std::string& impl) {
        const bool ref = use_ref(impl);
        Status s;
        {
          py::gil_scoped_release nogil;
          s = (ref ? absmax_quantize_ref : absmax_quantize_cpu)(
              ptr<const float>(absmax), nblocks, offset, ptr<const float>(code8),
              ptr<uint8_t>(qabsmax), ptr<float>(absmax2));
        }
        check(s, "absmax_quantize");
      },
      py::arg("absmax"), py::arg("nblocks"), py::arg("offset"), py::arg("code8"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("impl") = "fast");

  m.def(
      "absmax_dequantize",
      [](uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code8, float offset, int64_t nblocks,
         uintptr_t absmax) {
        Status s;
        {
          py::gil_scoped_release nogil;
          s = absmax_dequantize_ref(ptr<const uint8_t>(qabsmax), ptr<const float>(absmax2),
                                    ptr<const float>(code8), offset, nblocks, ptr<float>(absmax));
        }
        check(s, "absmax_dequantize");
      },
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
      py::arg("nblocks"), py::arg("absmax"));
}

}  // namespace nf4lora
