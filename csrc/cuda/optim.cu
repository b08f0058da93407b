// CUDA fused AdamW update (PagedAdamW): resident kernels and the paged streaming launcher.
//   adamw32_kernel: grid-stride, one element per thread per iteration (memory bound: 28 B/elem).
//   adamw8_kernel:  one warp per 256-block (8 warps per CTA, 8 elements per lane, coalesced);
//                   codes staged in shared memory; warp max-reduce for the new absmax; requantize
//                   with code8_encode (binary search in shared memory).
//   adamw_paged:    the state pages stream host -> device slot -> host around the update kernel on
//                   three streams; see optim.h for the slot ring and the event protocol below.
// The per-element math (adamw_elem, state8_decode/encode, code8_encode, the dtype conversions) is
// the host+device code of csrc/ref/optim_ref.h and nf4lora/*.h, with explicit _rn arithmetic, so
// results are bit-identical to the scalar reference. Index arithmetic is 64-bit throughout.
#include "cuda/launch.h"
#include "cuda/optim.h"
#include "nf4lora/layout.h"

namespace nf4lora {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;
static_assert(kThreads == kOptimBlock, "adamw8_kernel stages one code entry per thread");
static_assert(kOptimBlock == 8 * 32, "adamw8_kernel: 8 elements per lane cover one block");
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // adamw32 is grid-stride beyond this

#define NF4LORA_CUDA_CHECK(call)                         \
  do {                                                   \
    if ((call) != cudaSuccess) return Status::kCudaError; \
  } while (0)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void adamw32_kernel(void* __restrict__ param, const void* __restrict__ grad, DType dtype,
                               float* __restrict__ m, float* __restrict__ v, int64_t n,
                               AdamWScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float mm = m[i], vv = v[i];
    const float p = adamw_elem(load_as_f32(param, dtype, i), load_as_f32(grad, dtype, i), &mm, &vv, s);
    store_from_f32(param, dtype, i, p);
    m[i] = mm;
    v[i] = vv;
  }
}

// qm, qv [n] uint8; absmax_m, absmax_v [nblocks] float32; code_m, code_v [256] float32.
__global__ void adamw8_kernel(void* __restrict__ param, const void* __restrict__ grad, DType dtype,
                              uint8_t* __restrict__ qm, uint8_t* __restrict__ qv,
                              float* __restrict__ absmax_m, float* __restrict__ absmax_v,
                              const float* __restrict__ code_m, const float* __restrict__ code_v,
                              int64_t n, int64_t nblocks, AdamWScalars s) {
  __shared__ float cm[kOptimBlock], cv[kOptimBlock];
  cm[threadIdx.x] = code_m[threadIdx.x];
  cv[threadIdx.x] = code_v[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (b >= nblocks) return;  // whole warp leaves together
  const int64_t base = b * kOptimBlock;
  const float sm = absmax_m[b], sv = absmax_v[b];
  float mr[8], vr[8];
  float am = 0.0f, av = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t i = base + j * 32 + lane;
    mr[j] = 0.0f;
    vr[j] = 0.0f;
    if (i < n) {
      float mm = state8_decode(cm, qm[i], sm), vv = state8_decode(cv, qv[i], sv);
      const float p = adamw_elem(load_as_f32(param, dtype, i), load_as_f32(grad, dtype, i), &mm, &vv, s);
      store_from_f32(param, dtype, i, p);
      mr[j] = mm;
      vr[j] = vv;
      am = fmaxf(am, fabsf(mm));
      av = fmaxf(av, fabsf(vv));
    }
  }
  am = warp_max(am);
  av = warp_max(av);
  if (lane == 0) {
    absmax_m[b] = am;
    absmax_v[b] = av;
  }
  const float inv_m = nf4_inv_scale(am), inv_v = nf4_inv_scale(av);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t i = base + j * 32 + lane;
    if (i < n) {
      qm[i] = state8_encode(cm, mr[j], inv_m);
      qv[i] = state8_encode(cv, vr[j], inv_v);
    }
  }
}

Status launch32(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
                const AdamWScalars& s, cudaStream_t stream) {
  int64_t grid = ceil_div(n, kThreads);
  grid = grid < kMaxGrid ? grid : kMaxGrid;
  adamw32_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(param, grad, dtype, m, v, n, s);
  return last_launch_status();
}

