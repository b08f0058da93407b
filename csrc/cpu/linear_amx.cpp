// AMX-BF16 tile micro-kernel of the bf16 linear path (csrc/cpu/linear_bf16.h). A 2 x 2 block of
// 16 x 16 fp32 accumulator tiles (tmm0-3) stays in tile registers over the whole reduction;
// each step loads two A tiles (tmm4-5, 16 rows x 32 bf16) and two VNNI B tiles (tmm6-7) and issues
// four TDPBF16PS (16 x 16 x 32 multiply-adds each). Every tile is configured 16 rows x 64 bytes.
#include <immintrin.h>

#include "cpu/linear_bf16.h"

namespace nf4lora {
namespace bf16lin {

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. A constant-initialized object in memory: GCC 12 does not see
// that ldtilecfg reads its operand and drops stores to a stack copy filled just before.
constexpr TileConfig make_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}
const TileConfig kConfig = make_config();

void amx_begin() { _tile_loadconfig(&kConfig); }

// Releasing the tiles returns the thread to the init state, so context switches stop saving 8 KB
// of tile data and the core may leave its AMX power license.
void amx_end() { _tile_release(); }

// C tiles: 0 = (a0, b0), 1 = (a0, b1), 2 = (a1, b0), 3 = (a1, b1); a1 / b1 may be null (one row
// or column tile: 16-row remainders), and those tiles are then neither computed nor stored.
template <bool TWO_A, bool TWO_B>
void amx_block_t(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t lda,
                 const uint16_t* b0, const uint16_t* b1, int64_t b_step, int64_t steps, float* c,
                 int64_t ldc, bool accumulate) {
  const int64_t cs = ldc * 4, as = lda * 2;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, c, cs);
    if (TWO_B) _tile_loadd(1, c + 16, cs);
    if (TWO_A) _tile_loadd(2, c + 16 * ldc, cs);
    if (TWO_A && TWO_B) _tile_loadd(3, c + 16 * ldc + 16, cs);
  } else {
    _tile_zero(0);
    if (TWO_B) _tile_zero(1);
    if (TWO_A) _tile_zero(2);
    if (TWO_A && TWO_B) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a0 + s * a_step, as);
    _tile_loadd(6, b0 + s * b_step, 64);
    if (TWO_A) _tile_loadd(5, a1 + s * a_step, as);
    if (TWO_B) _tile_loadd(7, b1 + s * b_step, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (TWO_B) _tile_dpbf16ps(1, 4, 7);
    if (TWO_A) _tile_dpbf16ps(2, 5, 6);
    if (TWO_A && TWO_B) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, cs);
  if (TWO_B) _tile_stored(1, c + 16, cs);
  if (TWO_A) _tile_stored(2, c + 16 * ldc, cs);
  if (TWO_A && TWO_B) _tile_stored(3, c + 16 * ldc + 16, cs);
}

void amx_block(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t lda,
               const uint16_t* b0, const uint16_t* b1, int64_t b_step, int64_t steps, float* c,
               int64_t ldc, bool accumulate) {
  auto fn = a1 ? (b1 ? amx_block_t<true, true> : amx_block_t<true, false>)
               : (b1 ? amx_block_t<false, true> : amx_block_t<false, false>);
  fn(a0, a1, a_step, lda, b0, b1, b_step, steps, c, ldc, accumulate);
}

}  // namespace

const TileKernel kAmxKernel = {"amx", 16, amx_begin, amx_end, amx_block};

}  // namespace bf16lin
}  // namespace nf4lora
