"""PagedAdamW step time on CPU against torch.optim.AdamW (foreach and fused) and bitsandbytes.

    python bench/bench_optim.py            10M fp32 parameters in one tensor, and 29M in the 448
                                           tensors of LoRA r=16 adapters on a 7B model
    python bench/bench_optim.py --large    also 100M in one tensor (~8 GB of RAM; bitsandbytes
                                           skipped above 20M unless --bnb-large: ~2 s/step per 10M)
    python bench/bench_optim.py --quick    1M and 64 LoRA tensors, few repeats (smoke test)

The measuring code lives in nf4lora.benchmarks.optim (shared with `nf4lora bench`). One table: size, impl, ms/step (median of repeats after warm-up), GB/s, state MB, speed-up vs
torch fused measured in the same run: the repeats interleave the implementations (one step of
each in turn), so this shared machine's drift hits all of them alike. GB/s counts the bytes a single fused pass must move:
param read+write, grad read, state read+write = 28 B/param with fp32 state, 16 B/param + absmax
with 8-bit state (the same model for every implementation, so GB/s is proportional to speed; a
multi-pass implementation really moves more). The gradient is refreshed from a pool of several
tensors between steps so no step finds its grad in cache. Napkin math: this machine's DRAM gives
~20 GB/s, so a fp32-state step of 10M params cannot beat ~14 ms, an 8-bit one ~8 ms.
"""
import argparse
import math

import torch

import nf4lora as nl
from nf4lora.benchmarks.optim import LORA_7B_SHAPES, bench_case, bytes_per_param, impls as _impls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M params, few repeats")
    ap.add_argument("--large", action="store_true", help="also 100M params")
    ap.add_argument("--bnb-large", action="store_true", help="run bitsandbytes at 100M too (slow)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)

    # (label, parameter shapes): one big tensor, and the list a QLoRA run steps: LoRA r=16
    # adapters (A [16, 4096], B [4096, 16]) on the 7 projections of 32 layers of a 7B model.
    lora = LORA_7B_SHAPES
    if args.quick:
        cases = [("1M", [(1_000_000,)]), ("LoRA 64x64K", lora[:64])]
    else:
        cases = [("10M", [(10_000_000,)]), ("LoRA 448x64K", lora)]
        if args.large:
            cases.insert(1, ("100M", [(100_000_000,)]))
    repeats = args.repeats or (3 if args.quick else 15)
    C = nl._native._C
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"nf4lora OpenMP threads {C.num_threads()}, AVX2 {C.uses_avx2()}, "
          f"AVX-512 {C.uses_avx512()}, AVX-512+VBMI (8-bit kernel) {C.uses_avx512vbmi()}")
    header = f"{'params':>13}  {'impl':<28} {'ms/step':>9} {'GB/s':>7} {'state MB':>9} {'vs fused':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for label, shapes in cases:
        n = sum(math.prod(s) for s in shapes)
        impls = []
        for name, bits, make in _impls(not args.no_bnb):
            is_bnb = name.startswith("bitsandbytes")
            if is_bnb and n > 20_000_000 and not args.bnb_large:
                continue
            impls.append((name, bits, make, max(2, repeats // 3) if is_bnb else repeats))
        results = bench_case(shapes, impls, warmup=2, repeats=repeats)
        fused = results.get("torch AdamW fused", (float("nan"),))[0]
        for name, (t, state, bits) in results.items():
            gbs = n * bytes_per_param(bits) / t / 1e9
            ratio = fused / t
            print(f"{label:>13}  {name:<28} {t * 1e3:>9.2f} {gbs:>7.1f} {state / 2**20:>9.1f} {ratio:>8.2f}x")
            rows.append((label, name, t, gbs, state, ratio))
    try:  # optional plot
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import os
        os.makedirs("bench/results", exist_ok=True)
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r[1]}\n{r[0]}" for r in rows]
        ax.barh(labels, [r[2] * 1e3 for r in rows])
        ax.set_xlabel("ms / step (lower is better)")
        fig.tight_layout()
        fig.savefig("bench/results/optim.png", dpi=120)
    except ImportError:
        pass
    return rows


if __name__ == "__main__":
    main()
