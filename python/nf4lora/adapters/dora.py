"""DoRA (PEFT's use_dora=True): a LoRA adapter plus a magnitude m = lora_magnitude_vector.<a>.weight
[N]; y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b, the norm detached (DoRA paper
sec. 4.3, as PEFT). The row norms never need a dense W: ||W_n||^2 (one dense pass, cached on the
layer) + 2 s B_n . (W A^T)_n + s^2 ||(B A)_n||^2, with W A^T from the NF4 op on A's r rows."""
import torch
from torch import nn

from ..functional import nf4_linear
from .base import register
from .lora import MAGNITUDE, LoRA


class LoraMagnitude(nn.Module):
    """DoRA's magnitude of one adapter: weight [out_features], PEFT's lora_magnitude_vector.<a>."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


@torch.no_grad()
def weight_norm(layer, name):
    """float32 [N]: ||W + s B A|| over each output row, W the dequantized NF4 weight, in float64."""
    return low_rank_row_norm(layer, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.lora_config[name].scaling)


@torch.no_grad()
def low_rank_row_norm(layer, A, B, s):
    """weight_norm for any A [r, K], B [N, r], s (an adapter held outside the layer: AdapterPool)."""
    A = A.detach()
    B = B.detach().double()
    q = layer.nf4_weight
    if layer.weight_row_sqnorm is None:  # one dense pass over W, once per weight
        layer.weight_row_sqnorm = q.dequantize(torch.float32).double().pow(2).sum(1)
    wa = nf4_linear(A.float(), q).double().t()  # [N, r] = W A^T
    gram = A.double() @ A.double().t()          # [r, r]
    sq = layer.weight_row_sqnorm + 2.0 * s * (B * wa).sum(1) + s * s * ((B @ gram) * B).sum(1)
    return sq.clamp_min(0.0).sqrt().float()


def _weights_key(layer, name):
    """What ||W + s B A|| depends on, by identity, storage and in-place version: A, B, the NF4
    tensors, s (an optimizer step, load_adapter's copy_ or a new weight each change it)."""
    q = layer.nf4_weight
    ts = [layer.lora_A[name].weight, layer.lora_B[name].weight, q.packed, q.absmax]
    ts += [q.absmax2] if q.absmax2 is not None else []
    return tuple((id(t), t.data_ptr(), t._version) for t in ts) + (layer.lora_config[name].scaling,)


def eval_weight_norm(layer, name):
    """weight_norm, remembered in eval mode until the weights it depends on change. In eval the norm
    of the current weights is all a forward needs (it is detached in training too), and recomputing it
    costs a pass over the NF4 weight per call: 5.5x a LoRA forward at M=1 (4096 x 4096, r=16). Training
    mode always recomputes (sharded or all-gathered weights may be refilled in place without a
    version bump, e.g. under FSDP)."""
    if layer.training or torch.compiler.is_compiling():
        return weight_norm(layer, name)
    key = _weights_key(layer, name)
    cache = layer.__dict__.setdefault("_dora_norms", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, weight_norm(layer, name))
    return hit[1]


class DoRA(LoRA):
    name = "dora"
    containers = {**LoRA.containers, MAGNITUDE: nn.ModuleDict}
    parts = LoRA.parts + (MAGNITUDE,)
    has_row_scale = True

    def create(self, layer, name, cfg, init_lora_weights=True, dtype=None, init_options=None):
        layer.__dict__.get("_dora_norms", {}).pop(name, None)  # (a reused tensor id must not hit)
        layer.lora_magnitude_vector[name] = LoraMagnitude(
            torch.empty(layer.out_features, device=layer.weight.device, dtype=dtype))
        super().create(layer, name, cfg, init_lora_weights, dtype, init_options)

    def reset(self, layer, name, init_lora_weights=True):
        super().reset(layer, name, init_lora_weights)
        self.finish(layer, name)

    def finish(self, layer, name):
        layer.lora_magnitude_vector[name].weight.copy_(weight_norm(layer, name))  # m = ||W + s B A||

    def params(self, layer, name):
        return super().params(layer, name) + [layer.lora_magnitude_vector[name].weight]

    def row_scale(self, layer, name, dtype):
        m = layer.lora_magnitude_vector[name].weight
        return (m / eval_weight_norm(layer, name).to(m.dtype)).to(dtype)

    def merged(self, layer, name, w0, w, delta):
        # PEFT: (m / ||W0 + dW||_row) * (W + dW)
        m = layer.lora_magnitude_vector[name].weight.float()
        return (m / (w0 + delta).norm(dim=1))[:, None] * (w + delta)

    def delete(self, layer, name):
        layer.__dict__.get("_dora_norms", {}).pop(name, None)
        super().delete(layer, name)

    def suffix(self, part):
        return part if part == MAGNITUDE else super().suffix(part)  # PEFT writes it without ".weight"


DORA = register(DoRA(), reads_files=False)  # its files are LORA's with use_dora (lora.py reads them)
