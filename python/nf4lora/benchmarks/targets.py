"""The CPU targets of the fused linear (issue 10), measured side by side: each row times nf4lora and
its baseline in turn within every repeat (so a slow moment of a shared machine hits both), reports
medians, the ratio and the kernel path, and the DRAM read bandwidth measured in the same run.

    rows = measure_targets(quick=False)     # list of dicts (bench/bench_linear.py --targets)

Rows: bf16 forward at M = 512 vs dense bf16 F.linear; the bf16 QLoRA layer forward + backward
(dx, dA, dB; r = 16) at M = 512 vs bitsandbytes Linear4bit + PEFT-style LoRA and vs dense bf16 +
LoRA; bf16 forward at M = 16 vs dense bf16; M = 1 vs torch's int4 CPU kernel (groupsize 64) and
as a share of DRAM bandwidth; fp32 forward at M = 512 vs dense fp32.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from .. import nf4_linear, qlora_linear
from .._native import DTYPE_CODE, _C
from .common import Rotating, dram_read_gbps
from .layer import peft_bnb_layer
from .linear import INT4_GROUPSIZE, copies_for, int4pack_available, int4pack_weight, make_case

R = 16
SCALING = 2.0


def time_interleaved(fns, repeats, warmup=1, budget_s=None):
    """Median seconds of each fn in `fns` (name -> callable), calling them in turn within every
    repeat, so machine noise spreads over all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in samples.items()}


def _row(target, shape, M, dtype, ours_ms, base_name, base_ms, goal, path, **extra):
    ratio = base_ms / ours_ms if ours_ms > 0 else float("nan")
    return dict(target=target, shape=shape, M=M, dtype=str(dtype).replace("torch.", ""), path=path,
                ours_ms=ours_ms, baseline=base_name, baseline_ms=base_ms, ratio=ratio, goal=goal,
                met=bool(ratio >= goal), **extra)


def forward_vs_dense(K, N, M, dtype, repeats, goal, target):
    q, qs, w32, w16, _, _, x, _ = make_case(K, N, M, dtype, M <= 16, False)
    ws = w16 if dtype == torch.bfloat16 else w32
    with torch.no_grad():
        t = time_interleaved({"ours": lambda: nf4_linear(x, qs.next()),
                              "dense": lambda: F.linear(x, ws.next())}, repeats)
    return _row(target, f"{K}x{N}", M, dtype, t["ours"] * 1e3, f"dense {str(dtype)[6:]} F.linear",
                t["dense"] * 1e3, goal, _C.forward_path(M, N, K, DTYPE_CODE[dtype]),
                nf4_gbs=q.nbytes / t["ours"] / 1e9)


def layer_fwd_bwd(K, N, M, repeats):
    """bf16 QLoRA layer forward + backward (dx, dA, dB) vs bitsandbytes Linear4bit under PEFT's LoRA
    layer (layer.peft_bnb_layer) and vs dense bf16 + LoRA, on the same weight."""
    q, _, w32, w16, A, B, x, _ = make_case(K, N, M, torch.bfloat16, False, False)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(M)).bfloat16()
    wb = w16.items[0]

    def ours():
        xi, Ai, Bi = x.detach().requires_grad_(), A.detach().requires_grad_(), B.detach().requires_grad_()
        qlora_linear(xi, q, Ai, Bi, SCALING).backward(dy)

    def dense():  # PEFT's LoRA arithmetic on a dense bf16 weight: lora_B(lora_A(x)) * s in bf16
        xi = x.detach().requires_grad_()
        Ai, Bi = A.bfloat16().requires_grad_(), B.bfloat16().requires_grad_()
        (F.linear(xi, wb) + (xi @ Ai.t()) @ Bi.t() * SCALING).backward(dy)

    fns = {"ours": ours, "dense": dense}
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w32.items[0]
    peft_model = peft_bnb_layer(linear, R, torch.bfloat16)  # alpha 2r: the same scaling 2
    if peft_model is not None:
        def bnb():
            peft_model(x.detach().requires_grad_()).backward(dy)
        fns["bnb"] = bnb
    t = time_interleaved(fns, repeats)
    path = f"{_C.forward_path(M, N, K, DTYPE_CODE[torch.bfloat16])} / {_C.backward_path(M, N, K, DTYPE_CODE[torch.bfloat16])}"
    rows = [_row("bf16 QLoRA layer fwd+bwd >= 1.0x dense bf16 + LoRA", f"{K}x{N}", M, torch.bfloat16,
                 t["ours"] * 1e3, "dense bf16 + LoRA", t["dense"] * 1e3, 1.0, path)]
    if "bnb" in t:
        rows.append(_row("bf16 QLoRA layer fwd+bwd >= 1.5x bitsandbytes + PEFT", f"{K}x{N}", M, torch.bfloat16,
                         t["ours"] * 1e3, "bnb Linear4bit + PEFT LoRA", t["bnb"] * 1e3, 1.5, path))
    return rows


