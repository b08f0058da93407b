"""LoRA (PEFT's default kind): lora_A.<a> = nn.Linear(K, r) [r, K], lora_B.<a> = nn.Linear(r, N)
[N, r]; term s * dropout(x) A^T B^T, s = alpha / r (alpha / sqrt(r) with use_rslora)."""
import math

import torch
from torch import nn

from . import file_fields as ff
from .base import AdapterConfig, AdapterKind, register

MAGNITUDE = "lora_magnitude_vector"  # DoRA's part; PEFT's key has no ".weight"

INITS = (True, False, "gaussian")  # drawn here; PEFT's other names go through lora/init_methods.py


def is_basic_init(init_lora_weights):
    return any(init_lora_weights is v or init_lora_weights == v for v in INITS)


def check_init(init_lora_weights):
    from ..lora.init_methods import parse_method
    parse_method(init_lora_weights)  # a ValueError naming the accepted values


def _from_method(layer, name, cfg, method, dtype, init_options):
    """PiSSA / OLoRA / LoftQ / pissa_niter_N (lora/init_methods.py): A, B from the method, the
    base swapped for the method's residual where it changes it; the reconstruction errors before
    and after land in layer.init_errors[name]."""
    from ..lora.init_methods import init_adapter
    res = init_adapter(method, layer.nf4_weight, cfg.r, cfg.scaling, **(init_options or {}))
    dev = layer.weight.device
    for which, t in (("lora_A", res.A), ("lora_B", res.B)):
        lin = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta")  # no extra RNG draws
        lin.weight = nn.Parameter(t.to(device=dev, dtype=dtype or torch.float32))
        getattr(layer, which)[name] = lin
    if res.base is not None:
        layer._load_weight(res.base.to(layer.weight.dtype))
    layer.__dict__.setdefault("init_errors", {})[name] = (res.error_before, res.error_after)


class LoRA(AdapterKind):
    name = "lora"
    config = AdapterConfig
    containers = {"lora_A": nn.ModuleDict, "lora_B": nn.ModuleDict}
    parts = ("lora_A", "lora_B")

    def create(self, layer, name, cfg, init_lora_weights=True, dtype=None, init_options=None):
        """init_options: what a PEFT method beyond True / False / "gaussian" takes (weight: the
        dense weight the NF4 base came from; loftq_iter); see lora/init_methods.init_adapter."""
        if not is_basic_init(init_lora_weights):
            _from_method(layer, name, cfg, init_lora_weights, dtype, init_options)
            self.finish(layer, name)
            return
        dev = layer.weight.device
        layer.lora_A[name] = nn.Linear(layer.in_features, cfg.r, bias=False, device=dev, dtype=dtype)
        layer.lora_B[name] = nn.Linear(cfg.r, layer.out_features, bias=False, device=dev, dtype=dtype)
        self.reset(layer, name, init_lora_weights)

    def finish(self, layer, name):
        """After the adapter's weights are set (DoRA: its magnitude from them)."""

    def reset(self, layer, name, init_lora_weights=True):
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
        False: both kaiming-uniform (the adapter is not a no-op)."""
        if not is_basic_init(init_lora_weights):
            raise ValueError("reset_lora_parameters takes True, False or 'gaussian'; PEFT's other "
                             f"initialisations ({init_lora_weights!r}) run when the adapter is added")
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

    # ---------------------------------------------------------------- PEFT file mapping
    # LORA: <module>.lora_A.weight [r, K], .lora_B.weight [N, r], and with use_dora
    # .lora_magnitude_vector [N] (dora.py's part)
    # use_bdlora: bdlora.py's layers (compact factor shapes); the variants below change the forward
    # (or add tensors) in ways nf4lora does not implement, so their files are refused, not misread
    peft_type = "LORA"
    unsupported = ("fan_in_fan_out", "lora_bias", "target_parameters",
                   "layer_replication", "use_qalora", "trainable_token_indices", "alora_invocation_tokens",
                   "arrow_config", "kasa_config", "monteclora_config")
    restored_fields = {"init_lora_weights": True}

    def check_file_config(self, cfg):
        ff.common(cfg)
        ff.positive_int(cfg, "r", 8)
        ff.boolean(cfg, "use_dora")
        ff.boolean(cfg, "use_rslora")
        ff.number(cfg, "lora_alpha", 8)
        ff.rank_alpha_patterns(cfg)
        if cfg.get("use_bdlora") is not None:
            from .bdlora import check_bdlora
            check_bdlora(cfg["use_bdlora"])
            if cfg.get("use_dora"):
                raise ValueError("use_bdlora with use_dora is not supported")

    def file_config(self, c):
        return {**ff.targets_record(c), "r": c["r"], "lora_alpha": c["lora_alpha"],
                "lora_dropout": c["lora_dropout"], "rank_pattern": c["rank_pattern"],
                "alpha_pattern": c["alpha_pattern"], "use_rslora": c["use_rslora"], "bias": "none",
                "fan_in_fan_out": False, "use_dora": c.get("use_dora", False),
                "init_lora_weights": c["init_lora_weights"], "use_bdlora": c.get("use_bdlora")}

    def apply_kwargs(self, cfg, trainable):
        return dict(r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8),
                    lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                    layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                    rank_pattern=cfg.get("rank_pattern"), alpha_pattern=cfg.get("alpha_pattern"),
                    use_rslora=cfg.get("use_rslora", False), exclude_modules=cfg.get("exclude_modules"),
                    use_dora=cfg.get("use_dora", False), use_bdlora=cfg.get("use_bdlora"))

    def layer_config(self, cfg, module):
        """The module's AdapterConfig, or bdlora.py's BdLoraConfig when use_bdlora gives it a
        block-diagonal factor."""
        from ..lora.targets import pattern_value
        from .bdlora import BdLoraConfig, bd_side, check_bdlora
        fields = dict(r=pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)),
                      lora_alpha=pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)),
                      lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0, use_rslora=cfg.get("use_rslora", False),
                      use_dora=cfg.get("use_dora", False))
        spec = None if cfg.get("use_bdlora") is None else check_bdlora(cfg["use_bdlora"])
        side = None if spec is None else bd_side(spec, module)
        if side is None:
            return AdapterConfig(**fields)
        return BdLoraConfig(**fields, bd_side=side, nblocks=spec["nblocks"])

    def file_shapes(self, cfg, module, N, K):
        c = self.layer_config(cfg, module)
        if c.kind == "bdlora":
            from .bdlora import compact_shapes
            return compact_shapes(c, N, K, f" of '{module}'")
        r = c.r
        shapes = {"lora_A.weight": (r, K), "lora_B.weight": (N, r)}
        if cfg.get("use_dora", False):
            shapes[MAGNITUDE] = (N,)
        return shapes

    def shape_hint(self, cfg, module, suffix, got, want):
        if suffix not in ("lora_A.weight", "lora_B.weight") or len(got) != 2 or cfg.get("use_bdlora"):
            return ""
        rdim = 0 if suffix == "lora_A.weight" else 1
        if got[1 - rdim] != want[1 - rdim]:
            return ""
        return f" (adapter_config.json gives r={want[rdim]} for '{module}' but the tensor has rank {got[rdim]})"


LORA = register(LoRA())
