// pybind11 glue shared by the binding files (the only place that knows pybind11). Python passes
// tensors as raw addresses (tensor.data_ptr()) and sizes; these helpers turn a launcher Status into
// a Python exception and release the GIL around kernels.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/layout.h"
#include "nf4lora/status.h"

namespace nf4lora {
namespace bind {

namespace py = pybind11;

template <typename T>
inline T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Raise ValueError (bad argument) or RuntimeError (runtime failure) naming the launcher.
inline void check(Status s, const char* launcher, const std::string& detail = "") {
  if (s == Status::kOk) return;
  std::string msg = std::string(launcher) + ": " + status_message(s);
  if (!detail.empty()) msg += " (" + detail + ")";
  if (status_is_value_error(s)) throw py::value_error(msg);
  throw std::runtime_error(msg);
}

// "ref" runs the scalar csrc/ref kernel, "fast" the AVX2/CUDA one; anything else is an error.
inline bool use_ref(const std::string& impl) {
  if (impl == "ref") return true;
  if (impl == "fast") return false;
  throw py::value_error("impl must be 'ref' or 'fast', got '" + impl + "'");
}

inline DType to_dtype(int d) {
  if (!dtype_valid(d)) throw py::value_error("dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  return static_cast<DType>(d);
}

// Block scales from addresses: absmax (plain) or qabsmax + absmax2 + code8 + offset (nested).
inline NF4Scales make_scales(uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2,
                             uintptr_t code8, float offset) {
  NF4Scales s;
  s.absmax = ptr<const float>(absmax);
  s.qabsmax = ptr<const uint8_t>(qabsmax);
  s.absmax2 = ptr<const float>(absmax2);
  s.code8 = ptr<const float>(code8);
  s.offset = offset;
  return s;
}

inline NF4Weight make_weight(uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
                             uintptr_t absmax2, uintptr_t code8, float offset, int64_t N,
                             int64_t K, int64_t blocksize) {
  NF4Weight w;
  w.packed = ptr<const uint8_t>(packed);
  w.scales = make_scales(absmax, qabsmax, absmax2, code8, offset);
  w.N = N;
  w.K = K;
  w.blocksize = blocksize;
  return w;
}

inline DropoutMask make_mask(double p, int64_t seed) {
  if (!(p >= 0.0 && p < 1.0)) throw py::value_error("dropout_p must be in [0, 1)");
  return make_dropout(p, seed);
}

}  // namespace bind
}  // namespace nf4lora
