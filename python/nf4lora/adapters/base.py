"""The adapter-kind protocol and its registry.

An adapter kind (one file each: lora.py, dora.py, vera.py, adalora.py, molora.py, blockdiag.py,
bdlora.py, lokr.py) is one object that says, for one adapter
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

And its PEFT file mapping (lora/io.py reads, checks and writes the files; the kind says what goes
where). `cfg` is an adapter_config.json dict (read from a file, or the model-level config the
kind's apply_* recorded), `module` a layer's name in the model, a "suffix" a file key after
"base_model.model.<module>.":
  peft_type        the config's peft_type (FILE_TYPES: peft_type -> the kind that reads it)
  unsupported      file fields nf4lora does not implement (each must be falsy)
  check_file_config(cfg)          field types and ranges; a ValueError naming the field
  file_config(c)                  the JSON fields beyond the header, from a model-level config
  apply_kwargs(cfg, trainable)    the kind's apply_* keyword arguments for a file's config
  restored_fields  {field: default} copied from the file into the model-level config after loading
  layer_config(cfg, module)       the layer config the file gives `module`
  file_shapes(cfg, module, N, K)  {suffix: shape} the file must hold for that layer
  model_file_shapes(cfg, dims, keys)  {key: shape} of tensors shared by the layers (VeRA), checks
                                  across layers; dims {module: (N, K)}, keys the file's keys
  file_tensors / load_file_tensors    one layer's tensors out of / into the layer
  model_file_tensors / load_model_file_tensors   the shared ones
  model_mismatch(cfg, have, shared)   a model-level field that must match to load into an existing
                                  adapter (VeRA's projection key when the file has no projections)
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = {}       # kind name -> AdapterKind instance
FILE_TYPES = {}  # adapter_config.json peft_type -> the kind whose file mapping reads it


def register(kind, reads_files=True):
    """reads_files=False: the kind's files are another kind's peft_type (DoRA: LORA with use_dora)."""
    KINDS[kind.name] = kind
    if reads_files:
        FILE_TYPES[kind.peft_type] = kind
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

    # fields that do not change what the adapter's weights mean: a file loads into an existing
    # adapter whose config differs only in these
    load_ignores = ("lora_dropout",)

    def mismatch(self, other):
        """(field, mine, other's) of the first field (beyond load_ignores) that differs, or None."""
        if type(self) is not type(other):
            return "kind", self.kind, other.kind
        for f in dataclasses.fields(self):
            if f.name not in self.load_ignores and getattr(self, f.name) != getattr(other, f.name):
                return f.name, getattr(self, f.name), getattr(other, f.name)
        return None


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

    # ---------------------------------------------------------------- PEFT file mapping
    peft_type = None
    unsupported = ("fan_in_fan_out",)
    restored_fields = {}

    def check_file_config(self, cfg):
        raise NotImplementedError

    def file_config(self, c):
        raise NotImplementedError

    def apply_kwargs(self, cfg, trainable):
        raise NotImplementedError

    def layer_config(self, cfg, module):
        raise NotImplementedError

    def file_shapes(self, cfg, module, N, K):
        raise NotImplementedError

    def model_file_shapes(self, cfg, dims, keys):
        return {}

    def suffix(self, part):
        """A part's file key suffix: PEFT's module containers hold an nn.Linear (or a module with a
        .weight), so their keys end in ".weight"; parameter containers hold the tensor itself."""
        return part + ".weight" if self.containers[part] is nn.ModuleDict else part

    def _tensor(self, layer, part, name):
        box = getattr(layer, part)
        return box[name].weight if isinstance(box, nn.ModuleDict) else box[name]

    def file_tensors(self, layer, name, cfg, module):
        """{suffix: tensor} of every part the adapter has in the layer (detached CPU copies)."""
        return {self.suffix(p): self._tensor(layer, p, name).detach().cpu().contiguous().clone()
                for p in self.parts if name in getattr(layer, p)}

    def load_file_tensors(self, layer, name, tensors, cfg, module):
        """A checked file's {suffix: tensor} into the layer's parts, in place."""
        with torch.no_grad():
            for p in self.parts:
                if name in getattr(layer, p):
                    self._tensor(layer, p, name).copy_(tensors[self.suffix(p)])

    def model_file_tensors(self, layers, name, cfg):
        return {}

    def load_model_file_tensors(self, layers, name, weights):
        pass

    def model_mismatch(self, cfg, have, shared):
        """Loading a file (config cfg, shared tensors `shared`) into an existing adapter whose
        model-level config is `have`: (field, have's, the file's) of a model-level field that would
        change what the loaded weights mean, or None."""
        return None

    def shape_hint(self, cfg, module, suffix, got, want):
        """A hint appended to a shape error (LoRA: which r the config gives)."""
        return ""


def new_containers(module):
    """Give `module` an empty container per registered container name."""
    for attr, box in containers().items():
        setattr(module, attr, box())
