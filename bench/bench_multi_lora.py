"""Many adapters in one batch on one NF4 layer (issue 14), CPU: nl.multi_lora_linear against PEFT's
`adapter_names` loop (a real PEFT LoraModel over a bitsandbytes Linear4bit holding the same weight,
with the same adapters) and against nf4lora's current nl.mixed_batch (QLoRALinear, a Python loop over
the distinct adapters), for a batch of M rows spread over 1, 4, 16 and 64 distinct adapters.

    python bench/bench_multi_lora.py              # K = N = 4096, M = 64, r = 16, bf16 and fp32
    python bench/bench_multi_lora.py --quick      # K = N = 512, 3 repeats: checks that it runs

Our pools hold the adapters in the activation dtype by default (PEFT's adapters are in it too;
--pool-dtype float32 for fp32 pools). Each repeat runs every method once in turn (interleaved, so drift hits all alike); the table gives
medians. Targets (issue 14): 64 distinct adapters cost <= 1.3x one adapter (ours), and ours >= 5x
faster than PEFT's loop at 64 adapters. Inference: everything under torch.inference_mode().
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import nf4lora as nl  # noqa: E402
from nf4lora.benchmarks.layer import _One, peft_bnb_layer  # noqa: E402
from nf4lora.benchmarks.linear import forward_path  # noqa: E402
from nf4lora.multi_lora import multi_lora_plan  # noqa: E402


def build(K, N, E, r, dtype, with_peft):
    """(PEFT model or None, our model for mixed_batch, pools (A, B, s), NF4Tensor): the same weight
    and the same E adapters (PEFT's random init_lora_weights=False values copied into ours)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=False)
    names = [f"a{i}" for i in range(E)]
    peft = peft_bnb_layer(linear, r, dtype) if with_peft else None
    if peft is not None:
        from peft import LoraConfig
        for n in names:
            peft.add_adapter(n, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                           init_lora_weights=False))
        peft.eval()
    ours = _One(linear)
    for n in names:  # apply_qlora registers each adapter with the model (mixed_batch needs that)
        nl.apply_qlora(ours, ["proj"], r=r, lora_alpha=2 * r, init_lora_weights=False, adapter_name=n)
    layer = ours.proj
    for n in names:
        if peft is not None:
            src = peft.base_model.model.proj
            with torch.no_grad():
                layer.lora_A[n].weight.copy_(src.lora_A[n].weight.float())
                layer.lora_B[n].weight.copy_(src.lora_B[n].weight.float())
        else:
            torch.nn.init.normal_(layer.lora_B[n].weight, std=0.01)
    ours.eval()
    A = torch.stack([layer.lora_A[n].weight.detach() for n in names]).contiguous()
    B = torch.stack([layer.lora_B[n].weight.detach() for n in names]).contiguous()
    s = torch.tensor([layer.lora_config[n]["scaling"] for n in names], dtype=torch.float32)
    return peft, ours, (A, B, s), layer.nf4_weight, names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", default="1,4,16,64")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--pool-dtype", default="act", help="dtype of our adapter pools: 'act' (the "
                    "activation dtype, as PEFT's adapters are; default), float32, bfloat16 or float16")
    ap.add_argument("--no-peft", action="store_true", help="skip the bitsandbytes + PEFT baseline")
    ap.add_argument("--quick", action="store_true", help="K = N = 512, 3 repeats (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.K = args.N = 512
        args.repeats = 3
    counts = [int(c) for c in args.adapters.split(",")]
    E = max(counts)
    print(common.machine_info())
    print(f"K = {args.K}, N = {args.N}, M = {args.M} rows, r = {args.r}, pool of {E} adapters; "
          f"median of {args.repeats} interleaved repeats")
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        t0 = time.perf_counter()
        peft, ours, (A, B, s), q, names = build(args.K, args.N, E, args.r, dtype, not args.no_peft)
        pool_dtype = dtype if args.pool_dtype == "act" else getattr(torch, args.pool_dtype)
        A, B = A.to(pool_dtype), B.to(pool_dtype)
        print(f"[{dname}] built the models in {time.perf_counter() - t0:.1f} s; our pools in "
              f"{str(pool_dtype).replace('torch.', '')}"
              + ("" if peft is not None else " (no bitsandbytes/PEFT: that column is NaN)"))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.M, args.K, generator=g).to(dtype)
        base_ms = None
        for n in counts:
            batch_names = [names[i % n] for i in range(args.M)]
            idx = torch.tensor([i % n for i in range(args.M)])
            methods = {
                "ours": lambda: nl.multi_lora_linear(x, q, A, B, idx, s),
                "mixed_batch": lambda: _mixed(ours, batch_names, x),
            }
            if peft is not None:
                methods["peft"] = lambda: peft(x, adapter_names=batch_names)
            times = {k: [] for k in methods}
            with torch.inference_mode():
                outs = {k: f() for k, f in methods.items()}  # warm-up, and the answers
                for _ in range(args.repeats):
                    for k, f in methods.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            if base_ms is None:
                base_ms = med["ours"]
            diff = {k: common.fmt(float((outs[k].float() - outs["ours"].float()).norm()
                                        / outs["ours"].float().norm())) for k in outs if k != "ours"}
            plan = multi_lora_plan(idx)
            path = (f"{forward_path(args.M, args.N, args.K, x.dtype)} + "
                    + (f"sgmv {plan['sgmv_groups']} grp" if plan["sgmv_rows"] else "")
                    + (" / " if plan["sgmv_rows"] and plan["bgmv_rows"] else "")
                    + (f"bgmv {plan['bgmv_rows']} rows" if plan["bgmv_rows"] else "") + f" ({plan['isa']})")
            rows.append([dname, n, path, common.fmt(med["ours"]), common.fmt(med["mixed_batch"]),
                         common.fmt(med.get("peft", float("nan"))),
                         common.fmt(med["ours"] / base_ms),
                         common.fmt(med.get("peft", float("nan")) / med["ours"]),
                         common.fmt(med["mixed_batch"] / med["ours"]),
                         diff.get("peft", "-"), diff["mixed_batch"]])
            print(f"  {dname} {n} adapters done", flush=True)
    common.print_table(rows, ["dtype", "adapters", "our path (base + LoRA)", "ours ms", "mixed_batch ms", "PEFT ms",
                              "ours / ours@1", "PEFT / ours", "mixed / ours", "rel diff PEFT",
                              "rel diff mixed"],
                       title="multi_lora_linear vs PEFT adapter_names vs nl.mixed_batch")
    print("targets: ours@64 / ours@1 <= 1.3; PEFT / ours >= 5 at 64 adapters")


def _mixed(model, names, x):
    with nl.mixed_batch(model, names):
        return model(x)


if __name__ == "__main__":
    main()
