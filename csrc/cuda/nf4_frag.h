// Per-thread pieces of the CUDA NF4 linear kernels (gemv_nf4.cu, gemm_nf4.cu, linear_simt.cu),
// written as __host__ __device__ functions so the CPU tests can run them lane by lane
// (csrc/bindings/cuda_linear.cpp exposes an emulation of one GEMM warp built from them).
//
// Contents, in the order the kernels use them:
//   1. NF4 lookup/decode: a 32-bit word of packed codes -> 8 float32 values (register table).
//   2. 16-bit packing (bf16x2 / f16x2), round to nearest even, identical on host and device.
//   3. mma.sync.m16n8k16 fragment coordinates (PTX ISA "Matrix Fragments for mma.m16n8k16",
//      .bf16/.f16 inputs, .f32 accumulators) and the reduction-index permutation the GEMM uses.
//   4. Shared-memory tile layouts of the GEMM (strides, swizzle-free padding) and the GEMV's
//      swizzled activation layout.
//   5. The epilogue math (bias, LoRA term, dropout mask) shared by every path.
// Nothing here touches torch or pybind11; nothing allocates.
#pragma once
#include <cstdint>
#include <cstring>

#include "nf4lora/dropout.h"
#include "nf4lora/dtype.h"
#include "nf4lora/epilogue.h"
#include "nf4lora/layout.h"
#include "nf4lora/nf4.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace nf4lora {
namespace cuda {

// ---------------------------------------------------------------------------------- 1. decode
// Device: each lane of a warp holds table value kNF4[lane & 15] in a register (nf4_table_reg) and a
// code is looked up with one warp shuffle, so no memory table sits in the hot loop.
// NOTE: every lane of the warp must call nf4_lookup together (full-mask shuffle): callers decode
// unconditionally and predicate only the accumulation.
// Host: the same function reads kNF4 (the tests run lanes one at a time).
NF4LORA_HD float nf4_table_reg(int lane) { return nf4_values()[lane & 15]; }

NF4LORA_HD float nf4_lookup(float table_reg, uint32_t code) {
#if defined(__CUDA_ARCH__)
  return __shfl_sync(0xffffffffu, table_reg, static_cast<int>(code & 15u));
#else
  (void)table_reg;
  return kNF4[code & 15u];
#endif
}

// A little-endian 32-bit word of packed bytes holds elements e..e+7 (e even): byte j = elements
// e+2j (high nibble) and e+2j+1 (low nibble). Code of element i (0..7) of the word:
NF4LORA_HD uint32_t word_code(uint32_t word, int i) {
  return (word >> (8 * (i >> 1) + ((i & 1) ? 0 : 4))) & 15u;
}

// The 8 code values (unscaled) of one word.
NF4LORA_HD void nf4_decode8(uint32_t word, float table_reg, float out[8]) {
  NF4LORA_UNROLL
  for (int i = 0; i < 8; ++i) out[i] = nf4_lookup(table_reg, word_code(word, i));
}

// Element (n, k) of W [N, K] in the flattened bitsandbytes layout: the generic (any K) accessor of
// the fallback path. Returns code * absmax(block) in float32 (dequantize_nf4's value).
NF4LORA_HD float nf4_element(const uint8_t* packed, const NF4Scales& sc, int64_t blocksize,
                             int64_t K, int64_t n, int64_t k) {
  const int64_t idx = n * K + k;
  const uint8_t byte = packed[idx >> 1];
  const uint8_t q = (idx & 1) ? nf4_lo(byte) : nf4_hi(byte);
#if defined(__CUDA_ARCH__)
  return __fmul_rn(nf4_decode(q), sc.block(idx / blocksize));
#else
  return nf4_decode(q) * sc.block(idx / blocksize);
#endif
}

// ----------------------------------------------------------------------------- 2. 16-bit pairs
// Two float32 -> one 32-bit register of two 16-bit values, `lo` in bits 0..15 (the lower-indexed
// element of an mma fragment register), round to nearest even.
template <DType D>
NF4LORA_HD uint32_t pack2(float lo, float hi);

template <>
NF4LORA_HD uint32_t pack2<DType::kBF16>(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return static_cast<uint32_t>(f32_to_bf16(lo)) | (static_cast<uint32_t>(f32_to_bf16(hi)) << 16);
#endif
}

template <>
NF4LORA_HD uint32_t pack2<DType::kF16>(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return static_cast<uint32_t>(f32_to_f16(lo)) | (static_cast<uint32_t>(f32_to_f16(hi)) << 16);
#endif
}

// Float value of one 16-bit activation (host side of the emulation and the SIMT path).
template <DType D>
NF4LORA_HD float half_to_f32(uint16_t h) {
  return D == DType::kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// ------------------------------------------------------------------- 3. mma.m16n8k16 fragments
// PTX ISA, mma.m16n8k16 with .bf16/.f16 A/B and .f32 C/D. groupID = lane >> 2, tig = lane & 3.
//   A (16x16, row-major), 4 regs x 2 halves: reg 0: (g, 2t+h)   reg 1: (g+8, 2t+h)
//                                            reg 2: (g, 2t+8+h) reg 3: (g+8, 2t+8+h)
//   B (16x8, "col"),      2 regs x 2 halves: reg 0: (k=2t+h, n=g)  reg 1: (k=2t+8+h, n=g)
//   C/D (16x8 f32),       4 regs:            reg 0: (g, 2t) reg 1: (g, 2t+1)
//                                            reg 2: (g+8, 2t) reg 3: (g+8, 2t+1)
struct RowCol {
  int row, col;
};
NF4LORA_HD RowCol mma_a_coord(int lane, int reg, int half) {
  const int g = lane >> 2, t = lane & 3;
  return {g + 8 * (reg & 1), 2 * t + 8 * (reg >> 1) + half};
}
NF4LORA_HD RowCol mma_b_coord(int lane, int reg, int half) {  // {k (row of B), n (col)}
  const int g = lane >> 2, t = lane & 3;
  return {2 * t + 8 * reg + half, g};
}
NF4LORA_HD RowCol mma_c_coord(int lane, int reg) {
  const int g = lane >> 2, t = lane & 3;
  return {g + 8 * (reg >> 1), 2 * t + (reg & 1)};
}

// The GEMM's reduction permutation. The sum over the 16 reduction indices of one mma step does not
// depend on their order, so the kernel feeds logical slot s the actual index kperm(s): thread t's
// slots {2t, 2t+1, 2t+8, 2t+9} become the 4 CONSECUTIVE indices 4t..4t+3. Then a thread's A values
// of one step are one 8-byte load, and its W values are 4 consecutive nibbles = 2 whole bytes (fwd)
// or 4 consecutive W rows (bwd). A and B use the same map, so the product is unchanged.
NF4LORA_HD int kperm(int slot) {
  const int t = (slot & 7) >> 1;
  return 4 * t + 2 * (slot >> 3) + (slot & 1);
}

// Backward output-column permutation inside a warp's 8*NF columns (NF = n-fragments per warp, 4
// or 8): fragment f, fragment column c (0..7) -> actual column NF*c + f. Then B fragment column g
// of every fragment is one NF-column group = NF/2 consecutive bytes of a W row (one 16- or 32-bit
// load), and a thread's accumulator columns of one row, 2t and 2t+1 of all NF fragments, are the
// 2*NF consecutive columns 2*NF*t ...
NF4LORA_HD int bwd_col(int frag, int c, int nf) { return nf * c + frag; }

// --------------------------------------------------------------------------- 4. tile layouts
// GEMM block tile: BM x BN outputs, BK = 64 reduction indices per stage, warp tile
// (16*MF) x (8*NF) (MF m-fragments x NF n-fragments), WARPS_M x WARPS_N warps.
constexpr int kGemmBK = 64;
constexpr int kChunk = 32;  // elements per scale lookup (a 32-aligned run lies in one block)
static_assert(kGemmBK % 16 == 0 && kGemmBK % kChunk == 0, "BK must hold whole mma steps and chunks");

// A tile (activations x or dy): [BM][BK] 16-bit, row stride 80 elements (160 B): the 4 rows x 4
// threads of a half-warp's 8-byte loads (row g.., elements 16s + 4t) hit 32 distinct banks, and
// rows stay 16-byte aligned for cp.async.
constexpr int kAStride = kGemmBK + 16;
// W tile, forward: [BN rows of W][BK/2 bytes], row stride 48 B (conflict-free 2-byte loads of
// 8 rows x 4 threads; 16-byte aligned).
constexpr int kWStrideFwd = kGemmBK / 2 + 16;
// W tile, backward: [BK rows of W (reduction)][BN/2 bytes] + 16 B padding per row.
NF4LORA_HD int w_stride_bwd(int bn) { return bn / 2 + 16; }

template <int MF, int NF, int WARPS_M, int WARPS_N, int STAGES>
struct GemmTile {
  static_assert(NF == 4 || NF == 8, "n-fragments per warp: 4 (16-bit W loads) or 8 (32-bit)");
  static constexpr int kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = WARPS_M * 16 * MF;
  static constexpr int BN = WARPS_N * 8 * NF;
  static constexpr int kStages = STAGES;
  static constexpr int kABytes = BM * kAStride * 2;
  static constexpr int kWBytesFwd = BN * kWStrideFwd;
  static constexpr int kWBytesBwd = kGemmBK * (BN / 2 + 16);
  static constexpr int kWBytes = kWBytesFwd > kWBytesBwd ? kWBytesFwd : kWBytesBwd;
  // scales per (W row, 32-chunk): forward [BN][BK/32], backward [BK][BN/32]
  static constexpr int kScales = (BN * kGemmBK) / kChunk;
  static constexpr int kStageBytes = kABytes + kWBytes + kScales * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kACopies = BM * kGemmBK / 8;  // 16-byte copies per stage
  static constexpr int kWCopies = BN * kGemmBK / kChunk;
  static_assert(kABytes % 16 == 0 && kWBytes % 16 == 0, "16-byte aligned stage sections");
  static_assert(kScales % kThreads == 0, "whole scales per thread");
  static_assert(kACopies % kThreads == 0 && kWCopies % kThreads == 0, "whole copies per thread");
};

// Plain loads that compile to one shared-memory access on the device and stay defined on the host.
NF4LORA_HD uint16_t ld_u16(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint16_t*>(p);
#else
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
#endif
}
NF4LORA_HD uint32_t ld_u32(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}
NF4LORA_HD void ld_u64(const void* p, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  lo = v.x;
  hi = v.y;
#else
  uint32_t v[2];
  std::memcpy(v, p, 8);
  lo = v[0];
  hi = v[1];
#endif
}

// ---- stage copies (global -> shared, 16 bytes each; invalid ones zero-fill)
struct CopyOp {
  int64_t src;  // A: element index into the activations; W: byte offset into packed
  int dst;      // byte offset inside the stage section
  bool valid;
};
// A copy i in [0, BM*BK/8): row i/8 of the tile, elements (i%8)*8 .. +7. The activations are
// [M, red] row-major; valid rows m < M, reduction indices < r_end (red % 8 == 0 on this path).
NF4LORA_HD CopyOp a_copy_op(int i, int64_t m0, int64_t r0, int64_t M, int64_t red, int64_t r_end) {
  const int row = i / (kGemmBK / 8), col = (i % (kGemmBK / 8)) * 8;
  const int64_t m = m0 + row, k = r0 + col;
  return {m * red + k, (row * kAStride + col) * 2, m < M && k < r_end};
}
// W copy i, forward: W row (output column) c0 + i/2, 32-element chunk i%2 of the k-tile at r0.
// Backward: W row (reduction) r0 + i/(bn/32), 32-column chunk i%(bn/32) from output column c0.
// K % 32 == 0 on this path, so a chunk is 16 aligned bytes and wholly valid or wholly not.
NF4LORA_HD CopyOp w_copy_op(bool bwd, int i, int bn, int64_t c0, int64_t r0, int64_t r_end,
                            int64_t N, int64_t K) {
  if (!bwd) {
    const int row = i >> 1, ch = i & 1;
    const int64_t n = c0 + row, k = r0 + ch * kChunk;
    return {(n * K + k) / 2, row * kWStrideFwd + ch * (kChunk / 2), n < N && k < r_end};
  }
  const int per_row = bn / kChunk;
  const int row = i / per_row, ch = i % per_row;
  const int64_t n = r0 + row, k = c0 + ch * kChunk;
  return {(n * K + k) / 2, row * w_stride_bwd(bn) + ch * (kChunk / 2), n < r_end && k < K};
}
// Scale slot i of a stage (same enumeration as the W copies: one per 32-element chunk): the NF4
// block index of that chunk, or -1 when the chunk lies outside W (its slot holds 0).
NF4LORA_HD int64_t scale_block_op(bool bwd, int i, int bn, int64_t c0, int64_t r0, int64_t r_end,
                                  int64_t N, int64_t K, int64_t blocksize) {
  int64_t n, k;
  bool valid;
  if (!bwd) {
    n = c0 + (i >> 1);
    k = r0 + (i & 1) * kChunk;
    valid = n < N && k < r_end;
  } else {
    const int per_row = bn / kChunk;
    n = r0 + i / per_row;
    k = c0 + (i % per_row) * kChunk;
    valid = n < r_end && k < K;
  }
  return valid ? (n * K + k) / blocksize : -1;
}
// Forward scale slots are [BN rows][2 chunks]: slot = row*2 + chunk; backward [BK rows][bn/32].

// ---- fragments from a stage
// A fragment of the m-fragment whose first tile row is row0, mma step s (0..3): with kperm, thread
// (g, t) needs elements 16s + 4t .. +3 of rows row0+g and row0+g+8: two 8-byte loads.
NF4LORA_HD void frag_a(const uint8_t* a_tile, int row0, int s, int lane, uint32_t a[4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* p = a_tile + ((row0 + g) * kAStride + 16 * s + 4 * t) * 2;
  ld_u64(p, a[0], a[2]);
  ld_u64(p + 8 * kAStride * 2, a[1], a[3]);
}

// Forward B fragment of the n-fragment whose first W row (in the tile) is wrow0, step s: thread
// (g, t) needs codes 16s + 4t .. +3 of W row wrow0 + g = bytes 8s + 2t and 8s + 2t + 1; their
// 32-chunk is s/2.
template <DType D>
NF4LORA_HD void frag_b_fwd(const uint8_t* w_tile, const float* s_tile, int wrow0, int s, int lane,
                           float tbl, uint32_t b[2]) {
  const int g = lane >> 2, t = lane & 3;
  const int row = wrow0 + g;
  const uint32_t two = ld_u16(w_tile + row * kWStrideFwd + 8 * s + 2 * t);
  const float sc = s_tile[row * (kGemmBK / kChunk) + (s >> 1)];
  const float v0 = nf4_lookup(tbl, (two >> 4) & 15u) * sc;
  const float v1 = nf4_lookup(tbl, two & 15u) * sc;
  const float v2 = nf4_lookup(tbl, (two >> 12) & 15u) * sc;
  const float v3 = nf4_lookup(tbl, (two >> 8) & 15u) * sc;
  b[0] = pack2<D>(v0, v1);
  b[1] = pack2<D>(v2, v3);
}

// Backward B fragments of all NF n-fragments of a warp whose output columns start at tile column
// col0 (a multiple of 8*NF), step s: thread (g, t) reads W rows 16s + 4t + q (q = 0..3), NF/2
// bytes each (output columns col0 + NF*g .. +NF-1, see bwd_col), and splits them over fragments.
template <DType D, int NF>
NF4LORA_HD void frag_b_bwd(const uint8_t* w_tile, int w_stride, const float* s_tile, int s_per_row,
                           int col0, int s, int lane, float tbl, uint32_t b[NF][2]) {
  const int g = lane >> 2, t = lane & 3;
  float v[4][NF];
  NF4LORA_UNROLL
  for (int q = 0; q < 4; ++q) {
    const int row = 16 * s + 4 * t + q;
    const uint8_t* p = w_tile + row * w_stride + (col0 + NF * g) / 2;
    const uint32_t word = NF == 8 ? ld_u32(p) : static_cast<uint32_t>(ld_u16(p));
    const float sc = s_tile[row * s_per_row + (col0 + NF * g) / kChunk];
    NF4LORA_UNROLL
    for (int f = 0; f < NF; ++f) v[q][f] = nf4_lookup(tbl, word_code(word, f)) * sc;
  }
  NF4LORA_UNROLL
  for (int f = 0; f < NF; ++f) {
    b[f][0] = pack2<D>(v[0][f], v[1][f]);
    b[f][1] = pack2<D>(v[2][f], v[3][f]);
  }
}

// Output coordinates (tile-relative) of accumulator register `reg` of fragment (i, f) of a warp at
// tile offset (wm0, wn0).
NF4LORA_HD RowCol acc_coord(bool bwd, int nf, int wm0, int wn0, int i, int f, int lane, int reg) {
  const RowCol c = mma_c_coord(lane, reg);
  return {wm0 + 16 * i + c.row, wn0 + (bwd ? bwd_col(f, c.col, nf) : 8 * f + c.col)};
}

// LoRA fragments of the epilogue (natural k order, 16 ranks j0..j0+15 per mma):
//   A side: scaling * left[m, j] for rows m = mrow0 + g (+8), zero outside [0, M) x [0, r).
//   B side: forward right = lora_B [N, r] at (n = column, j); backward right = lora_A [r, K] at
//   (j, k = column). `col` is the output column of this thread's fragment column g.
template <DType D>
NF4LORA_HD void frag_lora_a(const float* left, int64_t r, int64_t M, float scaling, int64_t mrow0,
                            int64_t j0, int lane, uint32_t a[4]) {
  NF4LORA_UNROLL
  for (int reg = 0; reg < 4; ++reg) {
    float v[2];
    NF4LORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const RowCol c = mma_a_coord(lane, reg, h);
      const int64_t m = mrow0 + c.row, j = j0 + c.col;
      v[h] = (m < M && j < r) ? scaling * left[m * r + j] : 0.0f;
    }
    a[reg] = pack2<D>(v[0], v[1]);
  }
}
template <DType D>
NF4LORA_HD void frag_lora_b(bool bwd, const float* right, int64_t r, int64_t ncols, int64_t col,
                            int64_t j0, int lane, uint32_t b[2]) {
  NF4LORA_UNROLL
  for (int reg = 0; reg < 2; ++reg) {
    float v[2];
    NF4LORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t j = j0 + mma_b_coord(lane, reg, h).row;
      const bool ok = j < r && col < ncols;
      v[h] = ok ? (bwd ? right[j * ncols + col] : right[col * r + j]) : 0.0f;
    }
    b[reg] = pack2<D>(v[0], v[1]);
  }
}

// Host model of mma.sync.m16n8k16 (f32 += 16-bit x 16-bit) over the 32 lanes' fragments, per the
// layouts above: the CPU tests run warp phases lane by lane through it. Products and sums in
// double, rounded once (the tensor core's internal order is unspecified; tests use tolerances).
template <DType D>
inline void mma_host(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg)
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = mma_a_coord(lane, reg, h);
        A[rc.row][rc.col] = half_to_f32<D>(static_cast<uint16_t>(a[lane][reg] >> (16 * h)));
      }
    for (int reg = 0; reg < 2; ++reg)
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = mma_b_coord(lane, reg, h);
        B[rc.row][rc.col] = half_to_f32<D>(static_cast<uint16_t>(b[lane][reg] >> (16 * h)));
      }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int reg = 0; reg < 4; ++reg) {
      const RowCol rc = mma_c_coord(lane, reg);
      double s = c[lane][reg];
      for (int k = 0; k < 16; ++k) s += A[rc.row][k] * B[k][rc.col];
      c[lane][reg] = static_cast<float>(s);
    }
}

