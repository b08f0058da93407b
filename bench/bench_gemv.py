"""CPU GEMV forward (M <= 4) from DRAM: the AVX-512 path against the AVX2 one in the same run.

  python bench/bench_gemv.py [--runs 25]

Each shape rotates over > 256 MB of NF4 copies so W comes from DRAM, never the LLC; prints the
median of --runs calls (ms) and packed-weight GB/s (q.nbytes / time) per path.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import nf4lora as nl  # noqa: E402
from nf4lora import _C  # noqa: E402

ROTATE_BYTES = 256 << 20


def median_ms(fn, runs):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    paths = ["avx2"]
    if hasattr(_C, "set_force_avx2") and _C.has_avx512():
        paths.append("avx512")
    print(f"threads={_C.num_threads()} paths={paths}")
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008)):
        g = torch.Generator().manual_seed(N)
        q = nl.quantize_nf4(torch.randn(N, K, generator=g) * 0.02, 64, double_quant=True)
        copies = max(2, -(-ROTATE_BYTES // q.nbytes) + 1)
        qs = common.Rotating([q] + [q.clone() for _ in range(copies - 1)])
        for M in (1, 4):
            x = torch.randn(M, K, generator=g)
            for p in paths:
                if hasattr(_C, "set_force_avx2"):
                    _C.set_force_avx2(p == "avx2")
                with torch.no_grad():
                    ms = median_ms(lambda: nl.nf4_linear(x, qs.next()), args.runs)
                print(f"{N}x{K} M={M} {_C.forward_path(M, N, K):8s} {ms:7.3f} ms "
                      f"{q.nbytes / ms / 1e6:6.2f} GB/s")
    if hasattr(_C, "set_force_avx2"):
        _C.set_force_avx2(False)


if __name__ == "__main__":
    main()
