"""Structured LoRA kinds. Block-diagonal LoRA (apply_qlora(..., lora_blocks=n)): forward, every
gradient and merge against a float64 reference on the dequantized base, n x fewer parameters, its
own file layout round trip, bad configs rejected before the model changes. LoKr (apply_lokr,
PEFT's LOKR): PEFT's LoKr on the dequantized base as the oracle (names, shapes, init, forward,
every gradient, merge, files both ways)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import nf4lora as nl
from model_utils import (assert_edited_config_rejected, assert_files_round_trip,
                         assert_eval_and_merge_match_peft, assert_mixed_batch_matches_single,
                         assert_training_step_matches_peft, dequantized_copy, randomize_both, rel, tiny_llama,
                         tokens, train_losses)

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _untouched(model):
    return not any(isinstance(m, nl.QLoRALinear) for m in model.modules())


# ------------------------------------------------------------------ block-diagonal LoRA
def _blocks_layer(n, r, K, N, bias, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    layer = nl.QLoRALinear.from_linear(lin, r=0)
    layer.add("default", nl.adapters.BlockLoraConfig(r=r, lora_alpha=16, lora_blocks=n), init_lora_weights=False)
    layer.set_adapter("default")
    return layer


@pytest.mark.parametrize("n,r,K,N,bias", [(2, 8, 64, 96, True), (4, 4, 128, 64, False), (1, 4, 32, 48, True),
                                          (3, 6, 63, 33, True)])
def test_blocks_forward_gradients_merge_vs_fp64(n, r, K, N, bias):
    layer = _blocks_layer(n, r, K, N, bias)
    Ab, Bb = layer.lora_block_A["default"], layer.lora_block_B["default"]
    assert Ab.shape == (n, r // n, K // n) and Bb.shape == (n, N // n, r // n)
    x = torch.randn(3, 5, K, requires_grad=True)
    # fp64 reference: dense block-diagonal A, B on the dequantized weight
    W = layer.nf4_weight.dequantize(torch.float64)
    Ar, Br = Ab.detach().double().requires_grad_(), Bb.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    A, B = torch.block_diag(*Ar), torch.block_diag(*Br)
    assert A.shape == (r, K) and B.shape == (N, r)
    assert int((A != 0).sum()) == Ab.numel()  # nonzero only in the diagonal blocks
    yr = xr @ W.t() + (16 / r) * (xr @ A.t()) @ B.t()
    if bias:
        yr = yr + layer.bias.double()
    y = layer(x)
    assert rel(y, yr) < 1e-5
    g = torch.randn_like(yr)
    y.backward(g.float())
    yr.backward(g)
    for ours, ref in ((Ab.grad, Ar.grad), (Bb.grad, Br.grad), (x.grad, xr.grad)):
        assert rel(ours, ref) < 1e-5
    merged = layer.merge(dtype=torch.float32)
    assert rel(merged.weight, W + (16 / r) * B.detach() @ A.detach()) < 1e-6
    with torch.no_grad():
        assert rel(merged(x), yr) < 1e-5


def test_blocks_model_parameters_merge_and_files(base, tmp_path):
    x = tokens()
    dense = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=8)
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=8, lora_blocks=4, init_lora_weights=False)
    t_dense, t_blocks = nl.lora.trainable_parameters(dense)[0], nl.lora.trainable_parameters(m)[0]
    assert t_dense == 4 * t_blocks
    assert all(".lora_block_" in n for n, p in m.named_parameters() if p.requires_grad)
    # the model equals the same adapter run as dense LoRA (A, B the assembled block-diagonal ones)
    nl.apply_qlora(m, TARGETS, r=8, adapter_name="dense")
    with torch.no_grad():
        for _, layer in nl.lora.model.qlora_layers(m):
            A, B = layer._low_rank("default")
            layer.lora_A["dense"].weight.copy_(A)
            layer.lora_B["dense"].weight.copy_(B)
        want = m(x).logits
        nl.set_adapter(m, "dense")
        assert rel(m(x).logits, want) < 1e-6
        nl.set_adapter(m, "default")
    nl.delete_adapter(m, "dense")
    with torch.no_grad():
        nl.merge_adapter(m)
        assert rel(m(x).logits, want) < 1e-5
        nl.unmerge_adapter(m)
    with pytest.raises(NotImplementedError, match="NF4LORA_BLOCKDIAG"):
        nl.add_weighted_adapter(m, ["default"], [1.0], "mix")
    # nf4lora's own file layout: round trip; PEFT refuses it
    nl.save_adapter(m, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "NF4LORA_BLOCKDIAG" and cfg["lora_blocks"] == 4 and cfg["r"] == 8
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_block_A"].shape == (4, 2, 32)
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_block_B"].shape == (4, 16, 2)
    back = nl.load_adapter(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    with torch.no_grad():
        assert rel(back(x).logits, want) < 1e-6
    assert nl.lora.trainable_parameters(back)[0] == t_blocks
    peft = pytest.importorskip("peft")
    with pytest.raises(KeyError, match="NF4LORA_BLOCKDIAG"):  # PEFT does not know the kind
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))


@pytest.mark.parametrize("kw,match", [
    (dict(lora_blocks=0), "lora_blocks must be a positive int"),
    (dict(lora_blocks=2.0), "lora_blocks must be a positive int"),
    (dict(lora_blocks=3), "lora_blocks=3 must divide r=8"),
    (dict(lora_blocks=2, rank_pattern={"down_proj": 3}), "must divide r=3 of 'model.layers.0.mlp.down_proj'"),
    (dict(r=12, lora_blocks=3), "lora_blocks=3 must divide in_features=64"),
    (dict(lora_blocks=2, use_dora=True), "use_dora is not supported"),
])
def test_blocks_bad_configs_rejected_before_the_model_changes(base, kw, match):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        nl.apply_qlora(m, TARGETS, **{"r": 8, **kw})
    assert _untouched(m)


def test_blocks_bad_file_rejected(base, tmp_path):
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=8, lora_blocks=2)
    nl.save_adapter(m, str(tmp_path))
    assert_edited_config_rejected(base, tmp_path, dict(lora_blocks=4),
                                  "lora_block_A' must be a floating tensor of shape \\(4, 2, 16\\)")
    assert_edited_config_rejected(base, tmp_path, dict(lora_blocks=1), "lora_blocks must be an int >= 2")


# ------------------------------------------------------------------ LoKr vs PEFT
peft = pytest.importorskip("peft")
from peft import LoKrConfig, get_peft_model  # noqa: E402
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402


def test_factorization_is_peft_s():
    from nf4lora.adapters.lokr import factorization
    for dim in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16, 100):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def _lokr_pair(base, r=4, alpha=8, init_weights=False, **kw):
    m = nl.apply_lokr(copy.deepcopy(base), TARGETS, r=r, alpha=alpha, init_weights=init_weights, **kw)
    pm = get_peft_model(dequantized_copy(m, base), LoKrConfig(target_modules=TARGETS, r=r, alpha=alpha,
                                                              init_weights=init_weights, **kw))
    randomize_both(m, pm, scale=0.3, seed=5)
    return m, pm


CASES = [dict(), dict(decompose_both=True, r=2), dict(r=16), dict(decompose_factor=4, alpha=3),
         dict(rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 5})]


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
def test_lokr_parameters_and_init_as_peft(base, init_weights):
    for kw in CASES[:3]:
        m = nl.apply_lokr(copy.deepcopy(base), TARGETS, init_weights=init_weights, **{"r": 4, **kw})
        pm = get_peft_model(dequantized_copy(m, base), LoKrConfig(target_modules=TARGETS, init_weights=init_weights,
                                                                  **{"r": 4, **kw}))
        ours = {n: p for n, p in m.named_parameters() if p.requires_grad}
        theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters() if p.requires_grad}
        assert {n: tuple(p.shape) for n, p in ours.items()} == {n: tuple(p.shape) for n, p in theirs.items()}
        for n, p in ours.items():
            assert bool((p == 0).all()) == bool((theirs[n] == 0).all()), n  # the same parts start at zero
    if init_weights is not False:  # PEFT's init is a no-op adapter
        x = tokens()
        with torch.no_grad(), nl.disable_adapter(m):
            plain = m(x).logits
        with torch.no_grad():
            assert rel(m(x).logits, plain) < 1e-6


@pytest.mark.parametrize("kw", CASES)
def test_lokr_forward_gradients_merge_match_peft(base, kw):
    m, pm = _lokr_pair(base, **kw)
    x = tokens()
    assert len(assert_training_step_matches_peft(m, pm, x, grad_tol=1e-5)) >= 2 * 2 * len(TARGETS)
    assert_eval_and_merge_match_peft(m, pm, x, TARGETS)


@pytest.mark.parametrize("kw", [CASES[1], CASES[4]])
def test_lokr_files_both_ways(base, tmp_path, kw):
    x = tokens()
    m, _ = _lokr_pair(base, **kw)
    nl.save_adapter(m, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR" and cfg["r"] == kw.get("r", 4)
    assert_files_round_trip(m, base, tmp_path / "ours", x)
    # PEFT -> nf4lora
    q = nl.quantize_model(copy.deepcopy(base), target_modules=TARGETS)
    pm = get_peft_model(dequantized_copy(q, base), LoKrConfig(target_modules=TARGETS, init_weights=False,
                                                              **{"r": 4, **kw}))
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert theirs == set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    loaded = nl.load_adapter(q, str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel(loaded(x).logits, pm(x).logits) < 1e-5


@pytest.mark.parametrize("kw", [dict(rank_dropout=0.3), dict(rank_dropout=0.3, rank_dropout_scale=True),
                                dict(module_dropout=0.5), dict(rank_dropout=0.5, module_dropout=0.3, r=16)])
def test_lokr_dropouts_match_peft_with_the_same_rng(base, kw):
    """PEFT's rank_dropout (rows of the delta, optionally rescaled) and module_dropout (the whole
    term per forward), drawn from torch's RNG in PEFT's order: seeded training steps give PEFT's
    losses and gradients, dropped modules and masks included; eval ignores them."""
    m, pm = _lokr_pair(base, **kw)
    x = tokens()
    m.train(), pm.train()
    losses = set()
    for seed in range(6):
        torch.manual_seed(seed)
        lm = m(input_ids=x, labels=x).loss
        torch.manual_seed(seed)
        lp = pm(input_ids=x, labels=x).loss
        assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp)), seed
        losses.add(round(float(lm), 6))
        for p in list(m.parameters()) + list(pm.parameters()):
            p.grad = None
        assert lm.requires_grad == lp.requires_grad  # every module dropped on both sides, or not
        if lm.requires_grad:
            lm.backward(), lp.backward()
        theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters() if p.requires_grad}
        for n, p in m.named_parameters():
            if p.requires_grad:
                g, h = p.grad, theirs[n].grad
                assert (g is None or not g.any()) == (h is None or not h.any()), n  # dropped together
                if h is not None and h.any():
                    assert rel(g, h) < 1e-5, (seed, n)
    assert len(losses) > 1  # the draws differ per seed: the dropouts act
    m.eval(), pm.eval()
    with torch.no_grad():
        assert rel(m(x).logits, pm(x).logits) < 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(rank_dropout=1.0), "rank_dropout must be a number in"),
    (dict(module_dropout=-0.5), "module_dropout must be a number in"),
    (dict(rank_dropout_scale="yes"), "rank_dropout_scale must be True or False"),
    (dict(r=0), "r must be a positive int"),
    (dict(alpha=float("nan")), "lora_alpha must be a finite number"),
    (dict(decompose_both="yes"), "decompose_both must be True or False"),
    (dict(decompose_factor=2.5), "decompose_factor must be an int"),
    (dict(init_weights="pissa"), "init_weights must be True, False or 'lycoris'"),
    (dict(rank_pattern={"q_proj": -1}), "r must be a positive int"),
])
def test_lokr_bad_configs_rejected_before_the_model_changes(base, kw, match):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        nl.apply_lokr(m, TARGETS, **kw)
    assert _untouched(m)


def test_lokr_bad_files_rejected(base, tmp_path):
    m, _ = _lokr_pair(base)
    nl.save_adapter(m, str(tmp_path))
    for change, match in ((dict(r=16), "unexpected key .*lokr_w2_a'"),
                          (dict(rank_dropout=1.2), "rank_dropout must be a number in"),
                          (dict(rank_dropout_scale="no"), "rank_dropout_scale must be true or false"),
                          (dict(decompose_both=1), "decompose_both must be true or false"),
                          (dict(use_effective_conv2d=True), "use_effective_conv2d")):
        assert_edited_config_rejected(base, tmp_path, change, match, exc=(ValueError, NotImplementedError))


def test_lokr_trains_and_mixes_with_lora(base):
    m = nl.apply_lokr(copy.deepcopy(base), TARGETS, r=4, init_weights=True)
    nl.prepare_for_training(m, gradient_checkpointing=False)
    assert all(".lokr_w" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    losses = train_losses(m, tokens(), opt, 8)
    assert losses[-1] < 0.95 * losses[0], losses
    nl.apply_qlora(m, ["q_proj"], r=4, adapter_name="lora", init_lora_weights=False)
    m.eval()
    assert_mixed_batch_matches_single(m, ["lora", "default", "__base__"])
    nl.delete_adapter(m, "default")
    assert not any("lokr" in n for n, _ in m.named_parameters())
