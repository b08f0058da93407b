"""Cost of each adapter kind on one NF4 QLoRALinear layer (CPU), measured side by side: forward +
backward of a training step (and forward alone in eval) for LoRA, DoRA, VeRA, AdaLoRA, MoLoRA,
block-diagonal LoRA (4 blocks), PEFT's BD-LoRA (A block-diagonal, 4 blocks) and LoKr at the same rank, against the plain NF4 layer without an adapter.

    python bench/bench_adapters.py [--K 4096 --N 4096 --M 512 --r 16 --repeats 7] [--quick]

Every repeat runs each kind once in turn (drift hits all alike); the table gives median ms and the
ratio to LoRA. What to expect: DoRA adds its row norm each step (W A^T through the NF4 op on A's r
rows, an r x r Gram, O(N r^2)) and, on first use, one dense pass for ||W_n||^2; VeRA and AdaLoRA
only scale A or B before the same fused op; MoLoRA (4 experts of rank r/4, top-2) runs the NF4
base alone and its routed shrink / expand as torch ops (not fused); block-diagonal LoRA assembles
its dense A, B (block_diag) before the same fused op, so it costs LoRA's time with n x fewer
parameters; BD-LoRA likewise assembles only its block-diagonal A; LoKr is not fused: the NF4 base op, then w1 X w2^T on x viewed [M, c, d]
(O(M (c d b + a c b)) flops, no dense [N, K]).
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
from nf4lora.adapters import BdLoraConfig, BlockLoraConfig, LoKrConfig, MoloraConfig, VeraProjections  # noqa: E402


def make(kind, K, N, r):
    torch.manual_seed(0)
    layer = nl.QLoRALinear.from_linear(torch.nn.Linear(K, N), r=0)
    if kind == "lora":
        layer.add_adapter("a", r=r, lora_alpha=2 * r, init_lora_weights=False)
    elif kind == "dora":
        layer.add_adapter("a", r=r, lora_alpha=2 * r, init_lora_weights=False, use_dora=True)
    elif kind == "vera":
        proj = VeraProjections(torch.randn(r, K) * 0.05, torch.randn(N, r) * 0.05)
        layer.add_vera_adapter("a", proj, r=r, init_weights=False)
    elif kind == "adalora":
        layer.add_adalora_adapter("a", r=r, lora_alpha=2 * r, init_weights=False)
    elif kind == "molora":  # 4 experts of rank r / 4: the same adapter parameters as LoRA at r
        layer.add("a", MoloraConfig(r=max(1, r // 4), lora_alpha=2 * r, num_experts=4, top_k=2))
    elif kind == "blockdiag":
        layer.add("a", BlockLoraConfig(r=r, lora_alpha=2 * r, lora_blocks=4), init_lora_weights=False)
    elif kind == "bdlora":
        layer.add("a", BdLoraConfig(r=r, lora_alpha=2 * r, bd_side="A", nblocks=4), init_lora_weights=False)
    elif kind == "lokr":
        layer.add("a", LoKrConfig(r=r, lora_alpha=2 * r), init_weights=False)
    if kind != "none":
        layer.set_adapter("a")
    return layer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--M", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, M=128, 3 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.K, args.N, args.M, args.repeats = 1024, 1024, 128, 3
    kinds = ["none", "lora", "dora", "vera", "adalora", "molora", "blockdiag", "bdlora", "lokr"]
    layers = {k: make(k, args.K, args.N, args.r) for k in kinds}
    x = torch.randn(args.M, args.K)
    gy = torch.randn(args.M, args.N)
    times = {(k, mode): [] for k in kinds for mode in ("train", "eval")}

    def step(layer, mode):
        if mode == "train":
            layer.train()
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(gy)
        else:
            layer.eval()
            with torch.no_grad():
                layer(x)

    for i in range(args.repeats + 1):  # the first round warms up (and builds DoRA's ||W_n||^2)
        for k in kinds:
            for mode in ("train", "eval"):
                t0 = time.perf_counter()
                step(layers[k], mode)
                if i:
                    times[(k, mode)].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    n_params = {k: sum(p.numel() for p in layers[k].parameters() if p.requires_grad) for k in kinds}
    rows = [(k, n_params[k], f"{med[(k, 'train')]:.1f}", f"{med[(k, 'train')] / med[('lora', 'train')]:.2f}x",
             f"{med[(k, 'eval')]:.1f}", f"{med[(k, 'eval')] / med[('lora', 'eval')]:.2f}x") for k in kinds]
    print(f"# {common.machine_info()}; layer {args.N}x{args.K} NF4, M={args.M}, r={args.r}, fp32")
    common.print_table(rows, ["adapter", "params", "fwd+bwd ms", "vs LoRA", "fwd (eval) ms", "vs LoRA"])


if __name__ == "__main__":
    main()
