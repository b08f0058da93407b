// CUDA fused AdamW update (PagedAdamW). Same math, buffers and bit-identical results as
// csrc/ref/optim_ref.h (the per-element functions are shared). Two ways to run:
//   resident: param, grad and state are device memory; one launch on `stream`.
//   paged:    param and grad on the device, state in (pinned) host memory. The state streams
//             through kPagedSlots device staging slots, page by page (page_elems elements):
//             copy-in on `copy_in`, update on `compute`, copy-out on `copy_out`, ordered by events,
//             so page i+1 copies in while page i updates and page i-1 copies out. Device memory
//             for state: kPagedSlots * paged_slot_bytes(bits, page_elems), allocated by the caller.
// Launchers check their arguments and every CUDA call; they return a Status, never throw.
#pragma once
#include <cuda_runtime.h>

#include "ref/optim_ref.h"

namespace nf4lora {
namespace cuda {

// Three slots: the page copying in (i+1), updating (i) and copying out (i-1) are all different.
// (With two, page i+1 would overwrite the slot page i-1 is still being copied out of.)
constexpr int kPagedSlots = 3;

// Bytes of one staging slot: m and v pages, plus their absmax at 8 bits. Offsets inside a slot:
// m at 0, v at page*esize, absmax_m at 2*page*esize, absmax_v after it (page_elems is a multiple
// of 256, so every piece is at least 8-byte aligned).
// Slots start 256-byte aligned (the size is rounded up).
inline int64_t paged_slot_bytes(int bits, int64_t page_elems) {
  const int64_t esize = bits == 8 ? 1 : 4;
  const int64_t absmax = bits == 8 ? 2 * (page_elems / kOptimBlock) * 4 : 0;
  return (2 * page_elems * esize + absmax + 255) / 256 * 256;
}

// Page i of the paged pipeline: which slot it uses, which elements, and where its pieces sit in
// the slot (byte offsets). Host+device code, unit-tested on the CPU through the bindings.
struct PagedPage {
  int slot;                 // i % kPagedSlots
  int64_t off, len;         // elements [off, off + len) of the parameter
  int64_t block_off, nblocks;  // absmax entries [block_off, block_off + nblocks) (8-bit)
  int64_t m_at, v_at, am_at, av_at;  // byte offsets of m, v, absmax_m, absmax_v in the slot
  int64_t m_bytes;          // bytes of the m (and of the v) page: len * element size
};

NF4LORA_HD PagedPage paged_page(int bits, int64_t n, int64_t page_elems, int64_t i) {
  const int64_t esize = bits == 8 ? 1 : 4;
  PagedPage pg;
  pg.slot = static_cast<int>(i % kPagedSlots);
  pg.off = i * page_elems;
  pg.len = pg.off + page_elems < n ? page_elems : n - pg.off;
  pg.block_off = pg.off / kOptimBlock;
  pg.nblocks = (pg.len + kOptimBlock - 1) / kOptimBlock;
  pg.m_at = 0;
  pg.v_at = page_elems * esize;
  pg.am_at = 2 * page_elems * esize;
  pg.av_at = pg.am_at + (page_elems / kOptimBlock) * 4;
  pg.m_bytes = pg.len * esize;
  return pg;
}

// code_m, code_v: device float32 [256] (signed / unsigned dynamic code).
Status adamw32(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
               const AdamWScalars& s, cudaStream_t stream);
Status adamw8(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv, float* absmax_m,
              float* absmax_v, const float* code_m, const float* code_v, int64_t n,
              const AdamWScalars& s, cudaStream_t stream);

// bits 32: m_host, v_host float32 [n]; bits 8: uint8 [n] + absmax_*_host float32 [ceil(n/256)].
// staging: device memory of at least kPagedSlots * paged_slot_bytes(bits, page_elems) bytes.
Status adamw_paged(void* param, const void* grad, DType dtype, int bits, void* m_host,
                   void* v_host, float* absmax_m_host, float* absmax_v_host, const float* code_m,
                   const float* code_v, int64_t n, const AdamWScalars& s, int64_t page_elems,
                   void* staging, int64_t staging_bytes, cudaStream_t compute,
                   cudaStream_t copy_in, cudaStream_t copy_out);

}  // namespace cuda
}  // namespace nf4lora
