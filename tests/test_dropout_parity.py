"""Training-time dropout of the fused kinds PEFT has (LoRA, VeRA, AdaLoRA) against PEFT with the
same masks: seeded training steps give PEFT's losses and every gradient.

The fused op does not draw its mask from torch's Bernoulli stream: it draws one seed per call
(torch.randint on the default generator) and hashes (row, column) into the keep-mask, so backward
regenerates it instead of storing an [M, K] mask (backends/default.dropout_mask, the same hash as
csrc/include/nf4lora/dropout.h). PEFT's nn.Dropout masks therefore cannot be reproduced; here
PEFT's dropout modules are swapped for one that makes the same seed draw and the same hashed mask,
so PEFT's own forward and autograd are the oracle for everything the mask feeds. (DoRA and LoKr
run unfused under dropout and match PEFT's own draws: test_dora.py / test_structured.py.)"""
import copy

import pytest
import torch
from torch import nn

import nf4lora as nl
from nf4lora.backends import default
from model_utils import dequantized_copy, randomize_both, rel, tiny_llama, tokens

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model  # noqa: E402

T = ["q_proj", "v_proj", "down_proj"]


def _adalora_name(n):
    n = n.replace("base_model.model.", "")
    return n + ".weight" if ".lora_A." in n or ".lora_B." in n else n


CASES = {
    "lora": (lambda m: nl.apply_qlora(m, T, r=4, lora_alpha=8, lora_dropout=0.3),
             lambda: LoraConfig(target_modules=T, r=4, lora_alpha=8, lora_dropout=0.3), None),
    "vera": (lambda m: nl.apply_vera(m, T, r=8, vera_dropout=0.3),
             lambda: VeraConfig(target_modules=T, r=8, vera_dropout=0.3), None),
    "adalora": (lambda m: nl.apply_adalora(m, T, init_r=4, target_r=2, total_step=10, lora_dropout=0.3),
                lambda: AdaLoraConfig(target_modules=T, init_r=4, target_r=2, total_step=10, lora_dropout=0.3,
                                      task_type="CAUSAL_LM"), _adalora_name),
}


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


class HashedDropout(nn.Module):
    """PEFT-side stand-in for the fused op's dropout: one seed drawn as qlora_linear draws it, the
    keep-mask from backends/default.dropout_mask, kept values scaled by 1 / (1 - p)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        x2 = x.reshape(-1, x.shape[-1])
        mask = default.dropout_mask(x2.shape[0], x2.shape[1], self.p, seed, x.device)
        return torch.where(mask, x2 * (1.0 / (1.0 - self.p)), torch.zeros_like(x2)).reshape(x.shape)


def _hashed_dropouts(pm):
    n = 0
    for name, mod in pm.named_modules():
        if name.rpartition(".")[2] in ("lora_dropout", "vera_dropout") and isinstance(mod, nn.ModuleDict):
            for a in list(mod):
                mod[a] = HashedDropout(mod[a].p)
                n += 1
    assert n == 2 * len(T)  # every adapted layer of the 2-layer model


@pytest.mark.parametrize("kind", sorted(CASES))
def test_dropout_matches_peft_with_the_same_rng(base, kind):
    ours, theirs, name = CASES[kind]
    m = ours(copy.deepcopy(base))
    pm = get_peft_model(dequantized_copy(m, base), theirs())
    randomize_both(m, pm, scale=0.3, seed=4, **({"ours_name": name} if name else {}))
    _hashed_dropouts(pm)
    name = name or (lambda n: n.replace("base_model.model.", ""))
    x = tokens()
    m.train(), pm.train()
    losses = []
    for seed in range(3):
        for p in list(m.parameters()) + list(pm.parameters()):
            p.grad = None
        torch.manual_seed(seed)
        lm = m(input_ids=x, labels=x).loss
        torch.manual_seed(seed)
        lp = pm(input_ids=x, labels=x).loss
        assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp)), seed
        losses.append(float(lm))
        lm.backward(), lp.backward()
        ref = {name(n): p for n, p in pm.named_parameters() if p.requires_grad}
        mine = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert mine.keys() == ref.keys()
        for n, p in mine.items():
            assert rel(p.grad, ref[n].grad) < 1e-4, (seed, n)
    assert len(set(losses)) == 3  # the masks differ per seed: dropout acts
    m.eval(), pm.eval()
    with torch.no_grad():
        assert rel(m(x).logits, pm(x).logits) < 1e-5
