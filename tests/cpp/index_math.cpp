// Host build (plain g++, no CUDA) of the index arithmetic the CUDA linear kernels and every backend
// share: csrc/cuda/nf4_frag.h's stage-copy and scale-slot maps and csrc/include/nf4lora/layout.h's
// sizes. tests/test_large_tensors.py compiles this, feeds it queries past 2^31 elements and checks
// every answer against Python's unbounded integers (a 32-bit product anywhere would wrap).
// Queries on stdin, one per line, answers on stdout:
//   a  i m0 r0 M red r_end                       -> src dst valid   (a_copy_op)
//   w  bwd i bn c0 r0 r_end N K                  -> src dst valid   (w_copy_op)
//   s  bwd i bn c0 r0 r_end N K blocksize        -> block           (scale_block_op)
//   l  n blocksize                               -> packed_bytes n_blocks n_nested_blocks
#include <cstdio>
#include <cstring>

#include "cuda/nf4_frag.h"

using nf4lora::cuda::a_copy_op;
using nf4lora::cuda::scale_block_op;
using nf4lora::cuda::w_copy_op;

int main() {
  char op[8];
  while (std::scanf("%7s", op) == 1) {
    long long m0, r0, M, red, r_end, c0, N, K, bs, n;
    int i, bn, bwd;
    if (!std::strcmp(op, "a") && std::scanf("%d %lld %lld %lld %lld %lld", &i, &m0, &r0, &M, &red, &r_end) == 6) {
      const auto c = a_copy_op(i, m0, r0, M, red, r_end);
      std::printf("%lld %d %d\n", static_cast<long long>(c.src), c.dst, c.valid ? 1 : 0);
    } else if (!std::strcmp(op, "w") &&
               std::scanf("%d %d %d %lld %lld %lld %lld %lld", &bwd, &i, &bn, &c0, &r0, &r_end, &N, &K) == 8) {
      const auto c = w_copy_op(bwd != 0, i, bn, c0, r0, r_end, N, K);
      std::printf("%lld %d %d\n", static_cast<long long>(c.src), c.dst, c.valid ? 1 : 0);
    } else if (!std::strcmp(op, "s") &&
               std::scanf("%d %d %d %lld %lld %lld %lld %lld %lld", &bwd, &i, &bn, &c0, &r0, &r_end, &N, &K, &bs) == 9) {
      std::printf("%lld\n", static_cast<long long>(scale_block_op(bwd != 0, i, bn, c0, r0, r_end, N, K, bs)));
    } else if (!std::strcmp(op, "l") && std::scanf("%lld %lld", &n, &bs) == 2) {
      const long long nb = nf4lora::n_blocks(n, bs);
      std::printf("%lld %lld %lld\n", static_cast<long long>(nf4lora::packed_bytes(n)), nb,
                  static_cast<long long>(nf4lora::n_nested_blocks(nb)));
    } else {
      std::fprintf(stderr, "bad query '%s'\n", op);
      return 2;
    }
  }
  return 0;
}
