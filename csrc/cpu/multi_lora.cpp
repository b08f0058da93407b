// CPU multi-adapter LoRA term: argument checks, the grouping of rows by adapter (SGMV / BGMV),
// the fp32 staging of x and u, and the OpenMP task lists; the ISA kernels do the arithmetic
// (multi_lora_avx512.cpp, multi_lora_avx2.cpp).
#include "cpu/multi_lora.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/kept_scratch.h"

namespace nf4lora {

namespace {

constexpr int64_t kExpandCols = 512;  // output columns per expand task

const MultiLoraKernels* kernels() {
  if (use_avx512()) return &kMultiLoraAvx512;
  if (use_avx2()) return &kMultiLoraAvx2;
  return nullptr;
}

// Per calling thread, kept between calls (kept_scratch.h): x in fp32 and u = x A^T.
thread_local KeptBuf t_xf, t_u;

// Element `offset` of a pool stored in dtype d
const void* pool_at(const void* pool, DType d, int64_t offset) {
  return static_cast<const char*>(pool) + offset * dtype_size(d);
}

struct Task {
  int64_t group;
  int64_t a, b;  // shrink: rows [a, b) of plan.rows; expand: columns [a, b)
};

}  // namespace

const char* multi_lora_isa() {
  if (use_avx512()) return "avx512";
  if (use_avx2()) return "avx2";
  return "ref";
}

MultiLoraPlan plan_multi_lora(const int64_t* idx, int64_t M, int64_t sgmv_min_rows) {
  if (sgmv_min_rows <= 0) sgmv_min_rows = kSgmvMinRows;
  MultiLoraPlan p;
  for (int64_t m = 0; m < M; ++m)
    if (idx[m] >= 0) p.rows.push_back(m);
  std::stable_sort(p.rows.begin(), p.rows.end(), [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  const int64_t n = static_cast<int64_t>(p.rows.size());
  for (int64_t i = 0; i < n;) {
    int64_t j = i;
    while (j < n && idx[p.rows[j]] == idx[p.rows[i]]) ++j;
    const int64_t e = idx[p.rows[i]];
    if (j - i >= sgmv_min_rows) {
      p.groups.push_back({e, i, j, true});
      ++p.sgmv_groups;
      p.sgmv_rows += j - i;
    } else {
      for (int64_t t = i; t < j; ++t) p.groups.push_back({e, t, t + 1, false});
      p.bgmv_rows += j - i;
    }
    i = j;
  }
  return p;
}

Status multi_lora_add_cpu(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                          const MultiLoraArgs& a, void* y, int64_t sgmv_min_rows) {
  if (Status s = check_multi_lora(a, M, K, N, x, y); s != Status::kOk) return s;
  if (M == 0) return Status::kOk;
  const MultiLoraKernels* kern = kernels();
  if (kern == nullptr) return multi_lora_add_ref(x, dtype, M, K, N, a, y);
  const MultiLoraPlan plan = plan_multi_lora(a.idx, M, sgmv_min_rows);
  if (plan.rows.empty()) return Status::kOk;
  const int64_t r = a.r;

  // x in fp32 (fp32 x is read in place); u [M, r] zeroed on the rows that take an adapter
  KeptScratch<float> xf_buf(t_xf, dtype == DType::kF32 ? 1 : M * K);
  KeptScratch<float> u_buf(t_u, M * r);
  if (!xf_buf.ok() || !u_buf.ok()) return Status::kOutOfMemory;
  const float* xf = static_cast<const float*>(x);
  float* u = u_buf.get();
  const int64_t nrows = static_cast<int64_t>(plan.rows.size());
  const bool parallel = nrows * K * r >= (int64_t{1} << 18);
  if (dtype != DType::kF32) {
    float* dst = xf_buf.get();
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t m = plan.rows[i];
      for (int64_t k = 0; k < K; ++k) dst[m * K + k] = load_as_f32(x, dtype, m * K + k);
    }
    xf = dst;
  }
  for (int64_t m : plan.rows) std::memset(u + m * r, 0, static_cast<size_t>(r) * sizeof(float));

  // shrink: u = x A^T, one task per BGMV row or per tile of an SGMV group's rows
  std::vector<Task> tasks;
  for (int64_t g = 0; g < static_cast<int64_t>(plan.groups.size()); ++g) {
    const MultiLoraGroup& gr = plan.groups[g];
    for (int64_t t = gr.begin; t < gr.end; t += kSgmvTileRows)
      tasks.push_back({g, t, std::min(gr.end, t + kSgmvTileRows)});
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t i = 0; i < ntasks; ++i) {
    const Task& t = tasks[i];
    const int64_t e = plan.groups[t.group].adapter;
    kern->shrink(xf, K, plan.rows.data() + t.a, t.b - t.a, pool_at(a.A_pool, a.pool_dtype, e * r * K),
                 a.pool_dtype, r, u);
  }

  // expand: y += s u B^T, one task per (group, column chunk)
  tasks.clear();
  for (int64_t g = 0; g < static_cast<int64_t>(plan.groups.size()); ++g)
    for (int64_t n0 = 0; n0 < N; n0 += kExpandCols) tasks.push_back({g, n0, std::min(N, n0 + kExpandCols)});
  const int64_t nexp = static_cast<int64_t>(tasks.size());
#pragma omp parallel if (nrows * N * r >= (int64_t{1} << 18))
  {
    std::vector<float> bt(static_cast<size_t>(r) * 16);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nexp; ++i) {
      const Task& t = tasks[i];
      const MultiLoraGroup& gr = plan.groups[t.group];
      const int64_t e = gr.adapter;
      const void* B = pool_at(a.B_pool, a.pool_dtype, e * N * r);
      const float s = a.scalings[e];
      if (gr.sgmv)
        kern->expand_rows(u, r, plan.rows.data() + gr.begin, gr.end - gr.begin, B, a.pool_dtype,
                          t.a, t.b, s, y, dtype, N, bt.data());
      else
        kern->expand_row(u + plan.rows[gr.begin] * r, B, a.pool_dtype, r, t.a, t.b, s, y, dtype,
                         plan.rows[gr.begin], N);
    }
  }
  return Status::kOk;
}

}  // namespace nf4lora
