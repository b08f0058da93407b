"""Mixture of LoRA experts (nl.apply_molora, adapters/molora.py): forward and every gradient
against a float64 reference, top-k routing, the load-balancing loss, training, files, the
per-example path, merge refused and bad configs rejected before the model changes."""
import copy

import pytest
import torch

import nf4lora as nl
from model_utils import tiny_llama, tokens
from numerics import rel_err


def _layer(gen, top_k=None, E=4, r=4, N=48, K=96):
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
        lin.bias.copy_(torch.randn(N, generator=gen))
    layer = nl.QLoRALinear.from_linear(lin, r=0)
    layer.add("mix", nl.adapters.MoloraConfig(r=r, lora_alpha=8, num_experts=E, top_k=top_k))
    layer.set_adapter("mix")
    with torch.no_grad():  # B starts at zero: give every expert a non-zero term
        for p in layer.adapter_params("mix"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def _reference(layer, x, A, B, R, top_k):
    """float64: x W^T + b + s * ((x A^T) * repeat(g, r)) B^T, g the (top-k renormalised) softmax."""
    cfg = layer.lora_config["mix"]
    W = layer.nf4_weight.dequantize(torch.float64)
    g = torch.softmax(x @ R.t(), -1)
    if top_k is not None:
        top, idx = g.topk(top_k, -1)
        g = torch.zeros_like(g).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    u = (x @ A.t()) * g.repeat_interleave(cfg.r, -1)
    return x @ W.t() + layer.bias.double() + cfg.scaling * u @ B.t()


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_forward_and_gradients_match_float64(gen, top_k):
    layer = _layer(gen, top_k)
    x = torch.randn(2, 5, 96, generator=gen, requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()
    params = layer.adapter_params("mix")  # A, B, router
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    want = _reference(layer, x64, *p64, top_k)
    (want * dy.double()).sum().backward()
    assert rel_err(y, want) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    for i, (p, q) in enumerate(zip(params, p64)):
        if top_k == 1 and i == 2:  # one renormalised gate is 1 for every token: the router's
            assert q.grad.abs().max() < 1e-12 and p.grad.abs().max() < 1e-5  # gradient is zero
        else:
            assert rel_err(p.grad, q.grad) < 1e-5


def test_balance_loss_and_top_k_gates(gen):
    from nf4lora.adapters.molora import balance_loss, gates
    logits = torch.randn(50, 4, generator=gen)
    g = gates(logits, 2)
    assert torch.allclose(g.sum(-1), torch.ones(50)) and ((g > 0).sum(-1) == 2).all()
    probs = torch.softmax(logits, -1)
    assert 1.0 <= float(balance_loss(probs, g)) <= 4.0
    skewed = torch.zeros(50, 4)
    skewed[:, 0] = 10.0  # every token to expert 0: the loss approaches E
    assert float(balance_loss(torch.softmax(skewed, -1), gates(skewed, None))) > 3.9


def test_trains_with_router_aux_loss():
    torch.manual_seed(0)
    m = tiny_llama()
    nl.apply_molora(m, ["q_proj", "v_proj", "down_proj"], num_experts=4, r=4, lora_alpha=8, top_k=2,
                    router_aux_loss_coef=0.01)
    m.train()
    routers = [p for n, p in m.named_parameters() if "lora_router" in n]
    assert routers and all(p.requires_grad for p in routers)
    opt = nl.PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(batch=4, seq=16)
    losses = []
    for _ in range(15):
        out = m(input_ids=ids, labels=ids)
        aux = nl.router_aux_loss(m)
        (out.loss + aux).backward()
        assert all(p.grad is not None for p in routers)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert 0.0 < float(aux) < 0.01 * 4 + 1e-6


def test_save_load_and_per_example(tmp_path):
    x = tokens()
    m = nl.apply_molora(tiny_llama(), ["q_proj", "up_proj"], num_experts=3, r=2, top_k=None)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    m.eval()
    want = m(x).logits
    nl.save_adapter(m, str(tmp_path))
    back = nl.load_adapter(tiny_llama(), str(tmp_path))
    assert torch.equal(back(x).logits, want)
    # per example: row 0 through the mixture, row 1 the base
    with nl.mixed_batch(back, ["default", "__base__"]):
        mixed = back(x).logits
    with nl.disable_adapter(back):
        base = back(x).logits
    assert rel_err(mixed[0], want[0]) < 1e-5 and rel_err(mixed[1], base[1]) < 1e-5


def test_merge_refused_and_bad_configs():
    m = nl.apply_molora(tiny_llama(), ["q_proj"], num_experts=2, r=2)
    with pytest.raises(ValueError, match="cannot be merged"):
        nl.merge_and_unload(m)
    with pytest.raises(ValueError, match="cannot be merged"):
        m.model.layers[0].self_attn.q_proj.merge()
    for kw, match in [(dict(num_experts=1), "num_experts"), (dict(num_experts=2, top_k=3), "top_k"),
                      (dict(r=0), "r must"), (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
                      (dict(lora_dropout=1.5), "lora_dropout")]:
        fresh = tiny_llama()
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ValueError, match=match):
            nl.apply_molora(fresh, ["q_proj"], **kw)
        assert not any(isinstance(mod, nl.QLoRALinear) for mod in fresh.modules())
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
