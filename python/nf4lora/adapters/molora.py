"""Mixture of LoRA experts (MoLoRA): E LoRA experts on one NF4 base and a per-token softmax router.

  g = softmax(h R^T)                 R = lora_router.<a>.weight [E, K]; top_k: keep the k largest
                                     gates per token and renormalise them to sum 1 (so with
                                     top_k=1 every gate is 1 and the router learns from the
                                     load-balancing loss alone)
  u = h A^T                          A = lora_A.<a>.weight [E*r, K]: every expert's A stacked, so the
                                     shrink of all experts is one pass over h
  y += s * (u * g_rep) B^T           B = lora_B.<a>.weight [N, E*r], the experts' B side by side;
                                     g_rep repeats each gate r times; s = lora_alpha / r

(h: the adapter's input after its dropout, [.., K].) Not fused: the gates sit between the shrink and
the expand, so the term runs as torch ops after the NF4 base (the fused op's autograd returns y
only). Merging is refused: routing depends on the input. Each forward leaves the Switch-Transformer
load-balancing loss E * sum_e f_e P_e (f_e: fraction of tokens whose top gate is e, P_e: mean gate)
on the layer, for lora/molora.py's router_aux_loss.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import file_fields as ff
from .base import AdapterConfig, AdapterKind, _check_r, register


@dataclasses.dataclass(frozen=True)
class MoloraConfig(AdapterConfig):
    num_experts: int = 4
    top_k: int = None

    def __post_init__(self):
        super().__post_init__()
        _check_r(self.num_experts)
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {self.num_experts}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"top_k must be None or an int in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k!r}")

    @property
    def kind(self):
        return "molora"


def gates(logits, top_k):
    """Softmax over experts [.., E]; with top_k, the k largest kept and renormalised."""
    g = torch.softmax(logits, dim=-1)
    if top_k is not None and top_k < g.shape[-1]:
        top, idx = g.topk(top_k, dim=-1)
        g = torch.zeros_like(g).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    return g


def balance_loss(probs, g):
    """E * sum_e f_e P_e over the tokens (f_e: share of tokens whose top gate is e, P_e: mean
    softmax probability of e): 1 when balanced, E when one expert takes every token."""
    E = probs.shape[-1]
    probs, g = probs.reshape(-1, E), g.reshape(-1, E)
    f = F.one_hot(g.argmax(-1), E).to(probs.dtype).mean(0)
    return E * (f * probs.mean(0)).sum()


class MoLoRA(AdapterKind):
    name = "molora"
    config = MoloraConfig
    containers = {"lora_A": nn.ModuleDict, "lora_B": nn.ModuleDict, "lora_router": nn.ModuleDict}
    parts = ("lora_A", "lora_B", "lora_router")
    fused = False

    def create(self, layer, name, cfg, dtype=torch.float32):
        """Each expert as PEFT initialises a LoRA adapter (A kaiming-uniform(a=sqrt(5)) per expert,
        B zero: the mixture starts as a no-op); the router kaiming-uniform too."""
        dev, E, r = layer.weight.device, cfg.num_experts, cfg.r
        layer.lora_A[name] = nn.Linear(layer.in_features, E * r, bias=False, device=dev, dtype=dtype)
        layer.lora_B[name] = nn.Linear(E * r, layer.out_features, bias=False, device=dev, dtype=dtype)
        layer.lora_router[name] = nn.Linear(layer.in_features, E, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            for chunk in layer.lora_A[name].weight.view(E, r, layer.in_features):
                nn.init.kaiming_uniform_(chunk, a=math.sqrt(5))
            nn.init.zeros_(layer.lora_B[name].weight)

    def params(self, layer, name):
        return [layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_router[name].weight]

    def low_rank(self, layer, name):
        raise ValueError("a mixture of LoRA experts has no single low-rank pair (its gates depend on "
                         "the input)")

    def term(self, layer, name, h):
        cfg = layer.lora_config[name]
        A, B, R = self.params(layer, name)
        h = h.to(A.dtype)
        logits = F.linear(h, R)
        g = gates(logits, cfg.top_k)
        if torch.is_grad_enabled() or layer.training:
            layer.aux_losses[name] = balance_loss(torch.softmax(logits, dim=-1), g)
        u = F.linear(h, A)                                    # [.., E*r]: all experts, one pass
        return F.linear(u * g.repeat_interleave(cfg.r, dim=-1), B) * cfg.scaling

    def delta(self, layer, name):
        raise ValueError(f"adapter {name!r} is a mixture of LoRA experts: its weight change depends "
                         "on each token's routing, so it cannot be merged into the weight")


    # ---------------------------------------------------------------- file mapping
    # MOLORA (nf4lora's own: PEFT has no mixture of LoRA experts): <module>.lora_A.weight [E*r, K],
    # .lora_B.weight [N, E*r], .lora_router.weight [E, K]
    peft_type = "MOLORA"
    unsupported = ("fan_in_fan_out", "use_dora")

    def check_file_config(self, cfg):
        ff.common(cfg)
        ff.positive_int(cfg, "r", 8)
        ff.positive_int(cfg, "num_experts", 4)
        if cfg.get("top_k") is not None:
            ff.positive_int(cfg, "top_k", 1)
        ff.number(cfg, "lora_alpha", 16)
        ff.number(cfg, "router_aux_loss_coef", 0.01)

    def file_config(self, c):
        return {**ff.targets_record(c), **{k: c[k] for k in ("r", "lora_alpha", "num_experts", "top_k",
                                                             "router_aux_loss_coef", "lora_dropout")}}

    def apply_kwargs(self, cfg, trainable):
        return dict(num_experts=cfg.get("num_experts", 4), r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 16),
                    top_k=cfg.get("top_k"), router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01),
                    lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                    layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                    exclude_modules=cfg.get("exclude_modules"))

    def layer_config(self, cfg, module):
        return MoloraConfig(r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 16),
                            lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                            num_experts=cfg.get("num_experts", 4), top_k=cfg.get("top_k"))

    def file_shapes(self, cfg, module, N, K):
        E, r = cfg.get("num_experts", 4), cfg.get("r", 8)
        return {"lora_A.weight": (E * r, K), "lora_B.weight": (N, E * r), "lora_router.weight": (E, K)}


MOLORA = register(MoLoRA())
