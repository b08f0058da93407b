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
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_time, gbps, machine_info, print_table, save_plot, time_fn  # noqa: E402

import nf4lora as nl  # noqa: E402
from nf4lora._native import DTYPE_CODE, _C, addr  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--plot", default="bench/results/bench_quant.png", help="PNG path ('' to skip)")
    args = ap.parse_args()

    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
        print("bitsandbytes not installed: ours only")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 28672)]
    dq = not args.no_double_quant
    bs = args.blocksize
    print(machine_info())
    print(f"blocksize {bs}, double quant {dq}, bf16 in/out\n")

    rows, labels, ours_s, bnb_s = [], [], [], []
    for (n_out, k_in) in shapes:
        big = n_out * k_in > 50_000_000
        reps = args.repeats or (3 if big else (5 if args.quick else 11))
        bnb_q_reps = 1 if big else 3   # bnb's CPU quantize runs ~0.4 s per 16M elements
        gen = torch.Generator().manual_seed(0)
        # two inputs, alternated, so the second call does not find the first one's data in cache
        ws = [torch.randn(n_out, k_in, generator=gen).to(torch.bfloat16) for _ in range(1 if big else 2)]
        n = ws[0].numel()
        q = nl.quantize_nf4(ws[0], bs, double_quant=dq)
        qs_ = [q] + ([nl.quantize_nf4(ws[1], bs, double_quant=dq)] if len(ws) > 1 else [])
        state_bytes = sum(t.numel() * t.element_size() for t in q.tensors())
        io_deq = state_bytes + 2 * n
        io_q = 2 * n + state_bytes
        cur = [0]

        def rot(seq):
            def setup():
                cur[0] = (cur[0] + 1) % len(seq)
            return setup

        shape_s = f"{n_out}x{k_in}"
        t_ours_d = time_fn(lambda: nl.dequantize_nf4(qs_[cur[0] % len(qs_)]), reps, 2, rot(qs_))
        t_ours_q = time_fn(lambda: nl.quantize_nf4(ws[cur[0] % len(ws)], bs, double_quant=dq), reps, 1,
                           rot(ws))
        # the kernel alone, into a preallocated output (what a consumer that reuses its buffer sees;
        # no page faults): ours through the raw _C launcher, bnb through dequantize_4bit(out=) where
        # it has one
        out = torch.empty(n_out, k_in, dtype=torch.bfloat16)
        out.zero_()

        def ours_into():
            qq = qs_[cur[0] % len(qs_)]
            nested = qq.double_quant
            _C.nf4_dequantize(qq.packed.data_ptr(), 0 if nested else qq.absmax.data_ptr(),
                              qq.absmax.data_ptr() if nested else 0, addr(qq.absmax2),
                              addr(qq.code8), qq.offset, n, bs, out.data_ptr(),
                              DTYPE_CODE[torch.bfloat16], "fast")
        t_ours_d2 = time_fn(ours_into, reps, 2, rot(qs_))
        t_bnb_d = t_bnb_q = t_bnb_d2 = None
        if F is not None:
            states = [F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
                      for w in ws]
            t_bnb_d = time_fn(lambda: F.dequantize_4bit(*states[cur[0] % len(states)]), reps, 1,
                              rot(states))
            try:  # bnb 0.50 has no CPU kernel for dequantize_4bit.out
                t_bnb_d2 = time_fn(lambda: F.dequantize_4bit(*states[cur[0] % len(states)], out=out),
                                   reps, 1, rot(states))
            except NotImplementedError:
                t_bnb_d2 = None
            del states
            t_bnb_q = time_fn(lambda: F.quantize_4bit(ws[cur[0] % len(ws)], blocksize=bs,
                                                      quant_type="nf4", compress_statistics=dq),
                              bnb_q_reps, 1, rot(ws))
        del out
        for op, t_o, t_b, io in (("dequantize", t_ours_d, t_bnb_d, io_deq),
                                 ("dequantize into out=", t_ours_d2, t_bnb_d2, io_deq),
                                 ("quantize", t_ours_q, t_bnb_q, io_q)):
            ratio = f"{t_b / t_o:.1f}x" if t_b else "-"
            rows.append([shape_s, op, fmt_time(t_o), fmt_time(t_b) if t_b else "-", ratio,
                         f"{gbps(io, t_o):.2f}", f"{gbps(2 * n, t_o):.2f}"])
            labels.append(f"{op} {shape_s}")
            ours_s.append(t_o * 1e3)
            bnb_s.append((t_b or 0) * 1e3)
        del ws, qs_, q
    print_table(rows, ["shape", "op", "nf4lora", "bitsandbytes", "speed-up", "GB/s (all I/O)",
                       "GB/s (bf16 side)"])
    if args.plot:
        path = save_plot(args.plot, labels, {"nf4lora": ours_s, "bitsandbytes": bnb_s},
                         ylabel="ms (median, log scale)", title="NF4 on CPU, bf16", logy=True)
        if path:
            print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
