"""The adapter kinds of QLoRALinear on CUDA (DoRA, VeRA, AdaLoRA, block-diagonal, LoKr, several active adapters,
per-example adapters) against the same layer on the CPU: outputs and every adapter gradient.
Layer-level only (no transformers needed on the GPU image). Skipped without CUDA."""
import copy

import pytest
import torch

import nf4lora as nl
from nf4lora.adapters import BlockLoraConfig, LoKrConfig, VeraProjections
from numerics import rel_err as rel

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("nf4lora._C_cuda")




KINDS = ["lora", "dora", "vera", "adalora", "blockdiag", "lokr"]


def _layer(kind, K=256, N=192, seed=0):
    torch.manual_seed(seed)
    layer = nl.QLoRALinear.from_linear(torch.nn.Linear(K, N), r=0)
    if kind == "dora":
        layer.add_adapter("a", r=8, lora_alpha=16, use_dora=True, init_lora_weights=False)
    elif kind == "vera":
        g = torch.Generator().manual_seed(1)
        proj = VeraProjections(torch.randn(16, K, generator=g) * 0.1, torch.randn(N, 16, generator=g) * 0.1)
        layer.add_vera_adapter("a", proj, r=16, init_weights=False)
    elif kind == "adalora":
        layer.add_adalora_adapter("a", r=8, lora_alpha=8, init_weights=False)
        with torch.no_grad():
            layer.lora_E["a"].normal_()
    elif kind == "blockdiag":
        layer.add("a", BlockLoraConfig(r=8, lora_alpha=16, lora_blocks=4), init_lora_weights=False)
    elif kind == "lokr":
        layer.add("a", LoKrConfig(r=4, lora_alpha=8, decompose_both=True), init_weights=False)
    else:
        layer.add_adapter("a", r=8, lora_alpha=16, init_lora_weights=False)
    layer.add_adapter("b", r=4, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter("a")
    return layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("active", [["a"], ["a", "b"]])
def test_forward_and_grads_match_cpu(kind, active):
    cpu = _layer(kind)
    gpu = copy.deepcopy(cpu).cuda()
    cpu.set_adapter(active), gpu.set_adapter(active)
    x = torch.randn(5, 7, cpu.in_features)
    yc, yg = cpu(x), gpu(x.cuda())
    assert rel(yg, yc) < 1e-4
    g = torch.randn_like(yc)
    yc.backward(g), yg.backward(g.cuda())
    for (n, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if pc.requires_grad:
            assert rel(pg.grad, pc.grad) < 1e-4, n


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_matches_cpu(kind):
    cpu = _layer(kind).eval()
    gpu = copy.deepcopy(cpu).cuda().eval()
    names = ["b", "a", "__base__", "a"]
    cpu.batch_adapter_names = gpu.batch_adapter_names = names
    x = torch.randn(4, 3, cpu.in_features)
    with torch.no_grad():
        assert rel(gpu(x.cuda()), cpu(x)) < 1e-4
