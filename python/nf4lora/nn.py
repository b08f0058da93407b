"""QLoRALinear: a frozen NF4 weight plus a trainable LoRA adapter, drop-in for nn.Linear (and for a
bitsandbytes Linear4bit wrapped by PEFT LoRA).

  y = x W^T + b + scaling * dropout(x) A^T B^T,   W: NF4 [N, K],  A = lora_A [r, K],  B = lora_B [N, r]

State dict: the weight in bitsandbytes Linear4bit keys (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), plus
`bias`, `lora_A`, `lora_B`.
"""
import math

import torch
from torch import nn

from .functional import nf4_linear, qlora_linear
from .nf4 import NF4Tensor, quantize_nf4

_NF4_BUFFERS = ("weight_absmax", "weight_absmax2", "weight_code8")


class QLoRALinear(nn.Module):
    def __init__(self, weight: NF4Tensor, bias=None, r=8, lora_alpha=8, lora_dropout=0.0,
                 use_rslora=False, init_lora_weights=True, lora_dtype=torch.float32):
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise TypeError("weight must be a 2-D NF4Tensor [out_features, in_features]")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if not math.isfinite(float(lora_alpha)):
            raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight)
        if bias is not None:
            bias = torch.as_tensor(bias).detach()
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r) if r > 0 else 0.0
        dev = weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=lora_dtype, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=lora_dtype, device=dev))
        self.reset_lora_parameters(init_lora_weights)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    blocksize=64, double_quant=True, init_lora_weights=True, lora_dtype=torch.float32):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach().contiguous(), blocksize=blocksize,
                         double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, lora_dtype=lora_dtype)

    def reset_lora_parameters(self, init_lora_weights=True):
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
        False: both kaiming-uniform (the adapter is not a no-op)."""
        if self.r == 0:
            return
        with torch.no_grad():
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
                nn.init.zeros_(self.lora_B)
            elif init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")

    # ---------------------------------------------------------------- the NF4 weight
    def _set_weight(self, q: NF4Tensor):
        # `weight` holds the packed codes in bitsandbytes' layout [(n+1)//2, 1]; the scales are
        # non-persistent buffers written under bitsandbytes' keys by _save_to_state_dict.
        self.register_buffer("weight", q.packed.reshape(-1, 1))
        self.register_buffer("weight_absmax", q.absmax, persistent=False)
        self.register_buffer("weight_absmax2", q.absmax2, persistent=False)
        self.register_buffer("weight_code8", q.code8, persistent=False)
        self.weight_offset, self.weight_dtype, self.blocksize = q.offset, q.dtype, q.blocksize

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The frozen weight as an NF4Tensor view of this module's buffers (current device)."""
        return NF4Tensor(self.weight, self.weight_absmax, (self.out_features, self.in_features),
                         self.weight_dtype, self.blocksize, self.weight_absmax2, self.weight_code8,
                         self.weight_offset)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias, lora_A, lora_B
        for k, v in self.nf4_weight.to_bnb_state_dict(prefix + "weight").items():
            if k != prefix + "weight":
                destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        if wkey + ".quant_state.bitsandbytes__nf4" in state_dict:
            sub = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
            try:
                q = NF4Tensor.from_bnb_state_dict(sub, prefix=wkey)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}")
                return
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{wkey}: shape {tuple(q.shape)} does not match this layer's "
                                  f"{(self.out_features, self.in_features)}")
                return
            self._set_weight(q.to(self.weight.device))
        elif strict:
            missing_keys.append(wkey + ".quant_state.bitsandbytes__nf4")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # torch reports dotted keys under a leaf module as unexpected; the weight.* ones are ours
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(wkey + ".")]

    # ---------------------------------------------------------------- forward / merge
    def forward(self, x):
        q = self.nf4_weight
        if self.r == 0:
            return nf4_linear(x, q, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return qlora_linear(x, q, self.lora_A, self.lora_B, self.scaling, self.bias, dropout_p=p)

    @torch.no_grad()
    def merge(self, dtype=None) -> nn.Linear:
        """A dense nn.Linear with weight W + scaling * B @ A (computed in float32), in `dtype`
        (default: the original weight dtype)."""
        dtype = dtype or self.weight_dtype
        w = self.nf4_weight.dequantize(torch.float32)
        if self.r > 0:
            w = w + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias.to(dtype))
        return lin

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"blocksize={self.blocksize}, double_quant={self.weight_absmax2 is not None}")
