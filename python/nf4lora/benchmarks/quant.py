"""NF4 quantize / dequantize: nf4lora vs bitsandbytes (quantize_4bit / dequantize_4bit), measured
side by side. bench/bench_quant.py prints its table from measure_quant; `nf4lora bench` records it.

GB/s counts the bytes a call must move (dequantize: packed + scales in, output out; quantize: input
in, packed + scales out). "dequantize" allocates its output per call as users see it (a fresh
multi-MB buffer costs page faults); "dequantize into out=" writes one preallocated buffer: the
kernels alone.
"""
import torch

from .. import dequantize_nf4, quantize_nf4
from .._native import DTYPE_CODE, _C, nf4_state_args
from .common import time_fn


def try_bnb_functional():
    try:
        import bitsandbytes.functional as F
        return F
    except Exception:  # pragma: no cover - depends on the install
        return None


def measure_quant(n_out, k_in, blocksize=64, double_quant=True, repeats=None, quick=False,
                  with_bnb=True, device="cpu", dtype=torch.bfloat16):
    """Median seconds of each op on one [n_out, k_in] weight. Returns a dict: shape, n, io_deq,
    io_q (bytes moved), and ours_dequantize, ours_dequantize_out, ours_quantize, bnb_dequantize,
    bnb_dequantize_out, bnb_quantize (seconds; None where not measured)."""
    big = n_out * k_in > 50_000_000
    reps = repeats or (3 if big else (5 if quick else 11))
    bnb_q_reps = 1 if big else 3   # bnb's CPU quantize runs ~0.4 s per 16M elements
    F = try_bnb_functional() if with_bnb else None
    bs, dq = blocksize, double_quant
    gen = torch.Generator().manual_seed(0)
    # two inputs, alternated, so the second call does not find the first one's data in cache
    ws = [torch.randn(n_out, k_in, generator=gen).to(device=device, dtype=dtype)
          for _ in range(1 if big else 2)]
    n = ws[0].numel()
    qs_ = [quantize_nf4(w, bs, double_quant=dq) for w in ws]
    state_bytes = qs_[0].nbytes
    cur = [0]

    def rot(seq):
        def setup():
            cur[0] = (cur[0] + 1) % len(seq)
        return setup

    r = {"shape": f"{n_out}x{k_in}", "n": n, "io_deq": state_bytes + ws[0].element_size() * n,
         "io_q": ws[0].element_size() * n + state_bytes}
    r["ours_dequantize"] = time_fn(lambda: dequantize_nf4(qs_[cur[0] % len(qs_)]), reps, 2, rot(qs_))
    r["ours_quantize"] = time_fn(lambda: quantize_nf4(ws[cur[0] % len(ws)], bs, double_quant=dq),
                                 reps, 1, rot(ws))
    out = torch.empty(n_out, k_in, dtype=dtype, device=device)
    out.zero_()
    r["ours_dequantize_out"] = None
    if device == "cpu" or torch.device(device).type == "cpu":
        def ours_into():  # the kernel alone, through the raw launcher
            qq = qs_[cur[0] % len(qs_)]
            _C.nf4_dequantize(*nf4_state_args(qq.packed, qq.absmax, qq.absmax2, qq.code8,
                                              qq.offset, bs), n, out.data_ptr(),
                              DTYPE_CODE[dtype], "fast")
        r["ours_dequantize_out"] = time_fn(ours_into, reps, 2, rot(qs_))
    r["bnb_dequantize"] = r["bnb_quantize"] = r["bnb_dequantize_out"] = None
    if F is not None:
        states = [F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq) for w in ws]
        r["bnb_dequantize"] = time_fn(lambda: F.dequantize_4bit(*states[cur[0] % len(states)]), reps, 1,
                                      rot(states))
        try:  # bnb 0.50 has no CPU kernel for dequantize_4bit.out
            r["bnb_dequantize_out"] = time_fn(lambda: F.dequantize_4bit(*states[cur[0] % len(states)],
                                                                        out=out), reps, 1, rot(states))
        except NotImplementedError:
            pass
        del states
        r["bnb_quantize"] = time_fn(lambda: F.quantize_4bit(ws[cur[0] % len(ws)], blocksize=bs,
                                                            quant_type="nf4", compress_statistics=dq),
                                    bnb_q_reps, 1, rot(ws))
    return r
