"""Model-level QLoRA on tiny transformers models: PEFT's own properties (merge, disable, multi-adapter,
init, scaling, what trains), training with gradient checkpointing, copying and pickling."""
import copy
import math
import pickle

import pytest
import torch

import nf4lora as nl
from model_utils import dequantized_copy, randomize_adapters, rel, tiny_llama, tokens, train_losses

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture()
def qmodel(base):
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    randomize_adapters(m)
    return m


def logits(m, x):
    with torch.no_grad():
        return m(x).logits


# ------------------------------------------------------------------------------ structure
def test_params_named_like_peft_and_only_lora_trains(qmodel):
    trainable = [n for n, p in qmodel.named_parameters() if p.requires_grad]
    assert trainable and all((".lora_A.default." in n or ".lora_B.default." in n) and n.endswith(".weight")
                             for n in trainable)
    layer = qmodel.model.layers[1].mlp.up_proj
    assert isinstance(layer, nl.QLoRALinear)
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (128, 4)
    assert layer.lora_A_weight is layer.lora_A["default"].weight
    assert layer.lora_B_weight.shape == (layer.out_features, layer.r)
    sd = layer.state_dict()
    for k in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
              "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
              "lora_A.default.weight", "lora_B.default.weight"):
        assert k in sd, k


def test_from_linear_single_adapter_api():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    layer = nl.QLoRALinear.from_linear(lin, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False,
                                       blocksize=64, double_quant=True, init_lora_weights=False)
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (96, 40, 8, 2.0)
    x = torch.randn(5, 96)
    A, B = layer.lora_A_weight, layer.lora_B_weight
    want = nl.qlora_linear(x, layer.nf4_weight, A, B, 2.0, layer.bias)
    assert torch.equal(layer(x), want)
    merged = layer.merge()
    assert isinstance(merged, torch.nn.Linear) and merged.weight.dtype == torch.float32
    assert rel(merged(x), want) < 1e-5
    plain = nl.QLoRALinear.from_linear(lin, r=0)
    assert plain.r == 0 and plain.scaling == 0.0 and plain.lora_A_weight is None
    assert torch.equal(plain(x), nl.nf4_linear(x, plain.nf4_weight, plain.bias))


