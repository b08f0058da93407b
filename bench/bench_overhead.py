"""Per-call overhead of the public linear functions at decode size (M = 1, a 1024 x 1024 NF4 layer).

  python bench/bench_overhead.py [--repeats 2000] [--inner 10] [--threads 1] [--size 1024]

Times nl.nf4_linear and nl.qlora_linear (r = 16) against F.linear on the dense (dequantized)
weight, and qlora_linear also against F.linear plus PEFT-style separate LoRA matmuls, in fp32 and
bf16, under torch.no_grad(). The candidates run interleaved (one sample of each per round, the
order rotating per round) so drift in machine load hits them alike; a sample is the mean of
--inner back-to-back calls, and the table gives the median sample per call in microseconds and
ours minus the baseline. At this size the kernel itself is a few microseconds of weight reads,
so the difference is mostly Python, argument checks and op dispatch (the "op only" row calls the
registered op directly, without nl.nf4_linear's Python checks: the gap between the two rows is
what those checks cost): run it before and after
changes to that path (issue 13 "validation once"). One thread by default: on a shared machine an
OpenMP barrier that waits for a descheduled thread costs milliseconds and would hide the
microseconds this measures (--threads 0 keeps torch's setting). At 1024 x 1024 one thread's kernel
(~150-200 us of weight reads) and its run-to-run drift (tens of us on a shared VM) are larger than
the Python part; --size 64 makes the kernel ~1 us so the table is the per-call overhead itself.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import nf4lora as nl  # noqa: E402

M, R = 1, 16


def cases(dtype, gen, N, K):
    """{name: zero-argument callable} for one activation dtype."""
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    q = nl.quantize_nf4(w, blocksize=64, double_quant=True)
    dense = nl.dequantize_nf4(q, dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    A = torch.randn(R, K, generator=gen) / K ** 0.5       # float32, as the layer keeps them
    B = torch.randn(N, R, generator=gen) / R ** 0.5
    A_d, B_d = A.to(dtype), B.to(dtype)                   # the dense baseline's own dtype
    s = 2.0
    raw = {}
    state = getattr(nl.functional, "_state", None)
    if state is not None and hasattr(q, "nk"):  # this build's op signature (skipped on old builds)
        st = state(q)
        raw["torch.ops.nf4lora.nf4_linear (op only)"] = lambda: torch.ops.nf4lora.nf4_linear(x, *st, N, None)
    return {**raw,
        "F.linear (dense W)": lambda: F.linear(x, dense),
        "F.linear + LoRA matmuls": lambda: F.linear(x, dense) + s * F.linear(F.linear(x, A_d), B_d),
        "nl.nf4_linear": lambda: nl.nf4_linear(x, q),
        "nl.qlora_linear": lambda: nl.qlora_linear(x, q, A, B, s),
    }


def interleaved_us(fns, repeats, inner):
    """Median per-call microseconds of each fn, sampled round-robin with a rotating order."""
    names = list(fns)
    for fn in fns.values():  # warm-up: first-call dispatch, kernel scratch, caches
        for _ in range(max(inner, 20)):
            fn()
    samples = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter_ns() - t0) / inner / 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2000, help="samples per candidate")
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: as is)")
    ap.add_argument("--size", type=int, default=1024, help="N = K of the layer (64: overhead only)")
    args = ap.parse_args()
    N = K = args.size
    if args.threads:
        torch.set_num_threads(args.threads)
    print(common.machine_info())
    print(f"M={M} N={N} K={K} r={R}; median of {args.repeats} interleaved samples x "
          f"{args.inner} calls; torch.no_grad()")
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            us = interleaved_us(cases(dtype, gen, N, K), args.repeats, args.inner)
            base = us["F.linear (dense W)"]
            peft = us["F.linear + LoRA matmuls"]
            for name, t in us.items():
                vs = {"nl.nf4_linear": base, "nl.qlora_linear": peft}.get(name)
                rows.append([str(dtype).replace("torch.", ""), name, f"{t:.1f}",
                             f"{t - base:+.1f}", "" if vs is None or vs is base else f"{t - vs:+.1f}"])
    common.print_table(rows, ["dtype", "call", "us/call", "- F.linear (us)", "- F.linear+LoRA (us)"],
                       title=f"Per-call time at M=1, {N}x{K}")


if __name__ == "__main__":
    main()