def gemv_vs_int4(K, N, repeats, dram):
    q, qs, w32, _, _, _, x, _ = make_case(K, N, 1, torch.bfloat16, True, False)
    w = w32.items[0]
    fns = {"ours": lambda: nf4_linear(x, qs.next())}
    if int4pack_available() and K % INT4_GROUPSIZE == 0:
        first = int4pack_weight(w)
        n = copies_for(first[0].numel() * first[0].element_size(), True)
        packs = Rotating([first] + [tuple(t.clone() for t in first) for _ in range(n - 1)])

        def int4():
            p, sz = packs.next()
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, INT4_GROUPSIZE, sz)
        fns["int4"] = int4
    with torch.no_grad():
        t = time_interleaved(fns, repeats)
    gbs = q.nbytes / t["ours"] / 1e9
    path = _C.forward_path(1, N, K, DTYPE_CODE[torch.bfloat16])
    rows = []
    if "int4" in t:
        rows.append(_row("M=1 bf16 >= 1.3x torch int4 (groupsize 64)", f"{K}x{N}", 1, torch.bfloat16,
                         t["ours"] * 1e3, "aten._weight_int4pack_mm_for_cpu", t["int4"] * 1e3, 1.3, path,
                         nf4_gbs=gbs))
    rows.append(dict(target="M=1 bf16 >= 70% of DRAM read bandwidth", shape=f"{K}x{N}", M=1, dtype="bfloat16",
                     path=path, ours_ms=t["ours"] * 1e3, baseline=f"DRAM read {dram:.1f} GB/s (this run)",
                     baseline_ms=float("nan"), ratio=gbs / dram, goal=0.7, met=bool(gbs / dram >= 0.7),
                     nf4_gbs=gbs))
    return rows


def measure_targets(quick=False):
    """Every issue-10 target row, measured now (minutes; quick: fewer repeats)."""
    rep_big, rep_small = (5, 30) if quick else (11, 60)
    dram = dram_read_gbps()
    rows = []
    for K, N in ((4096, 4096),) if quick else ((4096, 4096), (4096, 11008)):
        rows.append(forward_vs_dense(K, N, 512, torch.bfloat16, rep_big, 1.0, "bf16 forward M=512 >= 1.0x dense bf16"))
    rows += layer_fwd_bwd(4096, 4096, 512, rep_big)
    rows.append(forward_vs_dense(4096, 4096, 16, torch.bfloat16, rep_small, 1.5, "bf16 forward M=16 >= 1.5x dense bf16"))
    rows += gemv_vs_int4(4096, 4096, rep_small, dram)
    rows.append(forward_vs_dense(4096, 4096, 512, torch.float32, rep_big, 0.9, "fp32 forward M=512 >= 0.9x dense fp32"))
    for r in rows:
        r["dram_gbs"] = dram
    return rows
