// Dispatch for the CPU fused AdamW update: argument checks, the page walk (one OpenMP region over
// the 256-aligned chunks of every page; a chunk never straddles a page), AVX-512 (use_avx512()), AVX2
// or scalar per chunk, the scalar reference for tails and partial blocks.
// Also builds the fast 8-bit encoders' tables (Code8Lut, Code8Arith in optim.h).
#include "cpu/optim.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_features.h"
#include "nf4lora/dynamic_map.h"
#include "nf4lora/layout.h"

namespace nf4lora {

namespace {

// Elements per OpenMP chunk (a multiple of 256): large enough to amortise scheduling, small
// enough that a 1M-element page splits evenly over 2..64 cores.
constexpr int64_t kChunkElems = 1 << 14;
constexpr int64_t kChunkBlocks = kChunkElems / kOptimBlock;

void build_lut(const float* code, Code8Lut* t) {
  float mid[255];
  for (int j = 0; j < 255; ++j) mid[j] = (code[j + 1] + code[j]) * 0.5f;  // as code8_encode
  t->ok = true;
  for (uint32_t key = 0; key < 65536; ++key) {
    if (((key >> 7) & 0xffu) == 0xffu) {  // Inf/NaN keys: never produced from finite state
      t->entry[key] = 0;
      continue;
    }
    const float a = bits_f32(key << 16), b = bits_f32((key << 16) | 0xffffu);
    const bool neg = (key & 0x8000u) != 0;
    const float lo = neg ? b : a, hi = neg ? a : b;  // lowest and highest value with this key
    int c = 0;
    while (c < 255 && mid[c] < lo) ++c;
    uint32_t e = static_cast<uint32_t>(c) << 16;
    if (c < 255 && mid[c] <= hi) {
      const uint32_t mb = f32_bits(mid[c]);
      if ((mb >> 16) != key) t->ok = false;
      if (c + 1 < 255 && mid[c + 1] <= hi) t->ok = false;  // two midpoints: table cannot decide
      e |= (1u << 24) | (mb & 0xffffu);
    }
    t->entry[key] = e;
  }
}

// Code8Arith (see optim.h for the scheme and what is proved here). Leaves t->ok false when any
// check fails; the caller then keeps the other encoders.
void build_arith(const float* code, bool is_signed, Code8Arith* t) {
  using A = Code8Arith;
  t->ok = false;
  const int z = is_signed ? 127 : 0;  // index of the code 0.0: positives are z..255
  if (code[z] != 0.0f) return;
  float mid[255];
  for (int j = 0; j < 255; ++j) mid[j] = (code[j + 1] + code[j]) * 0.5f;  // as code8_encode
  const auto gap = [&](int j) { return static_cast<double>(code[j + 1]) - code[j]; };
  const auto same_gap = [&](int i, int j) { return std::fabs(gap(i) - gap(j)) <= 1e-3 * gap(i); };

  // Segments: maximal runs of evenly spaced codes; a code whose two gaps differ starts a single.
  int first[A::kSegments], last[A::kSegments], ns = 0;
  for (int j0 = z; j0 <= 255;) {
    int j1 = j0;
    if (j0 < 255 && (j0 + 1 > 254 || same_gap(j0, j0 + 1)))
      for (j1 = j0 + 1; j1 + 1 <= 255 && same_gap(j0, j1);) ++j1;
    if (ns == A::kSegments) return;
    first[ns] = j0;
    last[ns] = j1;
    ++ns;
    j0 = j1 + 1;
  }

  const double unit = std::ldexp(1.0, A::kFracBits);  // fixed point: ti = t * 2^kFracBits
  float max_err = 0.0f;
  for (int s = 0; s < A::kSegments; ++s) {
    const int j0 = first[std::min(s, ns - 1)], j1 = last[std::min(s, ns - 1)];
    double scale = 0.0, offset = -(j0 + 0.5);  // a single code: t = j0 + 0.5 for every x
    if (j1 > j0) {
      scale = (j1 - j0) / (static_cast<double>(code[j1]) - code[j0]);
      offset = code[j0] * scale - 0.5 - j0;
    }
    t->scale[s] = static_cast<float>(scale * unit);
    t->offset[s] = static_cast<float>(offset * unit);
    t->last[s] = j1;
    for (int j = j0; j < j1; ++j)  // the midpoint between codes j and j + 1 must give ~ (j + 1)
      max_err = std::max(max_err, std::fabs(std::fma(mid[j], t->scale[s], -t->offset[s]) -
                                            static_cast<float>((j + 1) * unit)));
  }
  const int near = static_cast<int>(std::ceil(max_err)) + 1;
  if (near > (1 << (A::kFracBits - 3))) return;
  // A segment's lowest value (0, or its lower threshold) must not give ti below first - near.
  for (int s = 0; s < ns; ++s) {
    const float lowest = s == 0 ? 0.0f : mid[first[s] - 1];
    if (std::fma(lowest, t->scale[s], -t->offset[s]) < static_cast<float>(first[s] * unit - near))
      return;
  }
  t->near = near;
  t->max_err = max_err;

  // Binades: key b holds |x| in [2^(b-31), 2^(b-30)) (b = 0: also everything smaller).
  for (int b = 0; b < A::kBinades; ++b) {
    const float lo = b == 0 ? 0.0f : std::ldexp(1.0f, b - 31), hi = std::ldexp(1.0f, b - 30);
    int seg = 0, inside = 0;
    t->thresh[b] = std::numeric_limits<float>::infinity();
    for (int s = 1; s < ns; ++s) {
      // x > th: segment s or above. x == mid is a tie between codes first[s] - 1 and first[s]
      // that goes to the even one; when that is first[s], compare against the float below.
      const float m = mid[first[s] - 1];
      const float th = first[s] % 2 == 0 ? std::nextafter(m, 0.0f) : m;
      if (th < lo) {
        seg = s;
      } else if (th < hi) {
        ++inside;
        t->thresh[b] = th;
      }
    }
    if (inside > 1) return;  // two thresholds in one binade: one compare cannot decide
    t->seg[b] = seg;
  }
  t->ok = true;
}

const float* code_table(bool is_signed) { return is_signed ? kDynamicSigned : kDynamicUnsigned; }

bool page_ok(int64_t page_elems) { return page_elems > 0 && page_elems % kOptimBlock == 0; }

// Chunk c of the page walk, in units of elements or of 256-blocks: pages of `page` units split
// into `per_page` chunks of `chunk` units, clipped to the page and to `limit`. [lo, hi) may be empty.
inline void chunk_range(int64_t c, int64_t per_page, int64_t page, int64_t chunk, int64_t limit,
                        int64_t* lo, int64_t* hi) {
  const int64_t page_end = (c / per_page + 1) * page;
  *lo = (c / per_page) * page + (c % per_page) * chunk;
  *hi = std::min(std::min(*lo + chunk, page_end), limit);
}

// Chunks chunk_range yields non-empty for `units` units: the full pages' per_page each, then the
// last page's (so a small tensor costs one work item per chunk it has, not per_page).
inline int64_t chunk_count(int64_t units, int64_t page, int64_t chunk, int64_t per_page) {
  if (units <= 0) return 0;
  const int64_t full_pages = (units - 1) / page;
  return full_pages * per_page + ceil_div(units - full_pages * page, chunk);
}

}  // namespace

const Code8Lut& code8_lut(bool is_signed) {
  static const Code8Lut* lut_signed = [] {
    auto* t = new Code8Lut;
    build_lut(kDynamicSigned, t);
    return t;
  }();
  static const Code8Lut* lut_unsigned = [] {
    auto* t = new Code8Lut;
    build_lut(kDynamicUnsigned, t);
    return t;
  }();
  return is_signed ? *lut_signed : *lut_unsigned;
}

const Code8Arith& code8_arith(bool is_signed) {
  static const Code8Arith* arith_signed = [] {
    auto* t = new Code8Arith;
    build_arith(kDynamicSigned, true, t);
    return t;
  }();
  static const Code8Arith* arith_unsigned = [] {
    auto* t = new Code8Arith;
    build_arith(kDynamicUnsigned, false, t);
    return t;
  }();
  return is_signed ? *arith_signed : *arith_unsigned;
}

uint8_t code8_encode_scalar(bool is_signed, float x) { return code8_encode(code_table(is_signed), x); }

namespace {

// The work list of a multi-tensor call: tensor i contributes items[i] work items (its pages' chunks,
// plus for 8-bit a last item for a partial block); start[i] = items of tensors before i.
struct WorkList {
  std::vector<int64_t> start;
  int64_t total = 0;
  template <class ItemsOf>
  WorkList(int64_t count, ItemsOf items_of) : start(static_cast<size_t>(count) + 1, 0) {
    for (int64_t i = 0; i < count; ++i) start[i + 1] = start[i] + items_of(i);
    total = start[count];
  }
  // (tensor, item within it) of global item c
  void locate(int64_t c, int64_t* tensor, int64_t* item) const {
    *tensor = std::upper_bound(start.begin(), start.end(), c) - start.begin() - 1;
    *item = c - start[*tensor];
  }
};

}  // namespace

Status adamw32_cpu_multi(const AdamW32Tensor* ts, int64_t count, DType dtype, const AdamWScalars& s,
                         int64_t page_elems) {
  if (count < 0 || !page_ok(page_elems)) return Status::kBadSize;
  if (count > 0 && !ts) return Status::kNullPointer;
  for (int64_t i = 0; i < count; ++i) {
    if (ts[i].n <= 0) return Status::kBadSize;
    if (!ts[i].param || !ts[i].grad || !ts[i].m || !ts[i].v) return Status::kNullPointer;
  }
  if (s.check() != Status::kOk) return s.check();
  const bool fast = use_avx2();
  const bool wide = use_avx512();
  // One parallel region over every (tensor, page, chunk): chunks never straddle a page, and a
  // single region (no barrier per page or tensor) keeps two cores busy even on a loaded machine.
  const int64_t per_page = ceil_div(page_elems, kChunkElems);
  const WorkList work(count, [&](int64_t i) { return chunk_count(ts[i].n, page_elems, kChunkElems, per_page); });
#pragma omp parallel for schedule(dynamic, 1) if (work.total > 1)
  for (int64_t c = 0; c < work.total; ++c) {
    int64_t t, item, i0, i1;
    work.locate(c, &t, &item);
    const AdamW32Tensor& x = ts[t];
    chunk_range(item, per_page, page_elems, kChunkElems, x.n, &i0, &i1);
    if (i0 >= i1) continue;
    int64_t i8 = i0;
    if (wide) {
      i8 = i0 + (i1 - i0) / 16 * 16;
      adamw32_elems_avx512(x.param, x.grad, dtype, x.m, x.v, i0, i8, s);
    } else if (fast) {
      i8 = i0 + (i1 - i0) / 8 * 8;
      adamw32_elems_avx2(x.param, x.grad, dtype, x.m, x.v, i0, i8, s);
    }
    adamw32_elems_ref(x.param, x.grad, dtype, x.m, x.v, i8, i1, s);
  }
  return Status::kOk;
}

Status adamw32_cpu(void* param, const void* grad, DType dtype, float* m, float* v, int64_t n,
                   const AdamWScalars& s, int64_t page_elems) {
  const AdamW32Tensor t{param, grad, m, v, n};
  return adamw32_cpu_multi(&t, 1, dtype, s, page_elems);
}

Status adamw8_cpu_multi(const AdamW8Tensor* ts, int64_t count, DType dtype, const AdamWScalars& s,
                        int64_t page_elems) {
  if (count < 0 || !page_ok(page_elems)) return Status::kBadSize;
  if (count > 0 && !ts) return Status::kNullPointer;
  for (int64_t i = 0; i < count; ++i) {
    const AdamW8Tensor& x = ts[i];
    if (x.n <= 0) return Status::kBadSize;
    if (!x.param || !x.grad || !x.qm || !x.qv || !x.absmax_m || !x.absmax_v)
      return Status::kNullPointer;
  }
  if (s.check() != Status::kOk) return s.check();
  // AVX-512 + VBMI with the arithmetic encoder, else AVX2 with the key tables (built on first use
  // only: 2 x 256 KB), else the scalar reference.
  const bool wide = use_avx512vbmi() && code8_arith(true).ok && code8_arith(false).ok;
  const Code8Lut* lut_m = wide || !use_avx2() ? nullptr : &code8_lut(true);
  const Code8Lut* lut_v = wide || !use_avx2() ? nullptr : &code8_lut(false);
  const bool fast = lut_m && lut_v && lut_m->ok && lut_v->ok;
  // Items of tensor i: the chunks of its full blocks, page by page, then one item for a partial
  // last block (the scalar reference does it).
  const int64_t page_blocks = page_elems / kOptimBlock;
  const int64_t per_page = ceil_div(page_blocks, kChunkBlocks);
  const auto full_items = [&](int64_t i) {
    return chunk_count(ts[i].n / kOptimBlock, page_blocks, kChunkBlocks, per_page);
  };
  const WorkList work(count, [&](int64_t i) { return full_items(i) + (ts[i].n % kOptimBlock != 0); });
#pragma omp parallel for schedule(dynamic, 1) if (work.total > 1)
  for (int64_t c = 0; c < work.total; ++c) {
    int64_t t, item, b0, b1;
    work.locate(c, &t, &item);
    const AdamW8Tensor& x = ts[t];
    const int64_t full = x.n / kOptimBlock;
    if (item == full_items(t)) {  // the partial last block
      adamw8_blocks_ref(x.param, x.grad, dtype, x.qm, x.qv, x.absmax_m, x.absmax_v, x.n, full,
                        full + 1, s);
      continue;
    }
    chunk_range(item, per_page, page_blocks, kChunkBlocks, full, &b0, &b1);
    if (b0 >= b1) continue;
    if (wide)
      adamw8_blocks_avx512vbmi(x.param, x.grad, dtype, x.qm, x.qv, x.absmax_m, x.absmax_v, b0, b1, s);
    else if (fast)
      adamw8_blocks_avx2(x.param, x.grad, dtype, x.qm, x.qv, x.absmax_m, x.absmax_v, b0, b1, s,
                         lut_m->entry, lut_v->entry);
    else
      adamw8_blocks_ref(x.param, x.grad, dtype, x.qm, x.qv, x.absmax_m, x.absmax_v, x.n, b0, b1, s);
  }
  return Status::kOk;
}

Status adamw8_cpu(void* param, const void* grad, DType dtype, uint8_t* qm, uint8_t* qv,
                  float* absmax_m, float* absmax_v, int64_t n, const AdamWScalars& s,
                  int64_t page_elems) {
  const AdamW8Tensor t{param, grad, qm, qv, absmax_m, absmax_v, n};
  return adamw8_cpu_multi(&t, 1, dtype, s, page_elems);
}

Status code8_encode_cpu(const float* x, int64_t n, bool is_signed, uint8_t* out, bool fast) {
  if (n <= 0) return Status::kBadSize;
  if (!x || !out) return Status::kNullPointer;
  const Code8Lut& lut = code8_lut(is_signed);
  int64_t i = 0;
  if (fast) {
    if (use_avx512vbmi() && code8_arith(is_signed).ok) {
      i = n / 16 * 16;
      code8_encode_avx512vbmi(x, i, is_signed, out);
    } else if (!use_avx2() || !lut.ok) {
      return Status::kUnsupported;
    } else {
      i = n / 8 * 8;
      code8_encode_avx2(x, i, lut.entry, out);
    }
  }
  for (; i < n; ++i) out[i] = code8_encode(code_table(is_signed), x[i]);
  return Status::kOk;
}

}  // namespace nf4lora
