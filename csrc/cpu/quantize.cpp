// Dispatch for CPU NF4 quantize/dequantize: argument checks, OpenMP over block ranges, AVX2 or
// scalar per range, the scalar reference for the partial last block.
#include "cpu/quantize.h"

#include <omp.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "cpu/cpu_features.h"

namespace nf4lora {

namespace {
// Blocks per OpenMP chunk: large enough to amortise scheduling, small enough to balance 2..64 cores.
constexpr int64_t kChunkElems = 1 << 16;

// NOTE: a large output comes straight from mmap (torch's CPU allocator -> glibc), so the kernel is
// the first to touch it, and 4 KiB page faults (a zeroed page each) cost about as much as the
// dequantization itself. Ask for transparent huge pages on the 2 MiB-aligned interior first: a
// hint only (ignored where THP is off), it changes no data. Measured on the 2-core dev box:
// 4096x4096 bf16 dequantize 36 ms -> 20 ms.
void hint_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < int64_t{4} << 20) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}
}

Status nf4_quantize_cpu(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                        float* absmax) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!w || !packed || !absmax) return Status::kNullPointer;
  const int64_t full = n / blocksize;  // full blocks
  const int64_t chunk = kChunkElems / blocksize > 0 ? kChunkElems / blocksize : 1;
  const bool fast = use_avx2();
  bool nonfinite = false;
  hint_huge_pages(packed, packed_bytes(n));
  const int64_t nchunks = ceil_div(full, chunk);
  // NOTE: no parallel region for a single chunk: waking the team costs more than small tensors take,
  // and far more when the cores are shared.
#pragma omp parallel for schedule(dynamic, 1) reduction(|| : nonfinite) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b0 = c * chunk, b1 = b0 + chunk < full ? b0 + chunk : full;
    bool bad = false;
    if (fast)
      nf4_quantize_blocks_avx2(w, dtype, blocksize, b0, b1, packed, absmax, &bad);
    else
      nf4_quantize_blocks_ref(w, dtype, n, blocksize, b0, b1, packed, absmax, &bad);
    nonfinite = nonfinite || bad;
  }
  if (full * blocksize < n)
    nf4_quantize_blocks_ref(w, dtype, n, blocksize, full, full + 1, packed, absmax, &nonfinite);
  return nonfinite ? Status::kNonFinite : Status::kOk;
}

Status nf4_dequantize_cpu(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                          int64_t blocksize, void* out, DType dtype) {
  if (!blocksize_valid(blocksize)) return Status::kBadBlocksize;
  if (n <= 0) return Status::kBadSize;
  if (!packed || !out) return Status::kNullPointer;
  if (scales.check() != Status::kOk) return scales.check();
  const int64_t full = n / blocksize;
  const int64_t chunk = kChunkElems / blocksize > 0 ? kChunkElems / blocksize : 1;
  const bool fast = use_avx2();
  hint_huge_pages(out, n * dtype_size(dtype));
  const int64_t nchunks = ceil_div(full, chunk);
#pragma omp parallel for schedule(dynamic, 1) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b0 = c * chunk, b1 = b0 + chunk < full ? b0 + chunk : full;
    if (fast) {
      nf4_dequantize_blocks_avx2(packed, scales, blocksize, b0, b1, out, dtype);
    } else {
      nf4_dequantize_elems_ref(packed, scales, blocksize, b0 * blocksize, b1 * blocksize, out, dtype);
    }
  }
  // partial last block
  nf4_dequantize_elems_ref(packed, scales, blocksize, full * blocksize, n, out, dtype);
  return Status::kOk;
}

// NOTE: per value the exact-nearest search is 8 dependent table loads; interleaving 8 searches by
// hand measured no faster here, so the groups run the reference code, split over the cores.
Status absmax_quantize_cpu(const float* absmax, int64_t nblocks, float offset, const float* code8,
                           uint8_t* qabsmax, float* absmax2) {
  if (nblocks <= 0) return Status::kBadSize;
  if (!absmax || !code8 || !qabsmax || !absmax2) return Status::kNullPointer;
  constexpr int64_t kGroupsPerChunk = 32;  // 8192 absmax values
  const int64_t groups = n_nested_blocks(nblocks);
  const int64_t nchunks = ceil_div(groups, kGroupsPerChunk);
  bool nonfinite = false;
#pragma omp parallel for schedule(dynamic, 1) reduction(|| : nonfinite) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t g0 = c * kGroupsPerChunk;
    const int64_t g1 = g0 + kGroupsPerChunk < groups ? g0 + kGroupsPerChunk : groups;
    bool bad = false;
    absmax_quantize_groups_ref(absmax, nblocks, offset, code8, g0, g1, qabsmax, absmax2, &bad);
    nonfinite = nonfinite || bad;
  }
  return nonfinite ? Status::kNonFinite : Status::kOk;
}

}  // namespace nf4lora