// ------------------------------------------------------------------------------ 5. epilogue
// What is added to an accumulator before it is stored, for every path:
//   forward:  y[m, n]  = acc + bias[n] + scaling * sum_j U[m, j] B[n, j]       (U = D(x) A^T)
//   backward: dx[m, k] = acc + scaling * D(sum_j G[m, j] A[j, k])               (G = dy B)
// The mma GEMM computes the LoRA sum with tensor cores (lora_mma_* below) and the rest here; the
// GEMV, SIMT and split-K finalize paths compute all of it with lora_dot. The arguments are the
// shared LinearEpilogue (nf4lora/epilogue.h); the forward's U was written by the launch's shrink.

// sum_j left[m, j] * right(c, j) (left = U or G, right = B or A), in float32, j ascending.
NF4LORA_HD float lora_dot(const LinearEpilogue& e, bool bwd, int64_t m, int64_t c, int64_t ncols) {
  float s = 0.0f;
  const float* l = e.left(bwd) + m * e.r;
  if (!bwd) {
    const float* b = e.B + c * e.r;
    for (int64_t j = 0; j < e.r; ++j) s += l[j] * b[j];
  } else {
    for (int64_t j = 0; j < e.r; ++j) s += l[j] * e.A[j * ncols + c];
  }
  return s;
}

// Full epilogue of one output element (m, c) given its accumulator; ncols = N (fwd) or K (bwd).
NF4LORA_HD float epilogue_value(const LinearEpilogue& e, bool bwd, int64_t m, int64_t c,
                                int64_t ncols, float acc) {
  float v = acc;
  if (e.has_lora(bwd)) {
    float t = lora_dot(e, bwd, m, c, ncols);
    if (bwd && e.drop.active()) t = e.drop.apply(e.drop.row(m), c, t);
    v += e.scaling * t;
  }
  if (!bwd && e.bias != nullptr) v += e.bias[c];
  return v;
}

}  // namespace cuda
}  // namespace nf4lora
