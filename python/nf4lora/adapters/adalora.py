"""AdaLoRA (PEFT's ADALORA), SVD-shaped: P = lora_A [r, K], the singular values lora_E [r, 1],
Q = lora_B [N, r]; y += (alpha / (r_init + 1e-5)) * dropout(x) (A * E)^T B^T, the fused op with
A' = A * E. lora/adalora.py prunes entries of E to a rank budget; r never changes (PEFT's ranknum)."""
import dataclasses

import torch
from torch import nn

from . import file_fields as ff
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


    # ---------------------------------------------------------------- PEFT file mapping
    # ADALORA: <module>.lora_A [k, K], .lora_B [N, k], .lora_E [k, 1] (no ".weight": PEFT's are
    # parameter containers) holding only the k ranks the config's rank_pattern keeps (all init_r
    # without one); they go back to their positions in the init_r-sized tensors, the pruned ranks
    # zero (E = 0 is what pruning means), so the scaling alpha / init_r stays PEFT's
    peft_type = "ADALORA"
    unsupported = ("fan_in_fan_out", "use_dora")
    restored_fields = {"rank_pattern": None, "init_lora_weights": True}

    def suffix(self, part):
        return part

    def check_file_config(self, cfg):
        ff.common(cfg)
        ff.positive_int(cfg, "init_r", 12)
        ff.positive_int(cfg, "target_r", 8)
        ff.number(cfg, "lora_alpha", 8)
        rp = cfg.get("rank_pattern")
        if rp is not None and not (isinstance(rp, dict) and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in rp.values())):
            raise ValueError("rank_pattern must map module keys to lists of booleans")

    def file_config(self, c):
        return {**ff.targets_record(c), "r": 8, "init_r": c["init_r"], "target_r": c["target_r"],
                "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"], "tinit": c["tinit"],
                "tfinal": c["tfinal"], "deltaT": c["deltaT"], "beta1": c["beta1"], "beta2": c["beta2"],
                "orth_reg_weight": c["orth_reg_weight"], "total_step": c["total_step"],
                "rank_pattern": c["rank_pattern"], "init_lora_weights": c["init_lora_weights"], "bias": "none",
                "fan_in_fan_out": False, "use_dora": False, "use_rslora": False}

    def apply_kwargs(self, cfg, trainable):
        return dict(init_r=cfg.get("init_r", 12), target_r=cfg.get("target_r", 8),
                    lora_alpha=cfg.get("lora_alpha", 8), lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                    tinit=cfg.get("tinit", 0), tfinal=cfg.get("tfinal", 0), deltaT=cfg.get("deltaT", 1),
                    beta1=cfg.get("beta1", 0.85), beta2=cfg.get("beta2", 0.85),
                    orth_reg_weight=cfg.get("orth_reg_weight", 0.5), total_step=cfg.get("total_step"),
                    layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                    exclude_modules=cfg.get("exclude_modules"), inference_mode=not trainable)

    def layer_config(self, cfg, module):
        return AdaLoraConfig(r=cfg.get("init_r", 12), lora_alpha=cfg.get("lora_alpha", 8),
                             lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0)

    @staticmethod
    def _keep(cfg, module):
        """[init_r] bool: the ranks the config's rank_pattern keeps for `module`."""
        init_r = cfg.get("init_r", 12)
        mask = (cfg.get("rank_pattern") or {}).get(f"{module}.lora_E")
        if mask is None:
            mask = [True] * init_r
        if len(mask) != init_r:
            raise ValueError(f"adapter_config.json rank_pattern['{module}.lora_E'] has {len(mask)} entries, "
                             f"init_r is {init_r}")
        return torch.tensor(mask, dtype=torch.bool)

    def file_shapes(self, cfg, module, N, K):
        k = int(self._keep(cfg, module).sum())
        return {"lora_A": (k, K), "lora_B": (N, k), "lora_E": (k, 1)}

    def model_file_shapes(self, cfg, dims, keys):
        extra = set(cfg.get("rank_pattern") or {}) - {f"{n}.lora_E" for n in dims}
        if extra:
            raise ValueError(f"adapter_config.json rank_pattern names modules the config does not target: "
                             f"{sorted(extra)[:3]}")
        return {}

    def file_tensors(self, layer, name, cfg, module):
        keep = self._keep(cfg, module)
        A, B, E = (t.detach().cpu() for t in self.params(layer, name))
        return {"lora_A": A[keep].contiguous(), "lora_B": B[:, keep].contiguous(), "lora_E": E[keep].contiguous()}

    def load_file_tensors(self, layer, name, tensors, cfg, module):
        A, B, E = self.params(layer, name)
        m = self._keep(cfg, module).to(A.device)
        with torch.no_grad():
            A.zero_(), B.zero_(), E.zero_()
            A[m] = tensors["lora_A"].to(A.device, A.dtype)
            B[:, m] = tensors["lora_B"].to(B.device, B.dtype)
            E[m] = tensors["lora_E"].to(E.device, E.dtype)


ADALORA = register(AdaLoRA())
