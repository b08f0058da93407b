"""LoKr (PEFT's LOKR, 0.21, Linear layers): the weight change is a Kronecker product

  delta W = s * kron(w1, w2)  [N, K],   s = alpha / r,
  (a, b) = factorization(N, f), (c, d) = factorization(K, f)  (a <= b, c <= d; f = decompose_factor)
  w1 [a, c] = lokr_w1.<a>, or lokr_w1_a [a, r] @ lokr_w1_b [r, c] when decompose_both and r < max(a, c) / 2
  w2 [b, d] = lokr_w2.<a>, or lokr_w2_a [b, r] @ lokr_w2_b [r, d] when r < max(b, d) / 2

(PEFT's parameter names, shapes, choice of factors and initialisation). The term never builds the
dense [N, K]: with x [.., K] viewed as X [.., c, d], x kron(w1, w2)^T = w1 X w2^T [.., a, b], which
costs (c d b + a c b) per row instead of N K. Not fused (fused = False): the layer adds it to the
NF4 base output.

Training-time dropouts as PEFT's LoKr draws them (same torch RNG calls, same order, so a seeded run
matches PEFT's): per forward in training one torch.rand(1) per adapter, the term skipped when it is
<= module_dropout; with rank_dropout > 0 a torch.rand(N) mask over the delta's rows (the output
features), divided by its mean with rank_dropout_scale.
"""
import dataclasses
import math

import torch
from torch import nn

from . import file_fields as ff
from .base import AdapterConfig, AdapterKind, check_dropout, register

PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
INITS = (True, False, "lycoris")


def factorization(dimension, factor=-1):
    """(m, n) with m * n = dimension, PEFT's choice: (factor, dimension / factor) when factor > 0
    divides dimension; otherwise the divisor m <= sqrt(dimension) closest to it, no larger than factor
    (when factor != -1), and n = dimension / m (so m <= n)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, math.isqrt(dimension) + 1):
        if d > limit:
            break
        if dimension % d == 0:
            m = d
    return m, dimension // m


def lokr_shapes(out_features, in_features, r, decompose_both, decompose_factor):
    """((a, b), (c, d), use_w1, use_w2): the factors of N and K and whether w1 / w2 are full
    matrices (True) or a rank-r product."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    return (a, b), (c, d), use_w1, use_w2


def check_init(init_weights):
    if not any(init_weights is v or init_weights == v for v in INITS):
        raise ValueError(f"init_weights must be True, False or 'lycoris', got {init_weights!r}")


@dataclasses.dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """r, lora_alpha (PEFT's `alpha`), decompose_both, decompose_factor, the dropouts; scaling alpha / r."""
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False

    load_ignores = ("lora_dropout", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __post_init__(self):
        super().__post_init__()
        check_dropout("rank_dropout", self.rank_dropout)
        check_dropout("module_dropout", self.module_dropout)
        if not isinstance(self.rank_dropout_scale, bool):
            raise ValueError(f"rank_dropout_scale must be True or False, got {self.rank_dropout_scale!r}")
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"decompose_both must be True or False, got {self.decompose_both!r}")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int):
            raise ValueError(f"decompose_factor must be an int (-1: near the square root), got {f!r}")
        if self.use_rslora or self.use_dora or self.lora_dropout:
            raise ValueError("LoKr has no use_rslora, use_dora or lora_dropout")

    @property
    def kind(self):
        return "lokr"

    @property
    def scaling(self):
        return self.lora_alpha / self.r


def _factor(layer, name, which):
    """w1 or w2 (which = "lokr_w1" / "lokr_w2") as its full matrix or its (left, right) pair."""
    full = getattr(layer, which)
    if name in full:
        return full[name], None
    return getattr(layer, which + "_a")[name], getattr(layer, which + "_b")[name]


def _dense(pair):
    left, right = pair
    return left if right is None else left @ right