Status launch8(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv, float* am,
               float* av, const float* code_m, const float* code_v, int64_t n,
               const AdamWScalars& s, cudaStream_t stream) {
  const int64_t nb = ceil_div(n, int64_t{kOptimBlock});
  const int64_t grid = ceil_div(nb, kWarpsPerCta);
  if (grid > 0x7fffffff) return Status::kBadSize;
  adamw8_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(param, grad, dtype, qm, qv,
                                                                      am, av, code_m, code_v, n, nb, s);
  return last_launch_status();
}

bool dtype_ok(DType d) { return dtype_valid(static_cast<int>(d)); }

// Events of the paged pipeline, destroyed on every exit path (destroying an event whose
// recorded work is still pending is allowed: its resources are released when it completes).
struct PagedEvents {
  cudaEvent_t start_compute = nullptr, start_out = nullptr;
  cudaEvent_t in_done[kPagedSlots] = {}, compute_done[kPagedSlots] = {}, out_done[kPagedSlots] = {};
  cudaError_t create() {
    cudaEvent_t* all[2 + 3 * kPagedSlots] = {&start_compute, &start_out};
    for (int k = 0; k < kPagedSlots; ++k) {
      all[2 + 3 * k] = &in_done[k];
      all[3 + 3 * k] = &compute_done[k];
      all[4 + 3 * k] = &out_done[k];
    }
    for (cudaEvent_t* e : all) {
      const cudaError_t err = cudaEventCreateWithFlags(e, cudaEventDisableTiming);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  ~PagedEvents() {
    for (cudaEvent_t e : {start_compute, start_out})
      if (e) cudaEventDestroy(e);
    for (int k = 0; k < kPagedSlots; ++k)
      for (cudaEvent_t e : {in_done[k], compute_done[k], out_done[k]})
        if (e) cudaEventDestroy(e);
  }
};

}  // namespace

Status adamw32(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
               const AdamWScalars& s, cudaStream_t stream) {
  if (n <= 0) return Status::kBadSize;
  if (!param || !grad || !m || !v) return Status::kNullPointer;
  if (!dtype_ok(dtype)) return Status::kBadDtype;
  if (s.check() != Status::kOk) return s.check();
  return launch32(param, grad, dtype, m, v, n, s, stream);
}

Status adamw8(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv, float* absmax_m,
              float* absmax_v, const float* code_m, const float* code_v, int64_t n,
              const AdamWScalars& s, cudaStream_t stream) {
  if (n <= 0) return Status::kBadSize;
  if (!param || !grad || !qm || !qv || !absmax_m || !absmax_v || !code_m || !code_v)
    return Status::kNullPointer;
  if (!dtype_ok(dtype)) return Status::kBadDtype;
  if (s.check() != Status::kOk) return s.check();
  return launch8(param, grad, dtype, qm, qv, absmax_m, absmax_v, code_m, code_v, n, s, stream);
}

// The event protocol, for page i in slot k = i % 3 (all enqueued up front; the host never waits):
//   copy_in:  [wait out_done[k]: page i-3 has left slot k]  H2D page i -> slot k   record in_done[k]
//   compute:  wait in_done[k]   update(slot k, param/grad page i)                record compute_done[k]
//   copy_out: wait compute_done[k]   D2H slot k -> page i                        record out_done[k]
// Before page 0, copy_in waits for (a) the compute stream's prior work (the staging memory comes
// from the caching allocator, stream-ordered on `compute`) and (b) the copy_out stream's prior work
// (last step's write-back of these host pages). The caller keeps the staging memory alive for the
// side streams (torch: record_stream) and synchronizes before reading the host state.
Status adamw_paged(void* param, const void* grad, DType dtype, int bits, void* m_host,
                   void* v_host, float* absmax_m_host, float* absmax_v_host, const float* code_m,
                   const float* code_v, int64_t n, const AdamWScalars& s, int64_t page_elems,
                   void* staging, int64_t staging_bytes, cudaStream_t compute,
                   cudaStream_t copy_in, cudaStream_t copy_out) {
  if (n <= 0 || page_elems <= 0 || page_elems % kOptimBlock != 0) return Status::kBadSize;
  if (bits != 8 && bits != 32) return Status::kBadArgument;
  if (!param || !grad || !m_host || !v_host || !staging) return Status::kNullPointer;
  if (bits == 8 && (!absmax_m_host || !absmax_v_host || !code_m || !code_v))
    return Status::kNullPointer;
  if (!dtype_ok(dtype)) return Status::kBadDtype;
  if (s.check() != Status::kOk) return s.check();
  const int64_t slot_bytes = paged_slot_bytes(bits, page_elems);
  if (staging_bytes < kPagedSlots * slot_bytes) return Status::kBadSize;

  const int64_t esize = bits == 8 ? 1 : 4;
  const int64_t psize = dtype_size(dtype);
  char* const stage = static_cast<char*>(staging);
  char* const mh = static_cast<char*>(m_host);
  char* const vh = static_cast<char*>(v_host);

  PagedEvents ev;
  NF4LORA_CUDA_CHECK(ev.create());
  NF4LORA_CUDA_CHECK(cudaEventRecord(ev.start_compute, compute));
  NF4LORA_CUDA_CHECK(cudaStreamWaitEvent(copy_in, ev.start_compute, 0));
  NF4LORA_CUDA_CHECK(cudaEventRecord(ev.start_out, copy_out));
  NF4LORA_CUDA_CHECK(cudaStreamWaitEvent(copy_in, ev.start_out, 0));

  const int64_t pages = ceil_div(n, page_elems);
  for (int64_t i = 0; i < pages; ++i) {
    const PagedPage pg = paged_page(bits, n, page_elems, i);
    const int k = pg.slot;
    char* const slot = stage + k * slot_bytes;
    char* const sm = slot + pg.m_at;
    char* const sv = slot + pg.v_at;
    float* const sam = reinterpret_cast<float*>(slot + pg.am_at);
    float* const sav = reinterpret_cast<float*>(slot + pg.av_at);
    char* const hm = mh + pg.off * esize;
    char* const hv = vh + pg.off * esize;

    // copy in (slot k is free once page i - kPagedSlots has been copied out of it)
    if (i >= kPagedSlots) NF4LORA_CUDA_CHECK(cudaStreamWaitEvent(copy_in, ev.out_done[k], 0));
    NF4LORA_CUDA_CHECK(cudaMemcpyAsync(sm, hm, pg.m_bytes, cudaMemcpyHostToDevice, copy_in));
    NF4LORA_CUDA_CHECK(cudaMemcpyAsync(sv, hv, pg.m_bytes, cudaMemcpyHostToDevice, copy_in));
    if (bits == 8) {
      NF4LORA_CUDA_CHECK(cudaMemcpyAsync(sam, absmax_m_host + pg.block_off, pg.nblocks * 4,
                                         cudaMemcpyHostToDevice, copy_in));
      NF4LORA_CUDA_CHECK(cudaMemcpyAsync(sav, absmax_v_host + pg.block_off, pg.nblocks * 4,
                                         cudaMemcpyHostToDevice, copy_in));
    }
    NF4LORA_CUDA_CHECK(cudaEventRecord(ev.in_done[k], copy_in));

    // update page i in place in the slot
    NF4LORA_CUDA_CHECK(cudaStreamWaitEvent(compute, ev.in_done[k], 0));
    void* const pp = static_cast<char*>(param) + pg.off * psize;
    const void* const gp = static_cast<const char*>(grad) + pg.off * psize;
    const Status st = bits == 8 ? launch8(pp, gp, dtype, reinterpret_cast<uint8_t*>(sm),
                                          reinterpret_cast<uint8_t*>(sv), sam, sav, code_m, code_v,
                                          pg.len, s, compute)
                                : launch32(pp, gp, dtype, reinterpret_cast<float*>(sm),
                                           reinterpret_cast<float*>(sv), pg.len, s, compute);
    if (st != Status::kOk) return st;
    NF4LORA_CUDA_CHECK(cudaEventRecord(ev.compute_done[k], compute));

    // copy out
    NF4LORA_CUDA_CHECK(cudaStreamWaitEvent(copy_out, ev.compute_done[k], 0));
    NF4LORA_CUDA_CHECK(cudaMemcpyAsync(hm, sm, pg.m_bytes, cudaMemcpyDeviceToHost, copy_out));
    NF4LORA_CUDA_CHECK(cudaMemcpyAsync(hv, sv, pg.m_bytes, cudaMemcpyDeviceToHost, copy_out));
    if (bits == 8) {
      NF4LORA_CUDA_CHECK(cudaMemcpyAsync(absmax_m_host + pg.block_off, sam, pg.nblocks * 4,
                                         cudaMemcpyDeviceToHost, copy_out));
      NF4LORA_CUDA_CHECK(cudaMemcpyAsync(absmax_v_host + pg.block_off, sav, pg.nblocks * 4,
                                         cudaMemcpyDeviceToHost, copy_out));
    }
    NF4LORA_CUDA_CHECK(cudaEventRecord(ev.out_done[k], copy_out));
  }
  return Status::kOk;
}

#undef NF4LORA_CUDA_CHECK

}  // namespace cuda
}  // namespace nf4lora