# ------------------------------------------------------------------------------ init & scaling
def test_init_distributions():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 64)
    layer = nl.QLoRALinear.from_linear(lin, r=16, lora_alpha=16)
    A, B = layer.lora_A_weight, layer.lora_B_weight
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in 512
    assert torch.count_nonzero(B) == 0
    assert float(A.detach().abs().max()) <= bound
    assert float(A.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    layer.add_adapter("g", r=16, lora_alpha=16, init_lora_weights="gaussian")
    Ag = layer.lora_A["g"].weight
    assert float(Ag.detach().std()) == pytest.approx(1 / 16, rel=0.05)
    assert float(Ag.detach().mean()) == pytest.approx(0, abs=3e-3)
    assert torch.count_nonzero(layer.lora_B["g"].weight) == 0
    layer.add_adapter("f", r=4, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B["f"].weight) > 0
    x = torch.randn(3, 512)
    base = nl.nf4_linear(x, layer.nf4_weight, layer.bias)
    assert torch.allclose(layer(x), base, atol=1e-6)  # B = 0: the adapter starts as a no-op


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(rslora):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    layer = nl.QLoRALinear.from_linear(lin, r=16, lora_alpha=8, use_rslora=rslora, init_lora_weights=False)
    s = 8 / math.sqrt(16) if rslora else 8 / 16
    assert layer.scaling == s
    x = torch.randn(4, 64, dtype=torch.float64)
    w = layer.nf4_weight.dequantize(torch.float64)
    A, B = layer.lora_A_weight.double(), layer.lora_B_weight.double()
    want = x @ w.T + s * (x @ A.T) @ B.T
    assert rel(layer(x.float()), want) < 1e-5


# ------------------------------------------------------------------------------ merge / disable
def test_merged_equals_unmerged_equals_merge_and_unload(qmodel, base):
    x = tokens()
    y = logits(qmodel, x)
    nl.merge_adapter(qmodel)
    assert qmodel.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
    assert rel(logits(qmodel, x), y) < 1e-5
    nl.unmerge_adapter(qmodel)
    assert torch.equal(logits(qmodel, x), y)  # unmerging is exact: the NF4 codes never changed
    merged = nl.merge_and_unload(copy.deepcopy(qmodel))
    assert not any(isinstance(m, nl.QLoRALinear) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert rel(logits(merged, x), y) < 1e-5
    # and the merged weight is W_dequant + s B A
    layer = qmodel.model.layers[0].mlp.up_proj
    w = layer.nf4_weight.dequantize(torch.float32) + layer.scaling * layer.lora_B_weight @ layer.lora_A_weight
    assert rel(merged.model.layers[0].mlp.up_proj.weight, w) < 1e-6


def test_disable_adapter_gives_base_output(qmodel, base):
    x = tokens()
    y = logits(qmodel, x)
    ref = dequantized_copy(qmodel, base)
    with nl.disable_adapter(qmodel):
        yb = logits(qmodel, x)
        nl.merge_adapter(qmodel)
        assert torch.equal(logits(qmodel, x), yb)  # disabled wins over merged
        nl.unmerge_adapter(qmodel)
    assert rel(yb, logits(ref, x)) < 1e-5
    assert rel(yb, y) > 1e-3
    assert torch.equal(logits(qmodel, x), y)
    plain = nl.quantize_model(copy.deepcopy(base), target_modules=TARGETS)
    assert torch.equal(logits(plain, x), yb)  # exactly the NF4 base model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_and_unload_keeps_model_dtype(dtype):
    m = nl.apply_qlora(tiny_llama(dtype=dtype), ["q_proj", "down_proj"], r=2)
    randomize_adapters(m)
    merged = nl.merge_and_unload(copy.deepcopy(m))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert all(p.dtype == dtype for p in merged.parameters())
    f32 = nl.merge_and_unload(copy.deepcopy(m), dtype=torch.float32)
    assert f32.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_merge_and_unload_requantize_reports_error(qmodel):
    x = tokens()
    y = logits(qmodel, x)
    m, report = nl.merge_and_unload(copy.deepcopy(qmodel), requantize=True, return_report=True)
    layers = [l for l in m.modules() if isinstance(l, nl.QLoRALinear)]
    assert len(layers) == len(report) == 8 and all(not l.lora_config for l in layers)
    assert all(0 < v["rel_error"] < 0.2 and v["adapters"] == ["default"] for v in report.values())
    assert rel(logits(m, x), y) < 0.1
    _, exact = nl.merge_and_unload(copy.deepcopy(qmodel), return_report=True)
    assert all(v["rel_error"] < 1e-7 for v in exact.values())


# ------------------------------------------------------------------------------ several adapters
def test_several_adapters(base):
    x = tokens()
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, adapter_name="one")
    nl.apply_qlora(m, ["v_proj", "down_proj"], r=2, lora_alpha=4, adapter_name="two")
    randomize_adapters(m, "one", seed=1)
    randomize_adapters(m, "two", seed=2)
    # a new adapter is added inactive and frozen (PEFT's add_adapter)
    assert m.model.layers[0].self_attn.v_proj.active_adapters == ["one"]
    assert not m.model.layers[0].self_attn.v_proj.lora_A["two"].weight.requires_grad
    ya = logits(m, x)
    nl.set_adapter(m, "two")
    yb = logits(m, x)
    assert rel(ya, yb) > 1e-3
    assert m.model.layers[0].mlp.down_proj.lora_A["two"].weight.requires_grad
    assert not m.model.layers[0].self_attn.q_proj.lora_A["one"].weight.requires_grad
    nl.set_adapter(m, "one")
    assert torch.equal(logits(m, x), ya)
    nl.set_adapter(m, ["one", "two"])
    yab = logits(m, x)
    assert rel(yab, ya) > 1e-3 and rel(yab, yb) > 1e-3
    with nl.disable_adapter(m):
        y0 = logits(m, x)
    # PEFT on the dequantized base, same adapters, both active: the same sum
    from peft import LoraConfig, get_peft_model
    ref = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=["q_proj", "v_proj"], r=4),
                         adapter_name="one")
    ref.add_adapter("two", LoraConfig(target_modules=["v_proj", "down_proj"], r=2, lora_alpha=4))
    with torch.no_grad():
        for name, layer in m.named_modules():
            if isinstance(layer, nl.QLoRALinear):
                pl = ref.base_model.model.get_submodule(name)
                for a in layer.lora_config:
                    pl.lora_A[a].weight.copy_(layer.lora_A[a].weight)
                    pl.lora_B[a].weight.copy_(layer.lora_B[a].weight)
    ref.base_model.set_adapter(["one", "two"])
    assert rel(yab, logits(ref, x)) < 1e-5
    with ref.disable_adapter():
        assert rel(y0, logits(ref, x)) < 1e-5
    # merge with both active, then delete
    nl.merge_adapter(m)
    assert rel(logits(m, x), yab) < 1e-5
    nl.delete_adapter(m, "two")  # unmerges the layers that held it; the rest stay merged
    assert rel(logits(m, x), ya) < 1e-5
    nl.unmerge_adapter(m)
    assert torch.equal(logits(m, x), ya)
    assert all("two" not in l.lora_config for l in m.modules() if isinstance(l, nl.QLoRALinear))
    assert not any(".two." in k for k in m.state_dict())
    with pytest.raises(ValueError, match="not found"):
        nl.set_adapter(m, "two")
    with pytest.raises(ValueError, match="already exists"):
        nl.apply_qlora(m, ["q_proj"], adapter_name="one")


