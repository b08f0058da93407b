"""GPU benchmark of the CUDA NF4 linear (one table per suite; bench/gpu_check.sh runs it).

Method: CUDA events around each call, warm-up first, median of the repeats; every call uses the
next of several weight copies whose total exceeds 3x the L2 (and > 50 MB), so L2 never holds the
weight the call reads. Ratios are measured side by side in the same run:
  cublas   torch.matmul with a bf16 weight (cuBLAS)
  deq      dequantize W to bf16 + cuBLAS + separate LoRA matmuls (the bitsandbytes/Unsloth way)
  bnb      bitsandbytes.matmul_4bit, only when bitsandbytes is importable
Reports us, GB/s (NF4 bytes incl. scales + activations) or TFLOP/s, % of 4.8 TB/s (HBM3e of an
H200) or of the bf16 GEMM rate measured at the start, and ratio = baseline time / our time.

  python bench/bench_gpu.py [--budget 150] [--out DIR] [--quick]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

import nf4lora as nl
from nf4lora.functional import qlora_linear

HBM_BPS = 4.8e12
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # (K, N)
MS = [1, 16, 64, 256, 2048, 8192]
R = 16
DT = torch.bfloat16


def timed(fn, n_iter, warmup=3):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    evs = []
    for i in range(n_iter):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i)
        e.record()
        evs.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs) * 1e3  # us


def copies_for(nbytes, l2):
    return max(2, math.ceil(max(3 * l2, 64 << 20) / max(nbytes, 1)))


class Weights:
    """Rotated NF4 weight copies and rotated bf16 copies of the same weight (cuBLAS baseline)."""

    def __init__(self, K, N, l2, need_bf16=True):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        q = nl.quantize_nf4(w, blocksize=64, double_quant=True)
        self.nf4_bytes = q.nbytes
        nq = copies_for(self.nf4_bytes, l2)
        self.q = [q] + [q.clone() for _ in range(nq - 1)]
        self.wb = []
        if need_bf16:
            wb = q.dequantize(torch.bfloat16)
            nb = copies_for(wb.numel() * 2, l2)
            self.wb = [wb] + [wb.clone() for _ in range(nb - 1)]
        del w
        self.K, self.N = K, N


def measure_bf16_peak():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DT)
    b = torch.randn(n, n, device="cuda", dtype=DT)
    us = timed(lambda i: a @ b, 10)
    return 2 * n**3 / (us * 1e-6)


def bench_forward(rows, l2, peak, deadline, quick):
    shapes = SHAPES[:1] + SHAPES[-1:] if quick else SHAPES
    for K, N in shapes:
        if time.time() > deadline:
            break
        W = Weights(K, N, l2)
        for M in MS:
            if time.time() > deadline:
                break
            x = torch.randn(M, K, device="cuda", dtype=DT)
            it = 50 if M <= 256 else 10
            ours = timed(lambda i: nl.nf4_linear(x, W.q[i % len(W.q)]), it)
            cub = timed(lambda i: x @ W.wb[i % len(W.wb)].t(), it)
            deq = timed(lambda i: x @ W.q[i % len(W.q)].dequantize(DT).t(), it)
            flops = 2.0 * M * N * K
            nbytes = W.nf4_bytes + M * K * 2 + M * N * 2
            row = dict(suite="forward", K=K, N=N, M=M, us=ours, cublas_us=cub, deq_us=deq,
                       gbps=nbytes / (ours * 1e-6) / 1e9, tflops=flops / (ours * 1e-6) / 1e12,
                       pct_hbm=100 * nbytes / (ours * 1e-6) / HBM_BPS,
                       pct_bf16=100 * flops / (ours * 1e-6) / peak,
                       x_cublas=cub / ours, x_deq=deq / ours)
            try:
                import bitsandbytes as bnb  # optional, only if its wheel was carried
                import bitsandbytes.functional as bf
                wq, st = bf.quantize_4bit(W.wb[0], blocksize=64, quant_type="nf4", compress_statistics=True)
                row["bnb_us"] = timed(lambda i: bnb.matmul_4bit(x, wq.t(), quant_state=st), it)
                row["x_bnb"] = row["bnb_us"] / ours
            except Exception:  # noqa: BLE001 - bitsandbytes missing or failing: no column
                pass
            rows.append(row)
        del W
        torch.cuda.empty_cache()


def bench_lora_overhead(rows, l2, deadline):
    K, N = 4096, 4096
    W = Weights(K, N, l2, need_bf16=False)
    A = torch.randn(R, K, device="cuda") / 64
    B = torch.randn(N, R, device="cuda") / 4
    for M in (1, 16, 256, 8192):
        if time.time() > deadline:
            break
        x = torch.randn(M, K, device="cuda", dtype=DT)
        it = 50 if M <= 256 else 10
        base = timed(lambda i: nl.nf4_linear(x, W.q[i % len(W.q)]), it)
        lora = timed(lambda i: qlora_linear(x, W.q[i % len(W.q)], A, B, 2.0), it)
        rows.append(dict(suite="lora_overhead", K=K, N=N, M=M, r=R, us=lora, base_us=base,
                         overhead_pct=100 * (lora / base - 1)))


def bench_training(rows, l2, deadline, M=8192):
    """QLoRA linear forward + backward (dx, dA, dB) at M tokens, r = 16, 4096 x 4096."""
    if time.time() > deadline:
        return
    K, N = 4096, 4096
    W = Weights(K, N, l2, need_bf16=False)
    x = torch.randn(M, K, device="cuda", dtype=DT, requires_grad=True)
    A = (torch.randn(R, K, device="cuda") / 64).requires_grad_()
    B = (torch.randn(N, R, device="cuda") / 4).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=DT)
    s = 2.0

    def ours(i):
        y = qlora_linear(x, W.q[i % len(W.q)], A, B, s)
        torch.autograd.backward(y, dy)

    # the bitsandbytes/Unsloth way: dequantize to a bf16 buffer, cuBLAS, LoRA as separate matmuls,
    # dequantize again in backward (no W gradient)
    Ab = A.detach().to(DT).requires_grad_()
    Bb = B.detach().to(DT).requires_grad_()

    class DeqMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, q):
            ctx.q = q
            return x @ q.dequantize(DT).t()

        @staticmethod
        def backward(ctx, g):
            return g @ ctx.q.dequantize(DT), None

    def deq(i):
        q = W.q[i % len(W.q)]
        y = DeqMatmul.apply(x, q) + s * ((x @ Ab.t()) @ Bb.t())
        torch.autograd.backward(y, dy)

    it = 10
    t_ours = timed(ours, it)
    t_deq = timed(deq, it)
    flops = 3 * 2.0 * M * N * K  # y, dx (+ LoRA terms, small)
    rows.append(dict(suite="training", K=K, N=N, M=M, r=R, us=t_ours, deq_us=t_deq,
                     tflops=flops / (t_ours * 1e-6) / 1e12, x_deq=t_deq / t_ours))


TARGETS = {  # (suite, K, N, M): (metric, minimum)
    ("forward", 8192, 28672, 1): [("pct_hbm", 85), ("x_cublas", 3.3)],
    ("forward", 4096, 4096, 1): [("pct_hbm", 60), ("x_cublas", 2.5)],
    ("forward", 4096, 4096, 16): [("x_cublas", 3.0)],
    ("forward", 4096, 4096, 64): [("x_cublas", 2.0)],
    ("forward", 4096, 4096, 256): [("x_cublas", 0.9)],
    ("training", 4096, 4096, 8192): [("x_deq", 1.2)],
}


def verdict(row):
    out = []
    for metric, lo in TARGETS.get((row["suite"], row["K"], row["N"], row["M"]), []):
        out.append(f"{metric}>={lo}:{'ok' if row.get(metric, 0) >= lo else 'MISS'}")
    if row["suite"] == "lora_overhead":
        out.append(f"<=5%:{'ok' if row['overhead_pct'] <= 5 else 'MISS'}")
    return " ".join(out)


def print_tables(rows, peak):
    print(f"\nbf16 GEMM rate measured: {peak / 1e12:.0f} TFLOP/s; HBM reference 4.8 TB/s")
    fw = [r for r in rows if r["suite"] == "forward"]
    if fw:
        print("\nforward y = x W^T (bf16, NF4 blocksize 64, double-quant)")
        print(f"{'K':>6} {'N':>6} {'M':>5} {'us':>9} {'GB/s':>7} {'%HBM':>5} {'TFLOP/s':>8} "
              f"{'%bf16':>6} {'xcuBLAS':>8} {'xdeq':>6} {'xbnb':>6}  targets")
        for r in fw:
            xb = f"{r['x_bnb']:6.2f}" if "x_bnb" in r else "     -"
            print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} {r['us']:9.1f} {r['gbps']:7.0f} "
                  f"{r['pct_hbm']:5.0f} {r['tflops']:8.1f} {r['pct_bf16']:6.1f} {r['x_cublas']:8.2f} "
                  f"{r['x_deq']:6.2f} {xb}  {verdict(r)}")
    lo = [r for r in rows if r["suite"] == "lora_overhead"]
    if lo:
        print("\nfused LoRA (r=16) overhead, 4096 x 4096")
        for r in lo:
            print(f"  M={r['M']:>5}: {r['base_us']:8.1f} -> {r['us']:8.1f} us "
                  f"({r['overhead_pct']:+.1f}%)  {verdict(r)}")
    tr = [r for r in rows if r["suite"] == "training"]
    for r in tr:
        print(f"\nQLoRA fwd+bwd M={r['M']} r={r['r']} {r['K']}x{r['N']}: ours {r['us']:.0f} us, "
              f"dequant+cuBLAS+LoRA {r['deq_us']:.0f} us, x{r['x_deq']:.2f}  {verdict(r)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all suites")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + args.budget
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20) or (60 << 20)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MB, "
          f"torch {torch.__version__}")
    peak = measure_bf16_peak()
    rows = []
    for suite in (lambda: bench_forward(rows, l2, peak, t0 + 0.6 * args.budget, args.quick),
                  lambda: bench_lora_overhead(rows, l2, t0 + 0.75 * args.budget),
                  lambda: bench_training(rows, l2, deadline)):
        try:
            suite()
        except Exception as e:  # noqa: BLE001 - keep the other suites' numbers
            print(f"bench_gpu: suite failed: {type(e).__name__}: {e}", file=sys.stderr)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump(dict(device=props.name, bf16_tflops=peak / 1e12, rows=rows), f, indent=1)
    print_tables(rows, peak)
    print(f"\nbench_gpu: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
