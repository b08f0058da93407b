"""Target matching against PEFT itself: for each configuration, the modules nf4lora adapts and their
ranks and scalings equal what PEFT's get_peft_model picks on the same model."""
import copy

import pytest
import torch

import nf4lora as nl
from model_utils import tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama4():
    # 4 layers x 7 linears = 28 >= 20: PEFT condenses long target lists into suffixes here
    return tiny_llama(layers=4, hidden=32, inter=48)


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    return BertModel(cfg)


def peft_pick(model, **kw):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**kw))
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, LoraLayer):
            out[name] = (m.r["default"], m.scaling["default"])
    return out


def ours_pick(model, **kw):
    m = nl.apply_qlora(copy.deepcopy(model), **kw)
    return {name: (l.r, l.scaling) for name, l in m.named_modules() if isinstance(l, nl.QLoRALinear)}


LLAMA_CASES = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "mlp.down_proj"]),
    dict(target_modules=r"model\.layers\.[01]\.self_attn\.(q|k)_proj"),
    dict(target_modules=r".*mlp\..*_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["k_proj", "mlp.up_proj"]),
    dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[2], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["lm_head", "q_proj"]),
    dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=16,
         rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 6}, alpha_pattern={"v_proj": 32}),
    dict(target_modules="all-linear", r=8, rank_pattern={r"layers\.[23]\..*": 3, "o_proj": 5},
         alpha_pattern={r"layers\.3\.self_attn\..*": 2}),
    dict(target_modules=["q_proj", "k_proj"], r=16, lora_alpha=8, use_rslora=True),
]


@pytest.mark.parametrize("kw", LLAMA_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())[:60])
def test_matching_equals_peft_llama(llama4, kw):
    want = peft_pick(llama4, **kw)
    got = ours_pick(llama4, **kw)
    assert sorted(got) == sorted(want)
    for name, (r, s) in want.items():
        assert got[name][0] == r, name
        assert got[name][1] == pytest.approx(s, rel=1e-12), name


BERT_CASES = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=["query", "dense"], layers_to_transform=[0, 2], layers_pattern="layer"),
    dict(target_modules="all-linear"),
    dict(target_modules=r"encoder\.layer\.\d\.attention\.self\.(query|key)"),
    dict(target_modules=["dense"], rank_pattern={r"attention\.output\.dense": 2}),
]


@pytest.mark.parametrize("kw", BERT_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())[:60])
def test_matching_equals_peft_bert(bert, kw):
    want = peft_pick(bert, **kw)
    got = ours_pick(bert, **kw)
    assert sorted(got) == sorted(want)
    assert {n: v[0] for n, v in got.items()} == {n: v[0] for n, v in want.items()}


def test_bad_configs_rejected_like_peft(llama4):
    with pytest.raises(ValueError, match="layers_to_transform"):
        nl.apply_qlora(copy.deepcopy(llama4), target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_to_transform"):
        nl.apply_qlora(copy.deepcopy(llama4), target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern"):
        nl.apply_qlora(copy.deepcopy(llama4), target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="matched no module"):
        nl.apply_qlora(copy.deepcopy(llama4), target_modules=["nope_proj"])
    with pytest.raises(ValueError, match="Embedding"):
        nl.apply_qlora(copy.deepcopy(llama4), target_modules=["embed_tokens"])


def test_second_adapter_never_targets_inner_lora_linears(llama4):
    m = nl.apply_qlora(copy.deepcopy(llama4), target_modules="all-linear", r=2)
    n_layers = sum(isinstance(x, nl.QLoRALinear) for x in m.modules())
    nl.apply_qlora(m, target_modules="all-linear", r=3, adapter_name="other")
    layers = [x for x in m.modules() if isinstance(x, nl.QLoRALinear)]
    assert len(layers) == n_layers
    assert all(set(x.lora_config) == {"default", "other"} for x in layers)


def test_quantize_model_skips_head(llama4):
    m = nl.quantize_model(copy.deepcopy(llama4))
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, nl.QLoRALinear)
    layers = [x for x in m.modules() if isinstance(x, nl.QLoRALinear)]
    assert len(layers) == 28 and all(x.r == 0 and not x.lora_config for x in layers)
