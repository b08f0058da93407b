"""CPU benchmark of the fused QLoRA linear (issue 3): nf4lora vs torch dense F.linear (fp32 and bf16
weight) and vs bitsandbytes' matmul_4bit + PEFT-style separate LoRA matmuls, side by side.

  python bench/bench_linear.py            full table (several minutes)
  python bench/bench_linear.py --quick    one shape, small M

GEMV numbers come from DRAM: weights rotate over more than 256 MB. Each row reports the machine's
ceilings measured in the same run (DRAM read GB/s, fp32 FMA GFLOP/s). Results: bench/results/.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import nf4lora as nl  # noqa: E402
from nf4lora import _C  # noqa: E402

R = 16
ROTATE_BYTES = 256 << 20


def copies_for(nbytes, small_m):
    return max(2, -(-ROTATE_BYTES // nbytes)) if small_m else 1


def try_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bF
        return bnb, bF
    except Exception:  # pragma: no cover
        return None, None


def make_case(K, N, M, dtype, small_m, with_bnb):
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) * 0.02
    q = nl.quantize_nf4(w, 64, double_quant=True)
    qs = common.Rotating([q] + [q.clone() for _ in range(copies_for(q.nbytes, small_m) - 1)])
    w32 = common.Rotating([w] + [w.clone() for _ in range(copies_for(w.numel() * 4, small_m) - 1)])
    wbf = w.bfloat16()
    w16 = common.Rotating([wbf] + [wbf.clone() for _ in range(copies_for(w.numel() * 2, small_m) - 1)])
    A = torch.randn(R, K, generator=g) * 0.01
    B = torch.randn(N, R, generator=g) * 0.01
    x = torch.randn(M, K, generator=g).to(dtype)
    bnbq = None
    if with_bnb:
        bnb, bF = try_bnb()
        if bnb is not None:
            packed, state = bF.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4",
                                             compress_statistics=True)
            bnbq = (bnb, packed, state)
    return q, qs, w32, w16, A, B, x, bnbq


def forward_row(K, N, M, dtype, peak, dram, with_bnb, budget):
    small_m = M <= 16
    q, qs, w32, w16, A, B, x, bnbq = make_case(K, N, M, dtype, small_m, with_bnb)
    s = 2.0
    with torch.no_grad():
        t_ours = common.time_fn(lambda: nl.qlora_linear(x, qs.next(), A, B, s), repeats=7, budget_s=budget)
        t_nolora = common.time_fn(lambda: nl.nf4_linear(x, qs.next()), repeats=7, budget_s=budget)
        xf = x.float()
        t_d32 = common.time_fn(lambda: F.linear(xf, w32.next()), repeats=7, budget_s=budget)
        xb = x.bfloat16()
        t_d16 = common.time_fn(lambda: F.linear(xb, w16.next()), repeats=3, budget_s=budget)
        t_bnb = float("nan")
        if bnbq is not None:
            bnb, packed, state = bnbq
            At, Bt = A.to(dtype), B.to(dtype)
            t_bnb = common.time_fn(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
                                   + (x @ At.t()) @ Bt.t() * s, repeats=3, warmup=1, budget_s=budget)
    flops = 2 * M * N * K
    return [f"{K}x{N}", M, str(dtype).replace("torch.", ""), _C.forward_path(M, N, K),
            t_ours * 1e3, t_nolora * 1e3, q.nbytes / t_nolora / 1e9, flops / t_nolora / 1e9,
            t_d32 * 1e3, t_d16 * 1e3, t_bnb * 1e3, t_d32 / t_nolora, t_bnb / t_ours,
            100 * (q.nbytes / t_nolora / 1e9) / dram if small_m else 100 * flops / t_nolora / 1e9 / peak]


def train_row(K, N, M, dtype, with_bnb, budget):
    q, _, w32, w16, A, B, x, bnbq = make_case(K, N, M, dtype, False, with_bnb)
    s = 2.0
    dy = torch.randn(M, N).to(dtype)

    def ours():
        xi = x.detach().requires_grad_()
        Ai, Bi = A.detach().requires_grad_(), B.detach().requires_grad_()
        nl.qlora_linear(xi, q, Ai, Bi, s).backward(dy)

    def dense(wr, cast):
        def run():
            xi = x.detach().to(cast).requires_grad_()
            Ai, Bi = A.detach().to(cast).requires_grad_(), B.detach().to(cast).requires_grad_()
            (F.linear(xi, wr.next()) + (xi @ Ai.t()) @ Bi.t() * s).backward(dy.to(cast))
        return run

    t_ours = common.time_fn(ours, repeats=3, budget_s=budget)
    t_d32 = common.time_fn(dense(w32, torch.float32), repeats=3, budget_s=budget)
    t_bnb = float("nan")
    if bnbq is not None:
        bnb, packed, state = bnbq

        def peft():
            xi = x.detach().requires_grad_()
            Ai, Bi = A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_()
            (bnb.matmul_4bit(xi, packed.t(), quant_state=state) + (xi @ Ai.t()) @ Bi.t() * s).backward(dy)
        t_bnb = common.time_fn(peft, repeats=1, warmup=0, budget_s=budget)
    flops = 2 * 2 * M * N * K  # forward + dx (W is frozen: no dW); the r=16 LoRA terms are small
    return [f"{K}x{N}", M, str(dtype).replace("torch.", ""), t_ours * 1e3, flops / t_ours / 1e9,
            t_d32 * 1e3, t_d32 / t_ours, t_bnb * 1e3, t_bnb / t_ours]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    ms = [1, 16, 256] if args.quick else [1, 16, 256, 2048]
    budget = 3.0 if args.quick else 20.0
    dram, peak = common.dram_read_gbps(), common.fma_peak_gflops()
    print(common.machine_info())
    print(f"ceilings measured now: DRAM read {dram:.1f} GB/s, fp32 FMA peak {peak:.0f} GFLOP/s")

    fwd_rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for K, N in shapes:
            for M in ms:
                with_bnb = not args.no_bnb and M <= 16
                fwd_rows.append(forward_row(K, N, M, dtype, peak, dram, with_bnb, budget))
                print("  ", fwd_rows[-1][:8], flush=True)
    fwd_headers = ["KxN", "M", "act", "path", "ours+LoRA ms", "ours ms", "GB/s", "GFLOP/s",
                   "dense fp32 ms", "dense bf16 ms", "bnb+PEFT ms", "x dense fp32", "x bnb+PEFT",
                   "% ceiling"]
    fwd_md = common.print_table([[common.fmt(v) for v in r] for r in fwd_rows], fwd_headers, "Forward (r=16 LoRA fused in 'ours+LoRA'; 'ours' = "
                       "nf4_linear; GB/s of packed NF4 bytes incl. scales; % ceiling = of DRAM GB/s "
                       "for M<=16, of FMA peak otherwise)")

    train_rows = []
    tms = [256] if args.quick else [256, 512, 2048]
    for K, N in shapes[:1] if args.quick else shapes[:2]:
        for M in tms:
            for dtype in (torch.float32, torch.bfloat16):
                with_bnb = not args.no_bnb and dtype == torch.bfloat16 and M == 512
                train_rows.append(train_row(K, N, M, dtype, with_bnb, budget))
                print("  ", train_rows[-1], flush=True)
    train_headers = ["KxN", "M", "act", "ours ms", "GFLOP/s", "dense fp32 ms", "x dense fp32",
                     "bnb+PEFT ms", "x bnb+PEFT"]
    train_md = common.print_table([[common.fmt(v) for v in r] for r in train_rows], train_headers,
                                  "Forward + backward (dx, dA, dB), r=16")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "linear.md"), "w") as f:
        f.write(f"{common.machine_info()}; DRAM read {dram:.1f} GB/s, FMA peak {peak:.0f} GFLOP/s\n\n")
        f.write(fwd_md + "\n\n" + train_md + "\n")
    series = {}
    for row in fwd_rows:
        if row[2] == "float32":
            series.setdefault(f"ours {row[0]}", ([], []))
            series[f"ours {row[0]}"][0].append(row[1])
            series[f"ours {row[0]}"][1].append(row[7])
            series.setdefault(f"dense fp32 {row[0]}", ([], []))
            series[f"dense fp32 {row[0]}"][0].append(row[1])
            series[f"dense fp32 {row[0]}"][1].append(2 * row[1] * int(row[0].split('x')[0]) * int(row[0].split('x')[1]) / row[8] / 1e6)
    common.save_line_plot(os.path.join(args.out, "linear.png"), series, "M (tokens)", "GFLOP/s",
                          "CPU forward, fp32 activations")


if __name__ == "__main__":
    main()
