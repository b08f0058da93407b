"""The per-example path of QLoRALinear (nl.mixed_batch, PEFT's `adapter_names`): batch row i through
adapter names[i]. The layer's low-rank adapters are stacked into pool tensors (cached on the layer
until an adapter or its weights change) and run with the base in one multi_lora_linear call; DoRA
rows get their row scale after; kinds that are not one low-rank pair (MoLoRA, LoKr) and calls under
autograd take the per-adapter loop. AdapterPool (serving/pool.py) reuses multi_rows."""
import torch

from .functional import nf4_linear
from .multi_lora import multi_lora_linear


def per_example_forward(layer, x, q, names):
    """Row i of the batch (dim 0 of x) through adapter names[i] ("__base__": none), as PEFT's
    `adapter_names`: the base GEMM and every low-rank kind's term in one multi_lora_linear call
    (the layer's adapters stacked into pool tensors, cached until an adapter or its weights
    change), DoRA rows then scaled; a kind that is not one low-rank pair adds its term on its
    rows. Under autograd (a tensor requiring grad) the per-adapter loop runs instead."""
    if len(names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} "
                         "rows (dim 0 of the input)")
    if layer.merged_weight is not None:
        raise ValueError("per-example adapters need an unmerged model: call unmerge_adapter first")
    present = [n for n in dict.fromkeys(names) if n in layer.lora_config]  # first-seen order
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for n in present for p in layer.adapter_params(n))):
        return per_example_loop(layer, x, q, names, present)
    if not any(layer._kind(n).fused for n in layer.lora_config):  # no low-rank pair to stack
        return per_example_loop(layer, x, q, names, present)
    pool_names, A, B, scalings = stacked_pool(layer, x.dtype, x.device)
    slot = {n: i for i, n in enumerate(pool_names)}
    rows = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64, device=x.device)
    scales = {n: layer._kind(n).row_scale(layer, n, x.dtype) for n in present if n in slot}
    row_scale = None
    if any(s is not None for s in scales.values()):
        one = torch.ones(layer.out_features, dtype=x.dtype, device=x.device)
        row_scale = torch.stack([one if scales.get(n) is None else scales[n] for n in names])
    y = multi_rows(layer, x, q, A, B, scalings, rows, row_scale)
    return per_example_loop(layer, x, q, names, [n for n in present if n not in slot], y)

def per_example_loop(layer, x, q, names, adapters, y=None):
    """y (default: the base) plus each of `adapters`' term (and row scale) on its rows."""
    if y is None:
        y = nf4_linear(x, q, layer.bias)
    bias = None if layer.bias is None else layer.bias.to(y.dtype)
    for name in adapters:
        idx = torch.tensor([i for i, a in enumerate(names) if a == name], device=x.device)
        xs, ys = x.index_select(0, idx), y.index_select(0, idx)
        delta = layer._term(name, xs).to(y.dtype)
        scale = layer._kind(name).row_scale(layer, name, y.dtype)
        if scale is not None:
            base = ys if bias is None else ys - bias
            delta = (scale - 1) * base + scale * delta
        y = y.index_add(0, idx, delta)
    return y

def stacked_pool(layer, dtype, device):
    """(names, A [E, r_max, K], B [E, N, r_max], scalings [E]) of this layer's low-rank (fused)
    adapters, zero-padded to the largest rank; kept on the layer until an adapter is added or
    deleted or one of its tensors changes (keyed on each parameter's storage and _version)."""
    names = [n for n in layer.lora_config if layer._kind(n).fused]
    params = [layer.adapter_params(n) for n in names]
    pdt = {p.dtype for ps in params for p in ps}  # the adapters' own dtype when they share one
    pool_dtype = torch.float64 if dtype == torch.float64 else pdt.pop() \
        if len(pdt) == 1 and pdt <= {torch.float32, torch.float16, torch.bfloat16} else torch.float32
    key = (pool_dtype, device, tuple((n, id(layer.lora_config[n]), tuple((p.data_ptr(), p._version)
                                     for p in ps)) for n, ps in zip(names, params)))
    kept = layer.__dict__.get("_stacked_pool_kept")
    if kept is not None and kept[0] == key:
        return kept[1]
    with torch.no_grad():
        pairs = [layer._low_rank(n) for n in names]
        r = max([a.shape[0] for a, _ in pairs], default=1)
        A = torch.zeros(len(names), r, layer.in_features, dtype=pool_dtype, device=device)
        B = torch.zeros(len(names), layer.out_features, r, dtype=pool_dtype, device=device)
        for e, (a, b) in enumerate(pairs):
            A[e, :a.shape[0]] = a
            B[e, :, :b.shape[1]] = b
        s = torch.tensor([layer.lora_config[n].scaling for n in names], dtype=torch.float32,
                         device=device)
    layer.__dict__["_stacked_pool_kept"] = (key, (names, A, B, s))
    return names, A, B, s

def multi_rows(layer, x, q, A, B, scalings, rows, row_scale=None):
    """x [Bt, ..., K] with batch row i through pool slot rows[i] (int64 [Bt], -1: base only), in
    one multi_lora_linear call; row_scale None or [Bt, N], a factor on row i's base + term
    before the bias (DoRA: y_i = scale_i * (x_i W^T + term_i) + b)."""
    idx = rows.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
    if row_scale is None:
        return multi_lora_linear(x, q, A, B, idx, scalings, layer.bias)
    y = multi_lora_linear(x, q, A, B, idx, scalings)
    y = y * row_scale.view(row_scale.shape[0], *[1] * (x.dim() - 2), -1).to(y.dtype)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)
