// The bf16-activation path of the CPU fused QLoRA linear (DESIGN.md "CPU paths"): NF4 codes are
// decoded to bf16 (code value x block absmax in fp32, rounded to nearest even: the numbers
// dequantize_nf4(q, bfloat16) and bitsandbytes give), multiplied on bf16 tiles, accumulated in
// fp32. One driver per direction (linear_bf16_fwd_avx512.cpp, linear_bf16_bwd_avx512.cpp; decode
// and packing in bf16_tiles_avx512.h) runs either tile micro-kernel: AMX (linear_amx.cpp,
// TDPBF16PS) or AVX512-BF16 (linear_avx512bf16.cpp, VDPBF16PS).
// Call only when use_avx512() and the kernel's own feature check hold.
#pragma once
#include <cstdint>

#include "ref/linear_ref.h"

namespace nf4lora {
namespace bf16lin {

// Operand layouts (all bf16 as uint16_t, 64-byte rows):
//  A: natural rows of 32 reduction elements; a 16-row tile = 16 rows at stride lda elements.
//  B: one "VNNI" tile per 16 output columns and 32 reduction elements = [16 k-pairs][16 cols][2]
//     (1 KB, rows of 64 bytes): element (k, c) at [k / 2][c][k % 2].
// block(): C (fp32 [32][32], row stride ldc floats) (+)= sum over s < steps of A_s B_s, where
//   A_s rows 0..15 start at a0 + s * a_step, rows 16..31 at a1 + s * a_step (row stride lda),
//   B_s columns 0..15 are the tile at b0 + s * b_step, columns 16..31 the tile at b1 + s * b_step.
// a1 == nullptr: only rows 0..15 (C rows 16..31 untouched); b1 == nullptr: only columns 0..15.
// thread_begin/thread_end bracket every thread's use (AMX: tile configuration and release).
struct TileKernel {
  const char* name;
  // reduction steps per block() call in the forward, so that a row pair's A (2 x steps KB) and
  // the B tiles it meets stay in L1: AMX reads 1 KB tiles, VDPBF16PS re-reads B once per 8 rows
  int64_t sub_steps;
  void (*thread_begin)();
  void (*thread_end)();
  void (*block)(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t lda,
                const uint16_t* b0, const uint16_t* b1, int64_t b_step, int64_t steps, float* c,
                int64_t ldc, bool accumulate);
};

extern const TileKernel kAmxKernel;     // linear_amx.cpp: use_amx()
extern const TileKernel kDpbf16Kernel;  // linear_avx512bf16.cpp: use_avx512bf16()

// y [M, N] (bf16) = x W^T + bias + s u B^T with u [M, r] = D(x) A^T (fp32), as
// qlora_forward_bf16w_ref (linear_bf16_fwd_avx512.cpp). y^T tiles: A = decoded W rows, B = x in
// VNNI tiles.
Status forward(const TileKernel& kern, const uint16_t* x, int64_t M, const NF4Weight& w,
               const LinearEpilogue& epi, uint16_t* y);
// dx [M, K] (bf16) = dy W + s D(g A), as qlora_backward_dx_bf16w_ref (linear_bf16_bwd_avx512.cpp).
// A = dy rows (packed into tiles), B = decoded W row pairs interleaved into VNNI tiles.
Status backward_dx(const TileKernel& kern, const uint16_t* dy, int64_t M, const NF4Weight& w,
                   const LinearEpilogue& epi, uint16_t* dx);

}  // namespace bf16lin
}  // namespace nf4lora
