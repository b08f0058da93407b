// Bindings of the CUDA quantize/dequantize launchers (csrc/cuda/quantize.h). Pointers are device
// addresses, `stream` is torch.cuda.current_stream().cuda_stream.
#include "bindings/common.h"
#include "bindings/cuda_bindings.h"
#include "cuda/launch.h"
#include "cuda/quantize.h"

namespace nf4lora {

using namespace bind;

void register_cuda_quantize(py::module_& m) {
  m.def(
      "nf4_quantize",
      [](uintptr_t w, int dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax,
         uintptr_t flag, uintptr_t stream) {
        check_cuda(cuda::nf4_quantize(ptr<const void>(w), to_dtype(dtype), n, blocksize,
                                      ptr<uint8_t>(packed), ptr<float>(absmax), ptr<int>(flag),
                                      cuda::as_stream(stream)),
                   "nf4_quantize");
      },
      py::arg("w"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"),
      py::arg("absmax"), py::arg("nonfinite_flag"), py::arg("stream"));
  m.def(
      "nf4_dequantize",
      [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code8,
         float offset, int64_t blocksize, int64_t n, uintptr_t out, int dtype, uintptr_t stream) {
        const NF4Scales sc = make_scales(absmax, qabsmax, absmax2, code8, offset);
        check_cuda(cuda::nf4_dequantize(ptr<const uint8_t>(packed), sc, n, blocksize, ptr<void>(out),
                                        to_dtype(dtype), cuda::as_stream(stream)),
                   "nf4_dequantize");
      },
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code8"), py::arg("offset"), py::arg("blocksize"), py::arg("n"), py::arg("out"),
      py::arg("dtype"), py::arg("stream"));
  m.def(
      "absmax_quantize",
      [](uintptr_t absmax, int64_t nblocks, float offset, uintptr_t code8, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t stream) {
        check_cuda(cuda::absmax_quantize(ptr<const float>(absmax), nblocks, offset,
                                         ptr<const float>(code8), ptr<uint8_t>(qabsmax),
                                         ptr<float>(absmax2), cuda::as_stream(stream)),
                   "absmax_quantize");
      },
      py::arg("absmax"), py::arg("nblocks"), py::arg("offset"), py::arg("code8"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("stream"));
}

}  // namespace nf4lora