class LoKr(AdapterKind):
    name = "lokr"
    config = LoKrConfig
    containers = {p: nn.ParameterDict for p in PARTS}
    parts = PARTS
    fused = False

    def create(self, layer, name, cfg, init_weights=True, dtype=torch.float32):
        """PEFT's init: w1 (or w1_a) zeros, the rest kaiming-uniform(a=sqrt(5)) (a no-op adapter);
        "lycoris": w2 (or w2_b) zeros instead; False: all kaiming-uniform."""
        check_init(init_weights)
        (a, b), (c, d), use_w1, use_w2 = lokr_shapes(layer.out_features, layer.in_features, cfg.r,
                                                     cfg.decompose_both, cfg.decompose_factor)
        r, dev = cfg.r, layer.weight.device

        def new(box, *shape):
            getattr(layer, box)[name] = nn.Parameter(torch.empty(*shape, device=dev, dtype=dtype))

        if use_w1:
            new("lokr_w1", a, c)
        else:
            new("lokr_w1_a", a, r), new("lokr_w1_b", r, c)
        if use_w2:
            new("lokr_w2", b, d)
        else:
            new("lokr_w2_a", b, r), new("lokr_w2_b", r, d)
        zero = () if init_weights is False else \
            ("lokr_w2", "lokr_w2_b") if init_weights == "lycoris" else ("lokr_w1", "lokr_w1_a")
        for p in PARTS:
            box = getattr(layer, p)
            if name in box:
                if p in zero:
                    nn.init.zeros_(box[name])
                else:
                    nn.init.kaiming_uniform_(box[name], a=math.sqrt(5))

    def params(self, layer, name):
        return [getattr(layer, p)[name] for p in PARTS if name in getattr(layer, p)]

    def low_rank(self, layer, name):
        raise ValueError("a LoKr adapter is a Kronecker product, not one low-rank pair (use term / delta)")

    def term(self, layer, name, h):
        """s * h kron(w1, w2)^T for h [.., K]: w1 X w2^T with X = h viewed [.., c, d]; in training
        with PEFT's module and rank dropouts."""
        cfg = layer.lora_config[name]
        if layer.training and not bool(torch.rand(1) > cfg.module_dropout):  # PEFT draws even at p = 0
            return h.new_zeros(*h.shape[:-1], layer.out_features)
        y = self._kron_term(layer, name, h)
        if layer.training and cfg.rank_dropout:
            drop = (torch.rand(layer.out_features) > cfg.rank_dropout).float()
            if cfg.rank_dropout_scale and bool(drop.any()):  # (PEFT divides by 0 when all drop)
                drop /= drop.mean()
            y = y * drop.to(device=y.device, dtype=y.dtype)
        return y

    def _kron_term(self, layer, name, h):
        w1, w2 = _factor(layer, name, "lokr_w1"), _factor(layer, name, "lokr_w2")
        c = w1[0].shape[1] if w1[1] is None else w1[1].shape[1]
        X = h.reshape(-1, c, layer.in_features // c)
        t = X @ w2[0].t() if w2[1] is None else (X @ w2[1].t()) @ w2[0].t()  # [M, c, b]
        y = w1[0] @ t if w1[1] is None else w1[0] @ (w1[1] @ t)             # [M, a, b]
        return y.reshape(*h.shape[:-1], layer.out_features) * layer.lora_config[name].scaling

    def delta(self, layer, name):
        w1, w2 = _dense(_factor(layer, name, "lokr_w1")), _dense(_factor(layer, name, "lokr_w2"))
        return layer.lora_config[name].scaling * torch.kron(w1.float(), w2.float())


    # ---------------------------------------------------------------- PEFT file mapping
    # LOKR: <module>.lokr_w1 [a, c] or .lokr_w1_a [a, r] + .lokr_w1_b [r, c], and .lokr_w2 [b, d]
    # or .lokr_w2_a [b, r] + .lokr_w2_b [r, d]: the parts the layer's config gives it
    peft_type = "LOKR"
    unsupported = ("use_effective_conv2d",)
    restored_fields = {"init_weights": True}

    def check_file_config(self, cfg):
        ff.common(cfg)
        ff.positive_int(cfg, "r", 8)
        ff.number(cfg, "alpha", 8)
        ff.boolean(cfg, "decompose_both")
        ff.integer(cfg, "decompose_factor", -1)
        ff.boolean(cfg, "rank_dropout_scale")
        ff.rank_alpha_patterns(cfg)

    def file_config(self, c):
        return {**ff.targets_record(c), "r": c["r"], "alpha": c["alpha"], "rank_dropout": c["rank_dropout"],
                "module_dropout": c["module_dropout"], "rank_dropout_scale": c["rank_dropout_scale"],
                "use_effective_conv2d": False,
                "decompose_both": c["decompose_both"], "decompose_factor": c["decompose_factor"],
                "init_weights": c["init_weights"], "rank_pattern": c["rank_pattern"],
                "alpha_pattern": c["alpha_pattern"]}

    def apply_kwargs(self, cfg, trainable):
        return dict(r=cfg.get("r", 8), alpha=cfg.get("alpha", 8), decompose_both=cfg.get("decompose_both", False),
                    decompose_factor=cfg.get("decompose_factor", -1), rank_pattern=cfg.get("rank_pattern"),
                    rank_dropout=cfg.get("rank_dropout", 0.0) or 0.0,
                    module_dropout=cfg.get("module_dropout", 0.0) or 0.0,
                    rank_dropout_scale=cfg.get("rank_dropout_scale", False),
                    alpha_pattern=cfg.get("alpha_pattern"), layers_to_transform=cfg.get("layers_to_transform"),
                    layers_pattern=cfg.get("layers_pattern"), exclude_modules=cfg.get("exclude_modules"))

    def layer_config(self, cfg, module):
        from ..lora.targets import pattern_value
        return LoKrConfig(r=pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)),
                          lora_alpha=pattern_value(cfg.get("alpha_pattern"), module, cfg.get("alpha", 8)),
                          decompose_both=cfg.get("decompose_both", False),
                          decompose_factor=cfg.get("decompose_factor", -1),
                          rank_dropout=cfg.get("rank_dropout", 0.0) or 0.0,
                          module_dropout=cfg.get("module_dropout", 0.0) or 0.0,
                          rank_dropout_scale=cfg.get("rank_dropout_scale", False))

    def file_shapes(self, cfg, module, N, K):
        c = self.layer_config(cfg, module)
        (a, b), (c_, d), use_w1, use_w2 = lokr_shapes(N, K, c.r, c.decompose_both, c.decompose_factor)
        shapes = {"lokr_w1": (a, c_)} if use_w1 else {"lokr_w1_a": (a, c.r), "lokr_w1_b": (c.r, c_)}
        shapes.update({"lokr_w2": (b, d)} if use_w2 else {"lokr_w2_a": (b, c.r), "lokr_w2_b": (c.r, d)})
        return shapes


LOKR = register(LoKr())
