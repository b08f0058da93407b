// CPU multi-adapter LoRA term (S-LoRA / punica style; DESIGN.md "Many adapters in one batch"):
// y[m] += s_e (x[m] A_e^T) B_e^T for the rows whose adapter idx[m] = e >= 0, added to a y that
// already holds the base x W^T + b (the fused linear's base path computes it once for all rows).
// Same ABI and results (to fp32 rounding) as csrc/ref/multi_lora_ref.h.
//
// The rows are grouped by adapter (stable sort of the row ids; rows need not arrive sorted):
//   SGMV  an adapter with >= sgmv_min_rows rows in the batch: one group; its A_e is read once per
//         tile of kSgmvTileRows rows (shrink) and each 16 (AVX-512) / 8 (AVX2) rows of B_e are
//         transposed once and applied to every row of the group by broadcast FMAs (expand).
//   BGMV  the other rows, one by one: shrink and expand as dot products (x[m] against A_e's rows,
//         u against B_e's rows), 16 / 8 of them reduced together by a transpose-add network.
// Both paths share the shrink micro-kernel; the expand differs (above). u = x A^T lives in fp32
// scratch; y is read, added to in fp32 and rounded once more to its dtype.
#pragma once
#include <vector>

#include "ref/multi_lora_ref.h"

namespace nf4lora {

// An adapter with at least this many rows in a batch takes the SGMV path. Per 16 output columns the
// SGMV expand pays one B^T block (r gathers) and then r FMAs per row; BGMV pays r loads + r FMAs +
// a ~45-instruction reduction per row. Measured (4096 x 4096, r = 16, 64 rows, AVX-512, 2 cores,
// best of 15): 1 row per adapter BGMV 1.6-1.9 ms vs SGMV 1.9-2.5 ms; 2 rows per adapter BGMV
// 0.9-1.1 ms vs SGMV 0.7-1.0 ms; SGMV's lead grows with the run length.
constexpr int64_t kSgmvMinRows = 2;
constexpr int64_t kSgmvTileRows = 16;  // rows per shrink task of an SGMV group

struct MultiLoraGroup {
  int64_t adapter = 0;
  int64_t begin = 0, end = 0;  // into MultiLoraPlan::rows
  bool sgmv = false;
};

struct MultiLoraPlan {
  std::vector<int64_t> rows;  // row ids with idx >= 0, grouped by adapter (stable)
  std::vector<MultiLoraGroup> groups;
  int64_t sgmv_groups = 0, sgmv_rows = 0, bgmv_rows = 0;
};

// The grouping multi_lora_add_cpu runs (idx already checked to lie in [-1, E)).
MultiLoraPlan plan_multi_lora(const int64_t* idx, int64_t M, int64_t sgmv_min_rows);

// y [M, N] (dtype; holds the base) += the LoRA term of each row's adapter. sgmv_min_rows <= 0
// means kSgmvMinRows; 1 sends every adapter to SGMV, > M every row to BGMV.
Status multi_lora_add_cpu(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                          const MultiLoraArgs& a, void* y, int64_t sgmv_min_rows);

// The ISA the kernels above run: "avx512", "avx2" or "ref" (scalar reference).
const char* multi_lora_isa();

// ---- ISA kernels (csrc/cpu/multi_lora_avx512.cpp, multi_lora_avx2.cpp); x, u fp32, the
// adapter's A [r, K] / B [N, r] in pdt (fp32, fp16 or bf16, converted on load) ----
// shrink:     u[rows[i]][0:r] += xf[rows[i]] . A[j] (j < r), i < nrows
// expand_row: y[yrow, n0:n1] += s * (B[n] . u)  for one row u [r] (BGMV)
// expand_rows: y[rows[i], n0:n1] += s * u[rows[i]] B[n0:n1]^T, i < nrows (SGMV); bt: r * 16 floats
struct MultiLoraKernels {
  void (*shrink)(const float* xf, int64_t K, const int64_t* rows, int64_t nrows, const void* A,
                 DType pdt, int64_t r, float* u);
  void (*expand_row)(const float* u, const void* B, DType pdt, int64_t r, int64_t n0, int64_t n1,
                     float s, void* y, DType dt, int64_t yrow, int64_t N);
  void (*expand_rows)(const float* u, int64_t r, const int64_t* rows, int64_t nrows,
                      const void* B, DType pdt, int64_t n0, int64_t n1, float s, void* y, DType dt,
                      int64_t N, float* bt);
};
extern const MultiLoraKernels kMultiLoraAvx512;
extern const MultiLoraKernels kMultiLoraAvx2;

}  // namespace nf4lora
