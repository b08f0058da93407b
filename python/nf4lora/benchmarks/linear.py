"""The fused QLoRA linear on the CPU (or any device torch runs): nf4lora vs torch dense F.linear
(fp32 and bf16 weight), bitsandbytes' matmul_4bit + PEFT-style separate LoRA matmuls and, on the
CPU, torch's own int4 weight-only kernel (aten._weight_int4pack_mm_for_cpu, groupsize 64), side by
side. bench/bench_linear.py prints its tables from forward_row / train_row; `nf4lora bench` records
measure_forward / measure_train.

Small-M (GEMV) cases read W from DRAM: weights rotate over more than ROTATE_BYTES.
"""
import math

import torch
import torch.nn.functional as F

from .. import nf4_linear, qlora_linear, quantize_nf4
from .._native import DTYPE_CODE, _C
from .common import Rotating, time_fn

R = 16
ROTATE_BYTES = 256 << 20
INT4_GROUPSIZE = 64


def copies_for(nbytes, small_m):
    return max(2, -(-ROTATE_BYTES // nbytes)) if small_m else 1


def try_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bF
        return bnb, bF
    except Exception:  # pragma: no cover
        return None, None


def int4pack_weight(w, groupsize=INT4_GROUPSIZE):
    """w [N, K] as torch's int4 CPU kernel wants it: asymmetric 4-bit per group of `groupsize`
    along K. Returns (packed, scales_and_zeros [K/groupsize, N, 2] bf16) for
    torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, packed, groupsize, scales_and_zeros)."""
    N, K = w.shape
    g = w.float().reshape(N, K // groupsize, groupsize)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = lo + 8 * scale  # torch's int4 dequant: (q - 8) * scale + zero
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16)


def int4pack_available(device="cpu"):
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def make_case(K, N, M, dtype, small_m, with_bnb, device="cpu"):
    g = torch.Generator().manual_seed(K + N)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device)
    q = quantize_nf4(w, 64, double_quant=True)
    qs = Rotating([q] + [q.clone() for _ in range(copies_for(q.nbytes, small_m) - 1)])
    w32 = Rotating([w] + [w.clone() for _ in range(copies_for(w.numel() * 4, small_m) - 1)])
    wbf = w.bfloat16()
    w16 = Rotating([wbf] + [wbf.clone() for _ in range(copies_for(w.numel() * 2, small_m) - 1)])
    A = (torch.randn(R, K, generator=g) * 0.01).to(device)
    B = (torch.randn(N, R, generator=g) * 0.01).to(device)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    bnbq = None
    if with_bnb:
        bnb, bF = try_bnb()
        if bnb is not None:
            packed, state = bF.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4",
                                             compress_statistics=True)
            bnbq = (bnb, packed, state)
    return q, qs, w32, w16, A, B, x, bnbq


def measure_forward(K, N, M, dtype, with_bnb, budget, with_int4=False, device="cpu"):
    """Median seconds of one forward at (K, N, M). Returns a dict: ours (qlora_linear, r=16 fused),
    nolora (nf4_linear), dense_fp32, dense_bf16, bnb (matmul_4bit + separate LoRA matmuls) and
    int4 (torch's int4 CPU kernel on bf16 activations); NaN where not measured; plus nf4_bytes,
    flops (2 M N K) and path (the kernel path the dispatcher names for this shape)."""
    small_m = M <= 16
    q, qs, w32, w16, A, B, x, bnbq = make_case(K, N, M, dtype, small_m, with_bnb, device)
    s = 2.0
    r = {"bnb": float("nan"), "int4": float("nan")}
    with torch.no_grad():
        r["ours"] = time_fn(lambda: qlora_linear(x, qs.next(), A, B, s), repeats=7, budget_s=budget)
        r["nolora"] = time_fn(lambda: nf4_linear(x, qs.next()), repeats=7, budget_s=budget)
        xf = x.float()
        r["dense_fp32"] = time_fn(lambda: F.linear(xf, w32.next()), repeats=7, budget_s=budget)
        xb = x.bfloat16()
        r["dense_bf16"] = time_fn(lambda: F.linear(xb, w16.next()), repeats=3, budget_s=budget)
        if bnbq is not None:
            bnb, packed, state = bnbq
            At, Bt = A.to(dtype), B.to(dtype)
            r["bnb"] = time_fn(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
                               + (x @ At.t()) @ Bt.t() * s, repeats=3, warmup=1, budget_s=budget)
        if with_int4 and int4pack_available(device) and K % INT4_GROUPSIZE == 0:
            first = int4pack_weight(w32.items[0])
            n_copies = copies_for(first[0].numel() * first[0].element_size(), small_m)
            packs = Rotating([first] + [tuple(t.clone() for t in first) for _ in range(n_copies - 1)])
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu

            def int4():
                p, sz = packs.next()
                return mm(xb, p, INT4_GROUPSIZE, sz)
            r["int4"] = time_fn(int4, repeats=7, budget_s=budget)
    r.update(nf4_bytes=q.nbytes, flops=2 * M * N * K,
             path=forward_path(M, N, K, dtype) if torch.device(device).type == "cpu" else "cuda")
    return r


