"""One QLoRA layer's training step (forward + backward: dx, dA, dB) as users build it: nf4lora's
QLoRALinear against bitsandbytes' Linear4bit wrapped by PEFT's LoRA layer, same weight, same r,
measured side by side (`nf4lora bench`; bench/bench_adapters.py compares adapter kinds instead)."""
import torch

from ..nn import QLoRALinear
from .common import time_fn


class _One(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_bnb_layer(linear, r, dtype):
    """PEFT LoRA (r, alpha 2r) over a bitsandbytes nf4 Linear4bit holding `linear`'s weight, compute
    in `dtype`. None when bitsandbytes or PEFT cannot be imported."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except Exception:  # pragma: no cover - depends on the install
        return None
    lin4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                             compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    lin4.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    lin4 = lin4.to(linear.weight.device)  # quantizes (bitsandbytes quantizes on .to())
    model = get_peft_model(_One(lin4), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                  init_lora_weights=False))
    return model.to(dtype) if dtype != torch.float32 else model


def measure_layer(K, N, M, r=16, dtype=torch.bfloat16, with_peft=True, budget=None, device="cpu"):
    """Median seconds of a training step of one layer: {"ours", "peft_bnb" (NaN if not measured),
    "flops": 4 M N K}. Activations in `dtype`; nf4lora's LoRA weights are fp32 (its kernels'
    boundary), PEFT's in `dtype`."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=False).to(device)
    ours = QLoRALinear.from_linear(linear, r=r, lora_alpha=2 * r)
    torch.nn.init.normal_(ours.lora_B_weight, std=0.01)
    x = torch.randn(M, K, device=device, dtype=dtype)
    gy = torch.randn(M, N, device=device, dtype=dtype)

    def step(layer):
        def run():
            xi = x.detach().requires_grad_()
            layer(xi).backward(gy)
        return run

    out = {"ours": time_fn(step(ours), repeats=3, budget_s=budget), "peft_bnb": float("nan"),
           "flops": 4 * M * N * K}
    if with_peft:
        peft_model = peft_bnb_layer(linear, r, dtype)
        if peft_model is not None:
            out["peft_bnb"] = time_fn(step(peft_model), repeats=3, warmup=1, budget_s=budget)
    return out
