"""Adapter files through the kinds' file mappings (adapters/<kind>.py) and lora/io.py's one
reader / checker / writer, the same for every kind: save, load under a new name, load into an
existing adapter (PEFT's resume) with its config checked first."""
import copy

import pytest
import torch

import nf4lora as nl
from nf4lora.adapters import FILE_TYPES, KINDS
from model_utils import tiny_llama, tokens

T = ["q_proj", "v_proj", "down_proj"]

# kind -> (apply it, a config change that keeps every tensor's shape)
APPLY = {
    "lora": (lambda m, **kw: nl.apply_qlora(m, T, **{"r": 4, **kw}), dict(lora_alpha=16)),
    "dora": (lambda m, **kw: nl.apply_qlora(m, T, use_dora=True, **{"r": 4, **kw}), dict(lora_alpha=16)),
    "blockdiag": (lambda m, **kw: nl.apply_qlora(m, T, lora_blocks=2, **{"r": 4, **kw}), dict(use_rslora=True)),
    "bdlora": (lambda m, **kw: nl.apply_qlora(m, T, use_bdlora=dict(target_modules_bd_a=["down_proj"],
                                                                     target_modules_bd_b=["q_proj", "v_proj"]),
                                              **{"r": 4, **kw}), dict(lora_alpha=16)),
    "vera": (lambda m, **kw: nl.apply_vera(m, T, **{"r": 8, **kw}), None),
    "adalora": (lambda m, **kw: nl.apply_adalora(m, T, init_r=4, total_step=10, **kw), dict(lora_alpha=3)),
    "molora": (lambda m, **kw: nl.apply_molora(m, T, num_experts=2, r=2, **kw), dict(top_k=1)),
    "lokr": (lambda m, **kw: nl.apply_lokr(m, T, **{"r": 4, **kw}), dict(alpha=3)),
}


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _randomized(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + 0.02)
    return m


def _trainable(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


def test_every_kind_has_a_file_mapping():
    assert set(APPLY) == set(KINDS)
    for kind in KINDS.values():
        assert FILE_TYPES[kind.peft_type].peft_type == kind.peft_type
        assert set(kind.parts) <= set(kind.containers)


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_load_into_existing_adapter(base, tmp_path, kind):
    apply, change = APPLY[kind]
    x = tokens()
    m = _randomized(apply(copy.deepcopy(base)), seed=0)
    nl.save_adapter(m, str(tmp_path))
    fresh = _randomized(apply(copy.deepcopy(base)), seed=1)
    params = _trainable(fresh)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    assert not torch.equal(_logits(fresh, x), _logits(m, x))
    nl.load_adapter(fresh, str(tmp_path), adapter_name="default")
    assert torch.equal(_logits(fresh, x), _logits(m, x))
    assert _trainable(fresh) == params  # the same Parameter objects, still trainable
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in params.values())
    # under a new name next to it: the same function once active
    nl.load_adapter(fresh, str(tmp_path), adapter_name="again")
    nl.set_adapter(fresh, "again")
    assert torch.equal(_logits(fresh, x), _logits(m, x))


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_existing_adapter_of_another_config_is_refused_untouched(base, tmp_path, kind):
    apply, change = APPLY[kind]
    nl.save_adapter(_randomized(apply(copy.deepcopy(base)), seed=0), str(tmp_path))
    others = [("another kind", APPLY["lora" if kind != "lora" else "vera"][0], {})]
    if change is not None:
        others.append((next(iter(change)), apply, change))
    for match, other_apply, kw in others:
        other = _randomized(other_apply(copy.deepcopy(base), **kw), seed=1)
        before = {n: p.clone() for n, p in _trainable(other).items()}
        with pytest.raises(ValueError, match="adapter_config.json gives|the file holds|must be a floating"):
            nl.load_adapter(other, str(tmp_path), adapter_name="default")
        assert all(torch.equal(p, before[n]) for n, p in _trainable(other).items()), match


def test_adalora_rank_mask_loads_into_existing(base, tmp_path):
    """AdaLoRA's file holds only the kept ranks; into an existing adapter they go back to their
    positions and the pruned ones become zero, the mask lands in the adapter's config."""
    x = tokens()
    m = _randomized(APPLY["adalora"][0](copy.deepcopy(base)), seed=0)
    names = [n for n, mod in m.named_modules() if isinstance(mod, nl.QLoRALinear)]
    pattern = {f"{n}.lora_E": [True, False, True, i % 2 == 0] for i, n in enumerate(names)}
    with torch.no_grad():
        for n in names:
            keep = torch.tensor(pattern[f"{n}.lora_E"])
            m.get_submodule(n).lora_E["default"][~keep] = 0.0
    m._nf4lora.configs["default"]["rank_pattern"] = pattern
    nl.save_adapter(m, str(tmp_path))
    fresh = _randomized(APPLY["adalora"][0](copy.deepcopy(base)), seed=1)
    nl.load_adapter(fresh, str(tmp_path), adapter_name="default")
    assert torch.allclose(_logits(fresh, x), _logits(m, x), rtol=0, atol=1e-6)
    assert fresh._nf4lora.configs["default"]["rank_pattern"] == pattern
    for n in names:
        keep = torch.tensor(pattern[f"{n}.lora_E"])
        layer = fresh.get_submodule(n)
        assert not layer.lora_A["default"].weight[~keep].any() and not layer.lora_E["default"][~keep].any()


def test_vera_without_projections_needs_the_same_key(base, tmp_path):
    """A VeRA file saved without its projections means something only over the projections its
    key regenerates: into an existing adapter of another key it is refused (with them it loads)."""
    x = tokens()
    m = _randomized(nl.apply_vera(copy.deepcopy(base), T, r=8, projection_prng_key=3, save_projection=False), 0)
    nl.save_adapter(m, str(tmp_path))
    other = _randomized(nl.apply_vera(copy.deepcopy(base), T, r=8, projection_prng_key=4), 1)
    with pytest.raises(ValueError, match="projection_prng_key=4 but the file's adapter_config.json gives 3"):
        nl.load_adapter(other, str(tmp_path), adapter_name="default")
    same = _randomized(nl.apply_vera(copy.deepcopy(base), T, r=8, projection_prng_key=3), 1)
    nl.load_adapter(same, str(tmp_path), adapter_name="default")
    assert torch.equal(_logits(same, x), _logits(m, x))
