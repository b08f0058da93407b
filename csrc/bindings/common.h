// pybind11 glue shared by the binding files (the only place that knows pybind11). Python passes
// tensors as raw addresses (tensor.data_ptr()) and sizes; these helpers turn a launcher Status into
// a Python exception and release the GIL around kernels.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/epilogue.h"
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

// The NF4 state in the one argument order every binding takes it (the op schemas' order:
// packed, absmax | qabsmax + absmax2 + code8, offset, blocksize), then the weight's shape N, K.
inline NF4Weight make_weight(uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
                             uintptr_t absmax2, uintptr_t code8, float offset, int64_t blocksize,
                             int64_t N, int64_t K) {
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

// The LoRA side of a launch (nf4lora/epilogue.h) from addresses; A == 0: no LoRA term. The
// forward passes bias, B and u (written), the backward g.
inline LinearEpilogue make_epilogue(uintptr_t bias, uintptr_t A, uintptr_t B, int64_t r,
                                    float scaling, double dropout_p, int64_t seed, uintptr_t u,
                                    uintptr_t g) {
  LinearEpilogue e;
  e.bias = ptr<const float>(bias);
  e.A = ptr<const float>(A);
  e.B = ptr<const float>(B);
  e.u = ptr<float>(u);
  e.g = ptr<const float>(g);
  e.r = r;
  e.scaling = scaling;
  e.drop = make_mask(dropout_p, seed);
  return e;
}

}  // namespace bind
}  // namespace nf4lora
