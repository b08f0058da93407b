"""CPU benchmark of the fused QLoRA linear (issue 3): nf4lora vs torch dense F.linear (fp32 and bf16
weight) and vs bitsandbytes' matmul_4bit + PEFT-style separate LoRA matmuls, side by side.

  python bench/bench_linear.py            full table (several minutes)
  python bench/bench_linear.py --quick    one shape, small M
  python bench/bench_linear.py --targets  the issue-10 targets, each against its baseline in turn
                                          within every repeat (nf4lora.benchmarks.targets)

The measuring code lives in nf4lora.benchmarks.linear (shared with `nf4lora bench`).
GEMV numbers come from DRAM: weights rotate over more than 256 MB. Each row reports the machine's
ceilings measured in the same run (DRAM read GB/s, fp32 FMA GFLOP/s). Results: bench/results/.
"""
import argparse
import os

import torch

from nf4lora.benchmarks import common
from nf4lora.benchmarks.linear import forward_row, train_row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--targets", action="store_true", help="only the issue-10 target rows")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.targets:
        return run_targets(args)
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


def run_targets(args):
    import json

    import nf4lora as nl
    from nf4lora.benchmarks.targets import measure_targets
    info = nl.info()
    print(common.machine_info())
    print("CPU features:", ", ".join(k for k, v in info["cpu"]["features"].items() if v),
          f"| AMX: {info['cpu']['amx']} | threads {info['threads']}")
    rows = measure_targets(quick=args.quick)
    headers = ["target", "KxN", "M", "act", "path", "ours ms", "baseline", "baseline ms", "ratio",
               "goal", "met"]
    table = [[r["target"], r["shape"], r["M"], r["dtype"], r["path"], common.fmt(r["ours_ms"]), r["baseline"],
              common.fmt(r["baseline_ms"]), f"{r['ratio']:.2f}", f"{r['goal']:.2f}", "yes" if r["met"] else "no"]
             for r in rows]
    md = common.print_table(table, headers, f"Issue-10 targets (medians, taken in turn; DRAM read "
                                            f"{rows[0]['dram_gbs']:.1f} GB/s measured in this run)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "linear_targets.md"), "w") as f:
        f.write(f"{common.machine_info()}\n\n{md}\n")
    with open(os.path.join(args.out, "linear_targets.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
