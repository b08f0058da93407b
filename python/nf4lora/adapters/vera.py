"""VeRA (PEFT's VERA): frozen random projections A [r, K_max], B [N_max, r] shared by every layer
(one VeraProjections module, a submodule of each adapted layer, so model.to() moves it once), and
per layer trainable lambda_d [r] and lambda_b [N]:
  y += lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T),   A_s = A[:, :K], B_s = B[:N]
which is the fused op with A' = lambda_d A_s, B' = lambda_b B_s and scaling 1."""
import dataclasses

import torch
from torch import nn

from . import file_fields as ff
from .base import AdapterConfig, AdapterKind, register

VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"  # the shared projections' file keys


class VeraProjections(nn.Module):
    """VeRA's frozen projections of one adapter (non-persistent buffers: they come back from
    projection_prng_key or the adapter file)."""

    def __init__(self, A, B):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)


@dataclasses.dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    d_initial: float = 0.1

    load_ignores = ("lora_dropout", "d_initial")  # d_initial only sets the initial lambda_d

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "lora_alpha", self.r)  # PEFT reports alpha = r; the term has s = 1

    @property
    def kind(self):
        return "vera"

    @property
    def scaling(self):
        return 1.0


class VeRA(AdapterKind):
    name = "vera"
    config = VeraConfig
    containers = {"vera_lambda_b": nn.ParameterDict, "vera_lambda_d": nn.ParameterDict,
                  "vera_projections": nn.ModuleDict}
    parts = ("vera_lambda_b", "vera_lambda_d")

    def create(self, layer, name, cfg, projections=None, init_weights=True, dtype=torch.float32):
        """lambda_d = d_initial, lambda_b = 0 (PEFT's init: a no-op adapter); init_weights=False:
        lambda_d ~ N(0, 1), lambda_b = 1 (PEFT's untouched values)."""
        vera_A, vera_B = projections.A, projections.B
        r = cfg.r
        if vera_A.dim() != 2 or vera_B.dim() != 2 or vera_A.shape[0] < r or vera_B.shape[1] < r \
                or vera_A.shape[1] < layer.in_features or vera_B.shape[0] < layer.out_features:
            raise ValueError(f"vera_A {tuple(vera_A.shape)} / vera_B {tuple(vera_B.shape)} are too small "
                             f"for r={r} and this layer's {layer.out_features} x {layer.in_features}")
        dev = layer.weight.device
        layer.vera_projections[name] = projections
        layer.vera_lambda_b[name] = nn.Parameter(torch.ones(layer.out_features, device=dev, dtype=dtype))
        layer.vera_lambda_d[name] = nn.Parameter(torch.randn(r, device=dev, dtype=dtype))
        if init_weights:
            with torch.no_grad():
                layer.vera_lambda_d[name].fill_(cfg.d_initial)
                layer.vera_lambda_b[name].zero_()

    def params(self, layer, name):
        return [layer.vera_lambda_b[name], layer.vera_lambda_d[name]]

    def low_rank(self, layer, name):
        P = layer.vera_projections[name]
        ld, lb = layer.vera_lambda_d[name], layer.vera_lambda_b[name]
        r = ld.shape[0]
        A_s = P.A[:r, : layer.in_features].to(device=ld.device, dtype=ld.dtype)
        B_s = P.B[: layer.out_features, :r].to(device=lb.device, dtype=lb.dtype)
        return ld[:, None] * A_s, lb[:, None] * B_s


    # ---------------------------------------------------------------- PEFT file mapping
    # VERA: <module>.vera_lambda_b [N], .vera_lambda_d [r]; with save_projection the shared
    # base_model.vera_A [r, K_max], base_model.vera_B [N_max, r] (else regenerated from the key)
    peft_type = "VERA"
    restored_fields = {"init_weights": True}

    def check_file_config(self, cfg):
        ff.common(cfg)
        ff.positive_int(cfg, "r", 256)
        ff.integer(cfg, "projection_prng_key", 0)
        ff.number(cfg, "d_initial", 0.1)
        ff.boolean(cfg, "save_projection")

    def file_config(self, c):
        return {**ff.targets_record(c), "r": c["r"], "projection_prng_key": c["projection_prng_key"],
                "save_projection": c["save_projection"], "vera_dropout": c["vera_dropout"],
                "d_initial": c["d_initial"], "init_weights": c["init_weights"], "bias": "none",
                "fan_in_fan_out": False}

    def apply_kwargs(self, cfg, trainable):
        return dict(r=cfg.get("r", 256), projection_prng_key=cfg.get("projection_prng_key", 0),
                    vera_dropout=cfg.get("vera_dropout", 0.0) or 0.0, d_initial=cfg.get("d_initial", 0.1),
                    save_projection=cfg.get("save_projection", True),
                    layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                    exclude_modules=cfg.get("exclude_modules"))

    def layer_config(self, cfg, module):
        return VeraConfig(r=cfg.get("r", 256), lora_dropout=cfg.get("vera_dropout", 0.0) or 0.0,
                          d_initial=cfg.get("d_initial", 0.1))

    def file_shapes(self, cfg, module, N, K):
        return {"vera_lambda_b": (N,), "vera_lambda_d": (cfg.get("r", 256),)}

    def model_file_shapes(self, cfg, dims, keys):
        if VERA_A not in keys and VERA_B not in keys:  # saved without: regenerated from the key
            return {}
        r = cfg.get("r", 256)
        return {VERA_A: (r, max(K for _, K in dims.values())), VERA_B: (max(N for N, _ in dims.values()), r)}

    def model_file_tensors(self, layers, name, cfg):
        if not cfg["save_projection"]:
            return {}
        P = next(iter(layers)).vera_projections[name]  # one module shared by every layer
        return {VERA_A: P.A.cpu().contiguous().clone(), VERA_B: P.B.cpu().contiguous().clone()}

    def model_mismatch(self, cfg, have, shared):
        # without saved projections the lambdas mean something only over the key's projections
        key = cfg.get("projection_prng_key", 0)
        if VERA_A not in shared and have["projection_prng_key"] != key:
            return "projection_prng_key", have["projection_prng_key"], key
        return None

    def load_model_file_tensors(self, layers, name, weights):
        if VERA_A in weights:  # the file's projections replace the regenerated ones (PEFT loads them too)
            P = next(iter(layers)).vera_projections[name]
            with torch.no_grad():
                P.A.copy_(weights[VERA_A])
                P.B.copy_(weights[VERA_B])


VERA = register(VeRA())
