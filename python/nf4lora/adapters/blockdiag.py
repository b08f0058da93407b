"""Block-diagonal LoRA (apply_qlora(..., lora_blocks=n); PEFT has no such kind): A [r, K] and B [N, r]
are block-diagonal with n blocks, so the adapter has n x fewer parameters at the same rank:

  lora_block_A.<a>  [n, r/n, K/n]   block i is A[i*r/n : (i+1)*r/n, i*K/n : (i+1)*K/n]
  lora_block_B.<a>  [n, N/n, r/n]   block i is B[i*N/n : (i+1)*N/n, i*r/n : (i+1)*r/n]

(new container names, not PEFT's lora_A / lora_B: code that reads those as dense [r, K] / [N, r]
never sees a block tensor). low_rank assembles the dense A, B with torch.block_diag (differentiable:
the zeros get no gradient), so the term s * dropout(x) A^T B^T rides in the fused NF4 op like LoRA's.
The layer's r, K and N must be divisible by n.

Files (lora/io.py): nf4lora's own layout, peft_type "NF4LORA_BLOCKDIAG" with LORA's config fields plus
"lora_blocks" and the two block tensors per module. PEFT cannot load them (it has no such kind and
refuses the unknown peft_type); to hand one to PEFT, merge it, or copy the assembled dense A, B into a
plain LoRA adapter of the same rank (exact: same term)."""
import dataclasses
import math

import torch
from torch import nn

from .base import AdapterConfig, AdapterKind, register
from .lora import LORA, is_basic_init

PEFT_TYPE = "NF4LORA_BLOCKDIAG"  # adapter_config.json's peft_type (nf4lora's own; PEFT refuses it)


def check_blocks(n, r, in_features=None, out_features=None, where=""):
    """n a positive int dividing r (and the layer's K and N when given); ValueError otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"lora_blocks must be a positive int, got {n!r}")
    for what, v in (("r", r), ("in_features", in_features), ("out_features", out_features)):
        if v is not None and v % n:
            raise ValueError(f"lora_blocks={n} must divide {what}={v}{where}")


@dataclasses.dataclass(frozen=True)
class BlockLoraConfig(AdapterConfig):
    lora_blocks: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_blocks(self.lora_blocks, self.r)
        if self.use_dora:
            raise ValueError("lora_blocks > 1 with use_dora is not supported")

    @property
    def kind(self):
        return "blockdiag"


class BlockDiagLoRA(AdapterKind):
    name = "blockdiag"
    config = BlockLoraConfig
    containers = {"lora_block_A": nn.ParameterDict, "lora_block_B": nn.ParameterDict}
    parts = ("lora_block_A", "lora_block_B")

    def create(self, layer, name, cfg, init_lora_weights=True, dtype=torch.float32):
        n, K, N = cfg.lora_blocks, layer.in_features, layer.out_features
        check_blocks(n, cfg.r, K, N)
        dev = layer.weight.device
        layer.lora_block_A[name] = nn.Parameter(torch.empty(n, cfg.r // n, K // n, device=dev, dtype=dtype))
        layer.lora_block_B[name] = nn.Parameter(torch.empty(n, N // n, cfg.r // n, device=dev, dtype=dtype))
        self.reset(layer, name, init_lora_weights)

    def reset(self, layer, name, init_lora_weights=True):
        """LoRA's init per block: A uniform(+-1/sqrt(K/n)) (kaiming-uniform a=sqrt(5) of a block, whose
        rows see K/n inputs), B zeros; "gaussian": A ~ N(0, 1/r), B zeros; False: B uniform(+-1/sqrt(r/n))
        too (the adapter is not a no-op)."""
        if not is_basic_init(init_lora_weights):
            raise ValueError("block-diagonal LoRA takes init_lora_weights True, False or 'gaussian', got "
                             f"{init_lora_weights!r}")
        A, B = layer.lora_block_A[name], layer.lora_block_B[name]
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1.0 / layer.lora_config[name].r)
        else:
            nn.init.uniform_(A, -1 / math.sqrt(A.shape[2]), 1 / math.sqrt(A.shape[2]))
        if init_lora_weights is False:
            nn.init.uniform_(B, -1 / math.sqrt(B.shape[2]), 1 / math.sqrt(B.shape[2]))
        else:
            nn.init.zeros_(B)

    def params(self, layer, name):
        return [layer.lora_block_A[name], layer.lora_block_B[name]]

    def low_rank(self, layer, name):
        return torch.block_diag(*layer.lora_block_A[name]), torch.block_diag(*layer.lora_block_B[name])


    # ---------------------------------------------------------------- file mapping
    # NF4LORA_BLOCKDIAG: LORA's config fields + "lora_blocks"; <module>.lora_block_A [n, r/n, K/n],
    # .lora_block_B [n, N/n, r/n]
    peft_type = PEFT_TYPE
    unsupported = ("fan_in_fan_out", "use_dora")
    restored_fields = {"init_lora_weights": True}

    def check_file_config(self, cfg):
        LORA.check_file_config(cfg)
        n = cfg.get("lora_blocks")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"lora_blocks must be an int >= 2, got {n!r}")

    def file_config(self, c):
        return {**LORA.file_config(c), "lora_blocks": c["lora_blocks"]}

    def apply_kwargs(self, cfg, trainable):
        return {**LORA.apply_kwargs(cfg, trainable), "lora_blocks": cfg["lora_blocks"]}

    def layer_config(self, cfg, module):
        c = LORA.layer_config(cfg, module)
        return BlockLoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                               use_rslora=c.use_rslora, lora_blocks=cfg["lora_blocks"])

    def file_shapes(self, cfg, module, N, K):
        r, b = LORA.layer_config(cfg, module).r, cfg["lora_blocks"]
        check_blocks(b, r, K, N, f" of '{module}'")
        return {"lora_block_A": (b, r // b, K // b), "lora_block_B": (b, N // b, r // b)}


BLOCKDIAG = register(BlockDiagLoRA())
