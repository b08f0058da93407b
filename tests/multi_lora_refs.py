"""Plain-torch references of multi_lora_linear, shared by tests/test_multi_lora.py and
tests/gpu/test_multi_lora_gpu.py: row m of the answer is x[m] W^T + bias + s_e x[m] A_e^T B_e^T for
its adapter e = idx[m] (none for e < 0)."""
import torch

import nf4lora as nl


def ref64(x, q, A, B, idx, s, bias):
    """In float64."""
    y = x.double() @ nl.dequantize_nf4(q, torch.float64).t() + bias.double()
    for m in range(x.shape[0]):
        e = int(idx[m])
        if e >= 0:
            y[m] += float(s[e]) * (x[m].double() @ A[e].double().t()) @ B[e].double().t()
    return y


def torch_lowp(x, q, A, B, idx, s, bias):
    """What torch gives in x's 16-bit dtype: dequantized weight, matmul and LoRA in that dtype."""
    dt = x.dtype
    y = x @ nl.dequantize_nf4(q, dt).to(x.device).t() + bias.to(dt)
    for m in range(x.shape[0]):
        e = int(idx[m])
        if e >= 0:
            y[m] += (float(s[e]) * (x[m] @ A[e].to(dt).t()) @ B[e].to(dt).t()).to(dt)
    return y
