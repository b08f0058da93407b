"""BD-LoRA (PEFT 0.21's LoraConfig(use_bdlora=BdLoraConfig(...))): a LoRA adapter one of whose
factors is block-diagonal with n blocks, so a tensor-parallel server needs no communication for it
(PEFT: A block-diagonal on row-sharded layers, B on column-sharded ones). Per target module, by
PEFT's substring rule on its name: a pattern of target_modules_bd_a in it -> A block-diagonal, of
target_modules_bd_b -> B; neither -> an error under match_strict, else plain LoRA.

  A side: lora_A.<a>.weight [r, K/n]   block i = rows i*r/n..(i+1)*r/n, acting on x[.., i*K/n..]
  B side: lora_B.<a>.weight [N, r/n]   block i = rows i*N/n..(i+1)*N/n, acting on u[.., i*r/n..]
  dense factor = block_diag(*weight.chunk(n, dim=0))            (PEFT's BlockDiagonalLinear)

The containers and file keys are LoRA's (PEFT's names, the compact shapes), so the files are LORA
files with "use_bdlora" (lora.py's mapping reads them). low_rank assembles the dense factor
(differentiable: the zero blocks get no gradient), so the term rides in the fused op. Init as
PEFT: LoRA's init first, then the block-diagonal factor replaced: A kaiming-uniform (a=0), B zeros.
"""
import dataclasses

import torch
from torch import nn

from .base import AdapterConfig, register
from .lora import LoRA, is_basic_init

FIELDS = ("target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict")


def check_bdlora(spec):
    """PEFT's BdLoraConfig as a dict (what LoraConfig.to_dict writes): the normalized dict, or a
    ValueError naming the field."""
    if not isinstance(spec, dict):
        raise ValueError(f"use_bdlora must be a dict of {list(FIELDS)}, got {spec!r}")
    extra = set(spec) - set(FIELDS)
    if extra:
        raise ValueError(f"use_bdlora has unknown fields {sorted(extra)} (PEFT's BdLoraConfig has {list(FIELDS)})")
    out = {}
    for f in ("target_modules_bd_a", "target_modules_bd_b"):
        v = spec.get(f)
        if v is not None and not (isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)):
            raise ValueError(f"use_bdlora.{f} must be null or a list of strings, got {v!r}")
        out[f] = None if v is None else list(v)
    n = spec.get("nblocks", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"use_bdlora.nblocks must be a positive int, got {n!r}")
    strict = spec.get("match_strict", True)
    if not isinstance(strict, bool):
        raise ValueError(f"use_bdlora.match_strict must be true or false, got {strict!r}")
    overlap = set(out["target_modules_bd_a"] or []) & set(out["target_modules_bd_b"] or [])
    if overlap:
        raise ValueError(f"use_bdlora: {sorted(overlap)} are in both target_modules_bd_a and target_modules_bd_b")
    return {**out, "nblocks": n, "match_strict": strict}


def bd_side(spec, module):
    """"A", "B" or None for `module` (its name in the model) under a checked spec (PEFT's rule)."""
    a = any(p in module for p in spec["target_modules_bd_a"] or [])
    b = any(p in module for p in spec["target_modules_bd_b"] or [])
    if a and b:
        raise ValueError(f"use_bdlora: '{module}' matches both target_modules_bd_a and target_modules_bd_b")
    if not (a or b) and spec["match_strict"]:
        raise ValueError(f"use_bdlora: '{module}' matches neither target_modules_bd_a nor target_modules_bd_b "
                         "(set match_strict false to give it a plain LoRA adapter)")
    return "A" if a else "B" if b else None


@dataclasses.dataclass(frozen=True)
class BdLoraConfig(AdapterConfig):
    bd_side: str = "A"   # which factor is block-diagonal
    nblocks: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.bd_side not in ("A", "B"):
            raise ValueError(f"bd_side must be 'A' or 'B', got {self.bd_side!r}")
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1 \
                or self.r % self.nblocks:
            raise ValueError(f"use_bdlora.nblocks={self.nblocks!r} must be a positive int dividing r={self.r}")
        if self.use_dora:
            raise ValueError("use_bdlora with use_dora is not supported (PEFT has no such variant combination)")

    @property
    def kind(self):
        return "bdlora"


def dense(cfg, A, B):
    """(A [r, K], B [N, r]) from the stored factors (one of them compact) of a BdLoraConfig."""
    if cfg.bd_side == "A":
        return torch.block_diag(*A.chunk(cfg.nblocks, dim=0)), B
    return A, torch.block_diag(*B.chunk(cfg.nblocks, dim=0))


def compact_shapes(cfg, N, K, where=""):
    """{"lora_A.weight": shape, "lora_B.weight": shape} of a BD-LoRA layer [N, K]."""
    n, r = cfg.nblocks, cfg.r
    dim, what = (K, "in_features") if cfg.bd_side == "A" else (N, "out_features")
    if dim % n:
        raise ValueError(f"use_bdlora.nblocks={n} must divide {what}={dim}{where}")
    if cfg.bd_side == "A":
        return {"lora_A.weight": (r, K // n), "lora_B.weight": (N, r)}
    return {"lora_A.weight": (r, K), "lora_B.weight": (N, r // n)}


class BdLoRA(LoRA):
    name = "bdlora"
    config = BdLoraConfig

    def create(self, layer, name, cfg, init_lora_weights=True, dtype=None, init_options=None):
        if not is_basic_init(init_lora_weights):
            raise ValueError(f"use_bdlora takes init_lora_weights True, False or 'gaussian', got "
                             f"{init_lora_weights!r}")
        shapes = compact_shapes(cfg, layer.out_features, layer.in_features)
        super().create(layer, name, cfg, init_lora_weights, dtype)
        which = "lora_A" if cfg.bd_side == "A" else "lora_B"
        old = getattr(layer, which)[name].weight
        shape = shapes[which + ".weight"]
        lin = nn.Linear(shape[1], shape[0], bias=False, device="meta")  # no RNG draw (PEFT draws none)
        lin.weight = nn.Parameter(torch.empty(shape, device=old.device, dtype=old.dtype))
        if cfg.bd_side == "A":
            nn.init.kaiming_uniform_(lin.weight)  # PEFT's BlockDiagonalLinear(init_zero=False)
        else:
            nn.init.zeros_(lin.weight)
        getattr(layer, which)[name] = lin

    def low_rank(self, layer, name):
        return dense(layer.lora_config[name], layer.lora_A[name].weight, layer.lora_B[name].weight)


BDLORA = register(BdLoRA(), reads_files=False)  # its files are LORA's with use_bdlora (lora.py reads them)
