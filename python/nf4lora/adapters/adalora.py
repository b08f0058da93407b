"""AdaLoRA (PEFT's ADALORA), SVD-shaped: P = lora_A [r, K], the singular values lora_E [r, 1],
Q = lora_B [N, r]; y += (alpha / (r_init + 1e-5)) * dropout(x) (A * E)^T B^T, the fused op with
A' = A * E. lora/adalora.py prunes entries of E to a rank budget; r never changes (PEFT's ranknum)."""
import dataclasses

import torch
from torch import nn

from .base import AdapterConfig, AdapterKind, register


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    @property
    def kind(self):
        return "adalora"

    @property
    def scaling(self):
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.r)
        return alpha / (float(self.r) + 1e-5)


class AdaLoRA(AdapterKind):
    name = "adalora"
    config = AdaLoraConfig
    containers = {"lora_A": nn.ModuleDict, "lora_B": nn.ModuleDict, "lora_E": nn.ParameterDict}
    parts = ("lora_A", "lora_B", "lora_E")

    def create(self, layer, name, cfg, init_weights=True, dtype=torch.float32):
        """lora_A, lora_B ~ N(0, 0.02), lora_E = 0 (PEFT's init; init_weights=False leaves PEFT's
        N(0, 1) draws)."""
        dev, r = layer.weight.device, cfg.r
        layer.lora_A[name] = nn.Linear(layer.in_features, r, bias=False, device=dev, dtype=dtype)
        layer.lora_B[name] = nn.Linear(r, layer.out_features, bias=False, device=dev, dtype=dtype)
        layer.lora_E[name] = nn.Parameter(torch.randn(r, 1, device=dev, dtype=dtype))
        with torch.no_grad():
            if init_weights:
                layer.lora_E[name].zero_()
                layer.lora_A[name].weight.normal_(0.0, 0.02)
                layer.lora_B[name].weight.normal_(0.0, 0.02)
            else:
                layer.lora_A[name].weight.normal_()
                layer.lora_B[name].weight.normal_()

    def params(self, layer, name):
        return [layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_E[name]]

    def low_rank(self, layer, name):
        return layer.lora_A[name].weight * layer.lora_E[name], layer.lora_B[name].weight


ADALORA = register(AdaLoRA())