# ------------------------------------------------------------------------------ training
def test_training_lowers_loss_and_only_lora_changes(base):
    m = nl.apply_qlora(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16, lora_dropout=0.05)
    nl.prepare_for_training(m, gradient_checkpointing=True)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = train_losses(m, tokens(batch=2, seq=8), opt, 20)
    assert losses[-1] < 0.9 * losses[0], losses
    after = m.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed), changed
    assert any(".lora_A." in k for k in changed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients(base, reentrant):
    x = tokens(batch=2, seq=12)
    grads = []
    for gc in (False, True):
        m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=4, lora_dropout=0.1)
        randomize_adapters(m)
        nl.prepare_for_training(m, gradient_checkpointing=gc,
                                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
        torch.manual_seed(123)  # the same dropout masks in both runs (checkpointing replays the RNG)
        m(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        assert grads[1][n] is not None and torch.count_nonzero(grads[0][n]) > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_full_state_dict_round_trip(base):
    """A training checkpoint (model.state_dict(): bitsandbytes keys + PEFT-named LoRA weights) loads
    into a freshly prepared model."""
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "up_proj"], r=4)
    randomize_adapters(m)
    sd = m.state_dict()
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert "model.layers.0.mlp.up_proj.lora_B.default.weight" in sd
    fresh = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "up_proj"], r=4)
    fresh.load_state_dict(sd)
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(m, x))


def test_prepared_model_deepcopies_and_pickles(base):
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4)
    randomize_adapters(m)
    nl.prepare_for_training(m, gradient_checkpointing=True)
    x = tokens()
    y = logits(m, x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(logits(clone, x), y)
        assert [n for n, p in clone.named_parameters() if p.requires_grad] == \
               [n for n, p in m.named_parameters() if p.requires_grad]
        nl.set_adapter(clone, "default")  # the adapter registry came along
    m2 = pickle.loads(pickle.dumps(m))
    m2.train()
    m2(input_ids=x, labels=x).loss.backward()  # checkpointing still works after unpickling
    assert m2.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None


# ------------------------------------------------------------------------------ LoRA+ (via PEFT)
def test_loraplus_with_peft_helper_and_paged_adamw(base):
    """LoRA+ (B learns loraplus_lr_ratio times faster than A): PEFT's create_loraplus_optimizer
    finds our adapters by their PEFT names and builds a PagedAdamW (8-bit state) with the right
    groups; a few steps train."""
    pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    m = nl.apply_qlora(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16)
    nl.prepare_for_training(m, gradient_checkpointing=False)
    opt = create_loraplus_optimizer(m, nl.PagedAdamW, lr=2e-3, loraplus_lr_ratio=16.0, optim_bits=8,
                                    min_8bit_size=256)
    assert isinstance(opt, nl.PagedAdamW)
    by_id = {id(p): n for n, p in m.named_parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[by_id[id(p)]] = g["lr"]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable
    assert all(lr == pytest.approx(2e-3 * 16) for n, lr in lrs.items() if ".lora_B." in n)
    assert all(lr == pytest.approx(2e-3) for n, lr in lrs.items() if ".lora_A." in n)
    torch.manual_seed(0)
    losses = train_losses(m, tokens(batch=2, seq=8), opt, 10)
    assert losses[-1] < losses[0], losses
    assert any(st["exp_avg"].dtype == torch.uint8 for st in opt.state.values())


@pytest.mark.parametrize("kw,match", [
    (dict(lora_dropout=1.0), "lora_dropout must be a number in"),
    (dict(lora_alpha=float("nan")), "lora_alpha for .* must be a finite number"),
    (dict(alpha_pattern={"q_proj": "2"}), "lora_alpha for .*q_proj.* must be a finite number"),
    (dict(init_lora_weights="eva"), "init_lora_weights"),  # a PEFT method nf4lora does not implement
])
def test_apply_qlora_bad_hyperparameters_leave_model_untouched(base, kw, match):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        nl.apply_qlora(m, TARGETS, r=4, **kw)
    assert not any(isinstance(l, nl.QLoRALinear) for l in m.modules())
    assert all(p.requires_grad for p in m.parameters())
