// pybind11 glue shared by the binding files (the only place that knows pybind11). Python passes
// tensors as raw addresses (tensor.data_ptr()) and sizes; these helpers turn a launcher Status into
// a Python exception and release the GIL around kernels.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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

}  // namespace bind
}  // namespace nf4lora
