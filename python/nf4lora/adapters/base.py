"""The adapter-kind protocol and its registry.

An adapter kind (lora.py, dora.py, vera.py, adalora.py) is one object that says, for one adapter
`name` of a QLoRALinear `layer`:
  config      its config dataclass (validated once, when built); `scaling` the factor s of its term
  containers  the layer attributes it stores tensors in, PEFT's names (nn.ModuleDict of modules
              or nn.ParameterDict), keyed by adapter name; `parts` those that hold trainable
              parameters (a parameter named ".<part>.<adapter>" belongs to that adapter)
  create      make its tensors in the layer's containers (PEFT's initialisation)
  params      its trainable tensors
  low_rank    (A [r, K], B [N, r]) with the adapter's term s * dropout(x) A^T B^T: what the fused op
              runs (differentiable in the kind's own parameters); a kind whose term is not one
              low-rank pair (fused = False: Kronecker, routed experts) overrides term and delta
  term        s * h A^T B^T for an already dropped-out input h [.., K] (default: from low_rank)
  delta       the dense [N, K] float32 change of the weight, s B A (merge); a kind that cannot be
              merged (input-dependent routing) raises a ValueError saying why
  row_scale   None, or a per-output-row factor applied to the base + term (DoRA)
  delete      drop its tensors (generic: every container of the kind)
The layer (nn.py) is an NF4 base plus one loop over the active adapters that only calls these.
"""
import dataclasses
import math

import torch.nn.functional as F

KINDS = {}  # kind name -> AdapterKind instance


def register(kind):
    KINDS[kind.name] = kind
    return kind


def kind_of(cfg):
    return KINDS[cfg.kind]


def containers():
    """Every container attribute any kind uses -> its type (what a QLoRALinear creates)."""
    out = {}
    for kind in KINDS.values():
        out.update(kind.containers)
    return out


def adapter_parts():
    """Containers holding trainable adapter parameters (PEFT's names), for every kind."""
    return tuple(dict.fromkeys(p for kind in KINDS.values() for p in kind.parts))


def _check_r(r):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")


def check_dropout(name, p):
    """A dropout probability: a number in [0, 1) (the model-level apply_* check it before the model
    is touched, the configs again when built)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {alpha!r}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Fields every kind has (PEFT's names). Readable as a mapping too (cfg["r"]), as the adapter
    file code reads PEFT's JSON configs."""
    r: int
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        _check_r(self.r)
        _check_alpha(self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))

    @property
    def kind(self):
        return "dora" if self.use_dora else "lora"

    @property
    def scaling(self):
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def __getitem__(self, key):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key, default=None):
        return getattr(self, key, default)


class AdapterKind:
    name = "lora"
    config = AdapterConfig
    containers = {}  # attribute -> nn.ModuleDict or nn.ParameterDict
    parts = ()

    def create(self, layer, name, cfg, **options):
        raise NotImplementedError

    def params(self, layer, name):
        raise NotImplementedError

    def low_rank(self, layer, name):
        raise NotImplementedError

    has_row_scale = False
    fused = True  # the term is s * x A^T B^T of low_rank(): it can ride in the fused NF4 op

    def term(self, layer, name, h):
        A, B = self.low_rank(layer, name)
        return F.linear(F.linear(h.to(A.dtype), A), B) * layer.lora_config[name].scaling

    def delta(self, layer, name):
        A, B = self.low_rank(layer, name)
        return layer.lora_config[name].scaling * (B.float() @ A.float())

    def row_scale(self, layer, name, dtype):
        """[N] factor on (base + term), or None."""
        return None

    def merged(self, layer, name, w0, w, delta):
        """The dense weight after folding this adapter's delta (s B A, [N, K] float32) into w."""
        return w + delta

    def delete(self, layer, name):
        for attr in self.containers:
            box = getattr(layer, attr)
            if name in box:
                del box[name]


def new_containers(module):
    """Give `module` an empty container per registered container name."""
    for attr, box in containers().items():
        setattr(module, attr, box())
