"""PagedAdamW's step against torch.optim.AdamW (foreach, fused) and bitsandbytes' AdamW, measured
side by side (bench/bench_optim.py and `nf4lora bench`).

bench_case steps every implementation once per repeat, in turn, so a shared machine's drift hits all
of them alike; gradients rotate through several fresh sets so no step finds its grad in cache.
bytes_per_param is what one fused pass must move (param read+write, grad read, state read+write).
"""
import gc
import statistics
import sys
import time
import warnings

import torch

from ..optim import PagedAdamW
from .common import _sync

# LoRA r=16 adapters (A [16, 4096], B [4096, 16]) on the 7 projections of 32 layers of a 7B model
LORA_7B_SHAPES = [(16, 4096), (4096, 16)] * (7 * 32)


def bytes_per_param(bits):
    return 28.0 if bits == 32 else 16.0 + 8.0 / 256


def state_bytes(opt):
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 256:  # skip bnb's qmaps
                total += v.numel() * v.element_size()
    return total


def impls(include_bnb):
    out = [
        ("torch AdamW foreach", 32, lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("torch AdamW fused", 32, lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("nf4lora PagedAdamW 32-bit", 32, lambda ps: PagedAdamW(ps, optim_bits=32)),
        ("nf4lora PagedAdamW 8-bit", 8, lambda ps: PagedAdamW(ps, optim_bits=8)),
    ]
    if include_bnb:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes as bnb
            out += [("bitsandbytes AdamW 32-bit", 32, lambda ps: bnb.optim.AdamW(ps, optim_bits=32)),
                    ("bitsandbytes AdamW8bit", 8, lambda ps: bnb.optim.AdamW8bit(ps))]
        except Exception as e:  # pragma: no cover - depends on the install
            print(f"# bitsandbytes unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def bench_case(shapes, impls, warmup, repeats, n_grad_sets=3, device="cpu"):
    """Median step time of every implementation on one list of parameter shapes, measured side by
    side: each repeat steps every optimizer once, in turn, so drift on this shared machine hits all
    of them alike. Gradients rotate through n_grad_sets fresh sets (never in cache).
    Returns {name: (seconds, state bytes, bits)}; a failing implementation is reported and dropped."""
    grad_sets = [[torch.randn(s, device=device) for s in shapes] for _ in range(n_grad_sets)]
    live = {}
    for name, bits, make, reps in impls:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        try:
            opt = make(params)
        except Exception as e:  # pragma: no cover - baseline may not run here
            print(f"  {name:<28} failed: {type(e).__name__}: {e}")
            continue
        live[name] = (params, opt, bits, reps, [])
    for i in range(warmup + max(r for *_, r, _ in live.values())):
        for name, (params, opt, bits, reps, times) in list(live.items()):
            if i >= warmup + reps:
                continue
            for p, g in zip(params, grad_sets[i % n_grad_sets]):
                p.grad = g
            _sync()
            t0 = time.perf_counter()
            try:
                opt.step()
                _sync()
            except Exception as e:  # pragma: no cover
                print(f"  {name:<28} failed: {type(e).__name__}: {e}")
                del live[name]
                continue
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    out = {name: (statistics.median(t), state_bytes(opt), bits) for name, (_, opt, bits, _, t) in live.items()}
    live.clear()
    del grad_sets
    gc.collect()
    return out
