// CUDA NF4 linear launchers: argument checks, the plan (linear_plan.h), the forward's LoRA shrink
// U = D(x) A^T (linear_simt.cu), then the chosen path (gemv_nf4.cu, gemm_nf4.cu, linear_simt.cu)
// and, with split-K, the finalize pass.
#include "cuda/launch.h"
#include "cuda/linear.h"

namespace nf4lora {
namespace cuda {

namespace {
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

Status check_weight(const NF4Weight& w) {
  if (w.N <= 0 || w.K <= 0) return Status::kBadSize;
  if (!blocksize_valid(w.blocksize)) return Status::kBadBlocksize;
  if (w.packed == nullptr) return Status::kNullPointer;
  return w.scales.check();
}

Status run(bool bwd, const void* a, DType dt, int64_t M, const NF4Weight& w,
           const LinearEpilogue& epi, void* out, float* ws, int64_t ws_floats, cudaStream_t stream,
           int force) {
  if (!dtype_valid(static_cast<int>(dt))) return Status::kBadDtype;
  if (M <= 0) return Status::kBadSize;
  if (a == nullptr || out == nullptr) return Status::kNullPointer;
  Status s = check_weight(w);
  if (s != Status::kOk) return s;
  s = epi.check(bwd);
  if (s != Status::kOk) return s;
  if (force < -1 || force > 2) return Status::kBadArgument;
  const bool aligned = aligned16(a) && aligned16(out) && aligned16(w.packed);
  LinearPlan p;
  s = linear_plan_current(M, w.N, w.K, bwd, dt, aligned, &p, force);
  if (s != Status::kOk) return s;
  if (!p.ok) return Status::kUnsupported;
  // p.ws_floats is linear_workspace_floats(...) of this launch: what Python allocated `ws` from
  if (p.ws_floats > 0 && (ws == nullptr || ws_floats < p.ws_floats)) return Status::kBadSize;
  if (!bwd && epi.has_lora(false)) {  // the shrink first: the expand in the epilogue reads U
    s = launch_lora_u(a, dt, M, w.K, epi, stream);
    if (s != Status::kOk) return s;
  }
  switch (p.path) {
    case LinearPath::kGemv: s = launch_gemv(p, a, dt, M, w, epi, out, ws, stream); break;
    case LinearPath::kGemm: s = launch_gemm(p, bwd, a, dt, M, w, epi, out, ws, stream); break;
    default: return launch_simt(bwd, a, dt, M, w, epi, out, stream);
  }
  if (s != Status::kOk || p.splits <= 1) return s;
  return launch_finalize(p.splits, ws, bwd, dt, M, bwd ? w.K : w.N, epi, out, stream);
}
}  // namespace

Status device_info(int* sm_count, int* cc) {
  static int cache[64][2] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return Status::kCudaError;
  if (dev >= 0 && dev < 64 && cache[dev][0] > 0) {
    *sm_count = cache[dev][0];
    *cc = cache[dev][1];
    return Status::kOk;
  }
  int sms = 0, major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return Status::kCudaError;
  *sm_count = sms;
  *cc = 10 * major + minor;
  if (dev >= 0 && dev < 64) {
    cache[dev][0] = sms;
    cache[dev][1] = *cc;
  }
  return Status::kOk;
}

Status linear_plan_current(int64_t M, int64_t N, int64_t K, bool bwd, DType dt, bool aligned,
                           LinearPlan* plan, int force) {
  int sms = 0, cc = 0;
  const Status s = device_info(&sms, &cc);
  if (s != Status::kOk) return s;
  *plan = plan_linear(M, N, K, bwd, dt, aligned, sms, cc, force);
  return Status::kOk;
}

Status qlora_forward(const void* x, DType dt, int64_t M, const NF4Weight& w,
                     const LinearEpilogue& epi, void* y, float* ws, int64_t ws_floats,
                     cudaStream_t stream, int force_path) {
  return run(false, x, dt, M, w, epi, y, ws, ws_floats, stream, force_path);
}

Status qlora_backward_dx(const void* dy, DType dt, int64_t M, const NF4Weight& w,
                         const LinearEpilogue& epi, void* dx, float* ws, int64_t ws_floats,
                         cudaStream_t stream, int force_path) {
  if (epi.bias != nullptr) return Status::kBadArgument;  // no bias in dx
  return run(true, dy, dt, M, w, epi, dx, ws, ws_floats, stream, force_path);
}

}  // namespace cuda
}  // namespace nf4lora
