// Error codes every launcher returns (launchers never throw, abort or exit). The bindings turn a
// non-OK status into a Python ValueError (bad argument) or RuntimeError (runtime failure) whose
// message names the launcher and, through the Python layer's own checks, the argument.
#pragma once

namespace nf4lora {

enum class Status : int {
  kOk = 0,
  kNullPointer,     // a required pointer is null
  kBadSize,         // a size is negative, zero where it must not be, or sizes disagree
  kBadBlocksize,    // blocksize not a power of two in [32, 4096]
  kBadDtype,        // unsupported dtype code
  kNonFinite,       // input holds NaN or Inf
  kBadArgument,     // any other invalid argument (probability, rank, ...)
  kUnsupported,     // valid but not implemented on this backend
  kCudaError,       // a CUDA runtime call failed (message from cudaGetErrorString)
  kOutOfMemory,     // a host scratch allocation failed
};

inline const char* status_message(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kNullPointer: return "a required pointer is null";
    case Status::kBadSize: return "invalid or inconsistent size";
    case Status::kBadBlocksize: return "blocksize must be a power of two in [32, 4096]";
    case Status::kBadDtype: return "unsupported dtype";
    case Status::kNonFinite: return "input contains NaN or Inf";
    case Status::kBadArgument: return "invalid argument";
    case Status::kUnsupported: return "not supported on this backend";
    case Status::kCudaError: return "CUDA error";
    case Status::kOutOfMemory: return "out of host memory for kernel scratch";
  }
  return "unknown status";
}

// True for Status values that mean "the caller passed something wrong" (-> ValueError).
inline bool status_is_value_error(Status s) {
  return s != Status::kOk && s != Status::kCudaError && s != Status::kUnsupported &&
         s != Status::kOutOfMemory;
}

}  // namespace nf4lora
