"""LoRA (PEFT's default kind): lora_A.<a> = nn.Linear(K, r) [r, K], lora_B.<a> = nn.Linear(r, N)
[N, r]; term s * dropout(x) A^T B^T, s = alpha / r (alpha / sqrt(r) with use_rslora)."""
import math

from torch import nn

from .base import AdapterConfig, AdapterKind, register

INITS = (True, False, "gaussian")


def check_init(init_lora_weights):
    if not any(init_lora_weights is v or init_lora_weights == v for v in INITS):
        raise ValueError("init_lora_weights must be True, False or 'gaussian', got "
                         f"{init_lora_weights!r}")


class LoRA(AdapterKind):
    name = "lora"
    config = AdapterConfig
    containers = {"lora_A": nn.ModuleDict, "lora_B": nn.ModuleDict}
    parts = ("lora_A", "lora_B")

    def create(self, layer, name, cfg, init_lora_weights=True, dtype=None):
        dev = layer.weight.device
        layer.lora_A[name] = nn.Linear(layer.in_features, cfg.r, bias=False, device=dev, dtype=dtype)
        layer.lora_B[name] = nn.Linear(cfg.r, layer.out_features, bias=False, device=dev, dtype=dtype)
        self.reset(layer, name, init_lora_weights)

    def reset(self, layer, name, init_lora_weights=True):
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
        False: both kaiming-uniform (the adapter is not a no-op)."""
        check_init(init_lora_weights)
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1.0 / layer.lora_config[name].r)
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    def params(self, layer, name):
        return [layer.lora_A[name].weight, layer.lora_B[name].weight]

    def low_rank(self, layer, name):
        return layer.lora_A[name].weight, layer.lora_B[name].weight


LORA = register(LoRA())
