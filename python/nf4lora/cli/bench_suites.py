"""The suites of `nf4lora bench`, each a list of cases over nf4lora.benchmarks (the same measuring
code as the bench/ scripts). A case returns records: one per (measurement, baseline), with
ours_ms, baseline_ms, ratio = baseline_ms / ours_ms (> 1: nf4lora is faster), a rate (GB/s or
GFLOP/s) and its % of the machine limit measured at the start of the run."""
import math

import torch

from ..benchmarks.layer import measure_layer
from ..benchmarks.linear import int4pack_available, measure_forward
from ..benchmarks.optim import LORA_7B_SHAPES, bench_case, bytes_per_param, impls
from ..benchmarks.quant import measure_quant

SUITES = ("quant", "linear", "layer", "optim")
LINEAR_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): LLaMA-7B layers
LARGE_SHAPE = (8192, 28672)                                   # LLaMA-70B MLP


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def record(op, shape, dtype, device, ours_s, baseline, base_s, rate=None, unit=None, limit=None):
    ok = base_s is not None and not math.isnan(base_s)
    return {"op": op, "shape": shape, "dtype": _dt(dtype), "device": device, "ours_ms": ours_s * 1e3,
            "baseline": baseline, "baseline_ms": base_s * 1e3 if ok else None,
            "ratio": base_s / ours_s if ok else None, "rate": rate, "unit": unit,
            "pct_of_limit": 100 * rate / limit if rate and limit and not math.isnan(limit) else None}


def flops_limit(limits, dtype):
    """The compute ceiling for rows of this activation dtype: dense bf16 matmul for bf16 (AMX /
    AVX512-BF16 on such CPUs), fp32 FMA peak otherwise."""
    return limits.get("bf16_gflops", limits["flops_gflops"]) if dtype == torch.bfloat16 else limits["flops_gflops"]


def quant_cases(cfg):
    shapes = [(4096, 4096)] + ([LARGE_SHAPE[::-1]] if cfg["large"] else [])

    def case(n_out, k_in):
        def run():
            r = measure_quant(n_out, k_in, quick=cfg["quick"], device=cfg["device"])
            out = []
            for op, key, io in (("quantize", "quantize", r["io_q"]), ("dequantize", "dequantize", r["io_deq"])):
                out.append(record(op, r["shape"], torch.bfloat16, cfg["device"], r["ours_" + key],
                                  "bitsandbytes", r["bnb_" + key], io / r["ours_" + key] / 1e9, "GB/s",
                                  cfg["limits"]["mem_gbps"]))
            return out
        return f"quant {n_out}x{k_in}", run
    return [case(*s) for s in shapes]


def linear_cases(cfg):
    shapes = LINEAR_SHAPES[:1] if cfg["quick"] else list(LINEAR_SHAPES)
    if cfg["large"]:
        shapes.append(LARGE_SHAPE)
    ms = [1, 16, 256] if cfg["quick"] else [1, 16, 256, 2048]
    budget = 2.0 if cfg["quick"] else 10.0
    dev, lim = cfg["device"], cfg["limits"]

    def case(K, N, M, dtype):
        def run():
            r = measure_forward(K, N, M, dtype, with_bnb=M <= 16, budget=budget,
                                with_int4=int4pack_available(dev), device=dev)
            op = "gemv" if M <= 16 else "gemm"
            shape = f"M={M} K={K} N={N}"
            small = M <= 16
            rate = r["nf4_bytes"] / r["nolora"] / 1e9 if small else r["flops"] / r["nolora"] / 1e9
            unit, limit = ("GB/s", lim["mem_gbps"]) if small else ("GFLOP/s", flops_limit(lim, dtype))
            dense = "dense_bf16" if dtype == torch.bfloat16 else "dense_fp32"
            name = "torch dense matmul (cuBLAS)" if dev.startswith("cuda") else "torch dense matmul"
            out = [record(op, shape, dtype, dev, r["nolora"], f"{name} {_dt(dtype)} weight", r[dense],
                          rate, unit, limit)]
            if not math.isnan(r["int4"]):
                out.append(record(op, shape, dtype, dev, r["nolora"], "torch int4 (_weight_int4pack_mm, g64)",
                                  r["int4"], rate, unit, limit))
            if not math.isnan(r["bnb"]):
                out.append(record(op + "+lora", shape, dtype, dev, r["ours"], "bitsandbytes matmul_4bit + LoRA",
                                  r["bnb"], rate, unit, limit))
            for o in out:
                o["path"] = r["path"]
            return out
        return f"linear {K}x{N} M={M}", run
    return [case(K, N, M, d) for d in cfg["dtypes"] for K, N in shapes for M in ms]


def layer_cases(cfg):
    shapes = [(4096, 4096, 256)] if cfg["quick"] else [(4096, 4096, 512), (4096, 11008, 512)]
    dev = cfg["device"]

    def case(K, N, M, dtype):
        def run():
            r = measure_layer(K, N, M, dtype=dtype, budget=2.0 if cfg["quick"] else 10.0, device=dev)
            rate = r["flops"] / r["ours"] / 1e9
            return [record("qlora layer fwd+bwd", f"M={M} K={K} N={N} r=16", dtype, dev, r["ours"],
                           "bitsandbytes Linear4bit + PEFT LoRA", r["peft_bnb"], rate, "GFLOP/s",
                           flops_limit(cfg["limits"], dtype))]
        return f"layer {K}x{N} M={M}", run
    return [case(K, N, M, d) for d in cfg["dtypes"] for K, N, M in shapes]


def optim_cases(cfg):
    cases = [("1M", [(1_000_000,)]), ("LoRA 64 tensors", LORA_7B_SHAPES[:64])] if cfg["quick"] else \
        [("10M", [(10_000_000,)]), ("LoRA 448 tensors (7B, r=16)", LORA_7B_SHAPES)]
    reps = 3 if cfg["quick"] else 11
    dev = cfg["device"]

    def case(label, shapes):
        def run():
            want = {"torch AdamW fused", "nf4lora PagedAdamW 32-bit", "nf4lora PagedAdamW 8-bit"}
            chosen = [(n, b, mk, reps) for n, b, mk in impls(False) if n in want]
            res = bench_case([tuple(s) for s in shapes], chosen, warmup=2, repeats=reps, device=dev)
            base = res.get("torch AdamW fused", (float("nan"),))[0]
            n = sum(math.prod(s) for s in shapes)
            return [record(f"adamw step {bits}-bit state", label, torch.float32, dev, t, "torch AdamW fused",
                           base, n * bytes_per_param(bits) / t / 1e9, "GB/s", cfg["limits"]["mem_gbps"])
                    for name, (t, _, bits) in res.items() if name.startswith("nf4lora")]
        return f"optim {label}", run
    return [case(*c) for c in cases]


BUILDERS = {"quant": quant_cases, "linear": linear_cases, "layer": layer_cases, "optim": optim_cases}
