"""NF4 quantize / dequantize on CPU: nf4lora vs bitsandbytes (quantize_4bit / dequantize_4bit),
bf16 in and out, blocksize 64, double quantization on (QLoRA's setting).

    python bench/bench_quant.py            # 4096x4096 and 8192x28672
    python bench/bench_quant.py --quick    # 4096x4096 only, fewer repeats

Each cell is the median of repeats after warm-up, ours and bitsandbytes measured side by side in
one run; GB/s counts the bytes a call must move (dequantize: packed + scales in, bf16 out;
quantize: bf16 in, packed + scales out). "dequantize" allocates the output per call, as users see
it: a fresh multi-MB buffer costs page faults (the OS zero-fills it), which are part of the time.
"dequantize into out=" writes into one preallocated buffer: the kernels alone.
"""
import argparse

from nf4lora.benchmarks.common import fmt_time, gbps, machine_info, print_table, save_plot
from nf4lora.benchmarks.quant import measure_quant, try_bnb_functional


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--no-bnb", action="store_true", help="ours only")
    ap.add_argument("--plot", default="bench/results/bench_quant.png", help="PNG path ('' to skip)")
    args = ap.parse_args()

    if not args.no_bnb and try_bnb_functional() is None:
        print("bitsandbytes not installed: ours only")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 28672)]
    dq = not args.no_double_quant
    bs = args.blocksize
    print(machine_info())
    print(f"blocksize {bs}, double quant {dq}, bf16 in/out\n")

    rows, labels, ours_s, bnb_s = [], [], [], []
    for (n_out, k_in) in shapes:
        r = measure_quant(n_out, k_in, bs, dq, args.repeats, args.quick, not args.no_bnb)
        for op, key, io in (("dequantize", "dequantize", r["io_deq"]),
                            ("dequantize into out=", "dequantize_out", r["io_deq"]),
                            ("quantize", "quantize", r["io_q"])):
            t_o, t_b = r["ours_" + key], r["bnb_" + key]
            ratio = f"{t_b / t_o:.1f}x" if t_b else "-"
            rows.append([r["shape"], op, fmt_time(t_o), fmt_time(t_b) if t_b else "-", ratio,
                         f"{gbps(io, t_o):.2f}", f"{gbps(2 * r['n'], t_o):.2f}"])
            labels.append(f"{op} {r['shape']}")
            ours_s.append(t_o * 1e3)
            bnb_s.append((t_b or 0) * 1e3)
    print_table(rows, ["shape", "op", "nf4lora", "bitsandbytes", "speed-up", "GB/s (all I/O)",
                       "GB/s (bf16 side)"])
    if args.plot:
        path = save_plot(args.plot, labels, {"nf4lora": ours_s, "bitsandbytes": bnb_s},
                         ylabel="ms (median, log scale)", title="NF4 on CPU, bf16", logy=True)
        if path:
            print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