def forward_path(M, N, K, dtype=torch.float32):
    """The CPU dispatcher's name for the forward kernel at this shape and activation dtype (whatever
    it reports)."""
    fn = getattr(_C, "forward_path", None)
    return fn(M, N, K, DTYPE_CODE[dtype]) if fn is not None else "-"


def forward_row(K, N, M, dtype, peak, dram, with_bnb, budget):
    """One row of bench_linear.py's forward table."""
    r = measure_forward(K, N, M, dtype, with_bnb, budget)
    small_m = M <= 16
    t_ours, t_nolora, t_d32 = r["ours"], r["nolora"], r["dense_fp32"]
    q_gbs, flops = r["nf4_bytes"] / t_nolora / 1e9, r["flops"]
    return [f"{K}x{N}", M, str(dtype).replace("torch.", ""), r["path"],
            t_ours * 1e3, t_nolora * 1e3, q_gbs, flops / t_nolora / 1e9,
            t_d32 * 1e3, r["dense_bf16"] * 1e3, r["bnb"] * 1e3, t_d32 / t_nolora, r["bnb"] / t_ours,
            100 * q_gbs / dram if small_m else 100 * flops / t_nolora / 1e9 / peak]


def measure_train(K, N, M, dtype, with_bnb, budget, device="cpu"):
    """Median seconds of forward + backward (dx, dA, dB; r=16) at (K, N, M): ours (qlora_linear),
    dense_fp32 (F.linear + LoRA matmuls, fp32) and bnb (matmul_4bit + LoRA matmuls, PEFT's way, in
    `dtype`; NaN unless with_bnb). flops = 4 M N K (forward + dx; W is frozen)."""
    q, _, w32, w16, A, B, x, bnbq = make_case(K, N, M, dtype, False, with_bnb, device)
    s = 2.0
    dy = torch.randn(M, N).to(device=device, dtype=dtype)

    def ours():
        xi = x.detach().requires_grad_()
        Ai, Bi = A.detach().requires_grad_(), B.detach().requires_grad_()
        qlora_linear(xi, q, Ai, Bi, s).backward(dy)

    def dense(wr, cast):
        def run():
            xi = x.detach().to(cast).requires_grad_()
            Ai, Bi = A.detach().to(cast).requires_grad_(), B.detach().to(cast).requires_grad_()
            (F.linear(xi, wr.next()) + (xi @ Ai.t()) @ Bi.t() * s).backward(dy.to(cast))
        return run

    r = {"ours": time_fn(ours, repeats=3, budget_s=budget),
         "dense_fp32": time_fn(dense(w32, torch.float32), repeats=3, budget_s=budget),
         "bnb": float("nan"), "flops": 4 * M * N * K}
    if bnbq is not None:
        bnb, packed, state = bnbq

        def peft():
            xi = x.detach().requires_grad_()
            Ai, Bi = A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_()
            (bnb.matmul_4bit(xi, packed.t(), quant_state=state) + (xi @ Ai.t()) @ Bi.t() * s).backward(dy)
        r["bnb"] = time_fn(peft, repeats=1, warmup=0, budget_s=budget)
    return r


def train_row(K, N, M, dtype, with_bnb, budget):
    """One row of bench_linear.py's forward + backward table."""
    r = measure_train(K, N, M, dtype, with_bnb, budget)
    t_ours, t_d32, t_bnb = r["ours"], r["dense_fp32"], r["bnb"]
    return [f"{K}x{N}", M, str(dtype).replace("torch.", ""), t_ours * 1e3, r["flops"] / t_ours / 1e9,
            t_d32 * 1e3, t_d32 / t_ours, t_bnb * 1e3, t_bnb / t_ours]


def gflops(flops, seconds):
    return flops / seconds / 1e9 if seconds and not math.isnan(seconds) else float("nan")
