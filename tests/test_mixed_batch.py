"""Per-example adapters at inference (nl.mixed_batch, PEFT's `adapter_names`): each row equals the
model run alone with that adapter active; against PEFT's mixed batch on the same (dequantized)
base; DoRA adapters too; bad names, lengths, training mode and merged models are errors."""

import pytest
import torch

import nf4lora as nl
from model_utils import (peft_three_adapters, rel, single_adapter_logits, three_adapters, tiny_llama,
                         tokens)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _three_adapters(base, dora=False):
    return three_adapters(base, dora)


NAMES = ["b", "default", "__base__", "c", "default", "b"]


@pytest.mark.parametrize("dora", [False, True])
def test_rows_equal_single_adapter_runs(base, dora):
    m = _three_adapters(base, dora)
    x = tokens(batch=len(NAMES), seq=7)
    with torch.no_grad(), nl.mixed_batch(m, NAMES):
        mixed = m(x).logits
    for i, (a, alone) in enumerate(zip(NAMES, single_adapter_logits(m, x, NAMES))):
        assert rel(mixed[i:i + 1], alone) < 1e-5, (i, a)
    # outside the context every layer is back to its active adapter(s)
    assert all(layer.batch_adapter_names is None for _, layer in nl.lora.model.qlora_layers(m))


def test_matches_peft_adapter_names(base):
    pytest.importorskip("peft")
    m = _three_adapters(base)
    pm = peft_three_adapters(m, base)
    x = tokens(batch=len(NAMES), seq=7)
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=NAMES).logits
        with nl.mixed_batch(m, NAMES):
            got = m(x).logits
    assert rel(got, want) < 1e-5


def test_errors(base):
    m = _three_adapters(base)
    x = tokens(batch=3)
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        with nl.mixed_batch(m, "default"):
            pass
    with pytest.raises(ValueError, match="'nope' is not an adapter"):
        with nl.mixed_batch(m, ["default", "nope", "b"]):
            pass
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        with torch.no_grad(), nl.mixed_batch(m, ["default", "b", "c"]):
            m(x[:2])
    m.train()
    with pytest.raises(ValueError, match="inference"):
        with nl.mixed_batch(m, ["default"] * 3):
            pass
    m.eval()
    nl.merge_adapter(m)
    with pytest.raises(ValueError, match="unmerge"):
        with nl.mixed_batch(m, ["default"] * 3):
            pass
    nl.unmerge_adapter(m)
    with torch.no_grad(), nl.mixed_batch(m, ["default"] * 3):  # usable again
        m(x)
