"""init_adapter (lora/init_methods.py): PEFT 0.21's init_lora_weights on an NF4 base.

Oracle, per method:
- True / False / "gaussian" / "olora": PEFT's LoraModel over a bitsandbytes Linear4bit holding the
  same NF4 bytes, same seed: A, B bit-identical; olora's re-quantized base has the same bytes
  (without double quantization; with it, the same codes and the same block scales up to
  bitsandbytes' CPU approximation of the nested 8-bit step, DESIGN "NF4 format").
- "pissa" / "pissa_niter_N": PEFT refuses a 4-bit base (TypeError: "initialize PiSSA under float
  ... then re-quantize the residual"), which is what init_adapter does; the oracle is PEFT's init on
  an nn.Linear holding the dequantized base: A, B bit-identical, our base = NF4 of PEFT's residual.
- "loftq": PEFT's loftq_init computes on "cuda" (or "xpu") only, so on this CPU-only suite the
  oracle is PEFT's own loop re-run on the CPU from its pieces: bitsandbytes' Params4bit NF4
  quantization (compress_statistics=False, as loftq_init) and peft.utils.loftq_utils'
  _low_rank_decomposition.
"""
import math

import pytest
import torch

import nf4lora as nl
from nf4lora.lora import find_targets
from nf4lora.lora.init_methods import init_adapter
from numerics import rel_err as rel

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

N, K, R, ALPHA = 96, 128, 4, 8
S = ALPHA / R


class One(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def low_rank_plus_noise(n, k, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g)) * 0.05 \
        + torch.randn(n, k, generator=g) * 0.02


@pytest.fixture(scope="module")
def W():
    return low_rank_plus_noise(N, K, 6)


def bnb_linear(q):
    """A bitsandbytes Linear4bit holding q's bytes (loaded, not re-quantized)."""
    sd = q.to_bnb_state_dict("weight")
    packed = sd.pop("weight")
    stats = {k[len("weight."):]: v for k, v in sd.items()}
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=q.double_quant)
    lin.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device="cpu")
    return lin


def dense_linear(q):
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize(torch.float32))
    return lin


def peft_layer(proj, method, seed):
    torch.manual_seed(seed)
    model = get_peft_model(One(proj), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                 init_lora_weights=method))
    return model.base_model.model.proj


def ours(method, q, seed, **kw):
    torch.manual_seed(seed)
    return init_adapter(method, q, R, S, **kw)


def assert_same_adapter(layer, res):
    assert torch.equal(res.A, layer.lora_A["default"].weight.detach())
    assert torch.equal(res.B, layer.lora_B["default"].weight.detach())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("method", [True, False, "gaussian", "olora"])
def test_matches_peft_on_4bit_base(W, method, double_quant):
    q = nl.quantize_nf4(W, 64, double_quant)
    layer = peft_layer(bnb_linear(q), method, seed=5)
    res = ours(method, q, seed=5)
    assert_same_adapter(layer, res)
    if method != "olora":
        assert res.base is None
        return
    w = layer.base_layer.weight  # PEFT's re-quantized Params4bit
    assert res.base.shape == q.shape and res.base.dtype == q.dtype
    assert res.base.blocksize == q.blocksize and res.base.double_quant == double_quant
    assert torch.equal(res.base.packed, w.data.reshape(-1))
    theirs = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if double_quant:  # bitsandbytes' CPU 8-bit step of the scales is approximate
        assert rel(res.base.dequantize(torch.float32), theirs) < 1e-2
    else:
        assert torch.equal(res.base.absmax, w.quant_state.absmax)
        assert torch.equal(res.base.dequantize(torch.float32), theirs)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("method", ["pissa", "pissa_niter_2"])
def test_pissa_matches_peft_on_dequantized_base(W, method, double_quant):
    q = nl.quantize_nf4(W, 64, double_quant)
    with pytest.raises(TypeError, match="PiSSA"):  # PEFT: no PiSSA on a 4-bit base
        peft_layer(bnb_linear(q), method, seed=3)
    layer = peft_layer(dense_linear(q), method, seed=3)
    res = ours(method, q, seed=3)
    assert_same_adapter(layer, res)
    want = nl.quantize_nf4(layer.base_layer.weight.detach(), 64, double_quant)
    for a, b in zip(res.base.tensors(), want.tensors()):
        assert torch.equal(a, b)
    assert res.base.offset == want.offset


def peft_loftq_on_cpu(weight, rank, iters):
    """peft.utils.loftq_utils.loftq_init's loop with compute_device = "cpu"."""
    from peft.utils.loftq_utils import _low_rank_decomposition
    res = weight.clone()
    for i in range(iters):
        p = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False,
                              quant_type="nf4").to("cpu")
        deq = bnb.functional.dequantize_4bit(p.data, p.quant_state)
        res = weight - deq
        out = _low_rank_decomposition(res, reduced_rank=rank)
        L, Rm = out["L"], out["R"]
        if i + 1 == iters:
            break
        res = weight - torch.mm(L, Rm)
    return p, Rm, L


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_peft_loop(W, iters):
    q = nl.quantize_nf4(W, 64, double_quant=False)  # loftq_init's format
    p, A, B = peft_loftq_on_cpu(W, R, iters)
    res = init_adapter("loftq", q, R, 1.0, weight=W, loftq_iter=iters)
    assert rel(res.A, A) < 1e-5 and rel(res.B, B) < 1e-5
    if iters == 1:
        assert res.base is None  # the first round quantizes W: that is q itself
        assert torch.equal(q.packed, p.data.reshape(-1))
    else:
        assert torch.equal(res.base.packed, p.data.reshape(-1))
        assert torch.equal(res.base.absmax, p.quant_state.absmax)
    assert res.error_after < res.error_before


def test_seeded_model_draws_as_peft_layer_for_layer():
    """Under one seed, init_adapter over the targeted layers in model order gives PEFT's adapters
    for every layer (the RNG stream stays aligned: constructor draws + the method's own)."""
    from model_utils import tiny_llama
    base = tiny_llama(layers=2, hidden=64, inter=128)
    for method in ("gaussian", "pissa_niter_1"):
        dense = tiny_llama(layers=2, hidden=64, inter=128)  # (tiny_llama seeds the RNG itself)
        torch.manual_seed(11)
        pm = get_peft_model(dense,
                            LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"],
                                       init_lora_weights=method))
        torch.manual_seed(11)
        names = find_targets(base, ["q_proj", "down_proj"])
        assert len(names) == 4
        for name in names:
            q = nl.quantize_nf4(base.get_submodule(name).weight.detach(), 64, False)
            res = init_adapter(method, q, R, S, weight=base.get_submodule(name).weight,
                               compute_error=False)
            layer = pm.base_model.model.get_submodule(name)
            assert_same_adapter(layer, res)
            assert res.error_before is None and res.error_after is None


@pytest.mark.parametrize("method,kw", [("pissa", {}), ("pissa_niter_4", {}), ("olora", {}),
                                       ("loftq", {"loftq_iter": 1}), ("loftq", {"loftq_iter": 4})])
def test_error_drops_on_low_rank_plus_noise(method, kw):
    w = low_rank_plus_noise(128, 384, 8, seed=2)
    q = nl.quantize_nf4(w, 64, True)
    res = init_adapter(method, q, 16, 1.0, weight=w, **kw)
    assert res.error_after < 0.95 * res.error_before, (res.error_before, res.error_after)
    # the report is the definition: ||W - (Q + s B A)||
    Q = q if res.base is None else res.base
    want = (w - Q.dequantize(torch.float32) - res.B @ res.A).norm()
    assert math.isclose(res.error_after, float(want), rel_tol=1e-5)
    assert math.isclose(res.error_before, float((w - q.dequantize(torch.float32)).norm()), rel_tol=1e-6)


def test_error_drops_on_minilm(minilm_state_dict):
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
        w = minilm_state_dict[key]
        q = nl.quantize_nf4(w, 64, True)
        # scaling 1: PEFT's olora subtracts s Q_r R_r (at s = 2 a reflection, no gain on these)
        for method, kw in (("pissa", {}), ("pissa_niter_4", {}), ("olora", {}), ("loftq", {"loftq_iter": 2})):
            res = init_adapter(method, q, 16, 1.0, weight=w, **kw)
            assert res.error_after < 0.97 * res.error_before, (key, method, res)


def test_loftq_scaling():
    """PEFT's LoftQ ignores the scaling (A = R, B = L; peft issue 1982); loftq_scaled divides both
    by sqrt(s) so the adapter adds exactly L R."""
    w = low_rank_plus_noise(64, 128, 4, seed=4)
    q = nl.quantize_nf4(w, 64, False)
    plain = init_adapter("loftq", q, 4, 4.0, weight=w)
    scaled = init_adapter("loftq", q, 4, 4.0, weight=w, loftq_scaled=True)
    assert torch.equal(plain.A, init_adapter("loftq", q, 4, 1.0, weight=w).A)
    assert rel(4.0 * scaled.B @ scaled.A, plain.B @ plain.A) < 1e-5
    assert scaled.error_after < scaled.error_before


def test_base_keeps_format_and_dtype():
    w = low_rank_plus_noise(64, 256, 4, seed=5).to(torch.bfloat16)
    q = nl.quantize_nf4(w, 128, False)
    res = init_adapter("pissa", q, 8, 2.0, weight=w)
    assert (res.base.dtype, res.base.blocksize, res.base.double_quant) == (torch.bfloat16, 128, False)
    assert res.A.dtype == res.B.dtype == torch.float32
    assert res.A.shape == (8, 256) and res.B.shape == (64, 8)
    assert res.method == "pissa" and res.changes_base


def test_generator_is_used_and_global_rng_untouched():
    w = low_rank_plus_noise(64, 128, 4, seed=6)
    q = nl.quantize_nf4(w, 64, True)
    for method in (True, "gaussian", "pissa_niter_2", False):
        state = torch.get_rng_state()
        a = init_adapter(method, q, 4, 1.0, generator=torch.Generator().manual_seed(1))
        b = init_adapter(method, q, 4, 1.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(torch.get_rng_state(), state), method
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), method
        c = init_adapter(method, q, 4, 1.0, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(a.A, c.A), method


@pytest.mark.parametrize("method,kw,match", [
    ("pissa_niter_x", {}, "method"), ("pissa_full", {}, "method"), ("corda", {}, "does not implement"),
    ("zero", {}, "method"), (3, {}, "method"), (None, {}, "method"),
    ("pissa", {"r": 0}, "r must be"), ("olora", {"r": 97}, "r must be <="),
    (True, {"scaling": 0.0}, "scaling"), (True, {"scaling": float("nan")}, "scaling"),
    (True, {"q": "w"}, "q must be"), ("pissa", {"loftq_iter": 2}, "loftq_iter"),
    (True, {"bogus": 1}, "bogus"), ("loftq", {}, "weight="),
    ("loftq", {"weight": "W", "loftq_iter": 0}, "loftq_iter"),
    ("loftq", {"weight": "W", "loftq_bits": 8}, "loftq_bits"),
    ("pissa", {"weight": torch.zeros(3, 3)}, "weight must have"),
    ("pissa", {"weight": torch.full((N, K), float("nan"))}, "weight contains NaN"),
    (True, {"generator": 1}, "generator"), (True, {"compute_error": 1}, "compute_error"),
])
def test_bad_arguments(W, method, kw, match):
    q = nl.quantize_nf4(W, 64, True)
    args = {"q": q, "r": R, "scaling": S}
    for k in ("q", "r", "scaling"):
        if k in kw:
            args[k] = kw.pop(k)
    if kw.get("weight") == "W":
        kw["weight"] = W
    with pytest.raises(ValueError, match=match):
        init_adapter(method, args["q"], args["r"], args["scaling"], **kw)


# ------------------------------------------------------------------------------ wired into apply_qlora
@pytest.mark.parametrize("method,kw", [("pissa", {}), ("pissa_niter_2", {}), ("olora", {}),
                                       ("loftq", {"loftq_config": {"loftq_iter": 2}})])
def test_apply_qlora_with_peft_initialisations(method, kw):
    """apply_qlora(init_lora_weights=<PEFT name>): adapters and residual bases from init_adapter;
    the model's output is closer to the dense model's than plain NF4 (what the methods are for)."""
    from model_utils import tiny_llama, tokens
    dense = tiny_llama(seed=3)
    x = tokens()
    with torch.no_grad():
        want = dense(x).logits
    plain = nl.apply_qlora(tiny_llama(seed=3), "all-linear", r=8, lora_alpha=8)
    torch.manual_seed(0)
    m = nl.apply_qlora(tiny_llama(seed=3), "all-linear", r=8, lora_alpha=8, init_lora_weights=method, **kw)
    errors = m._nf4lora.configs["default"]["init_errors"]
    assert len(errors) == 14 and all(after < before for before, after in errors.values())
    with torch.no_grad():
        assert rel(m(x).logits, want) < rel(plain(x).logits, want)
    dora = nl.apply_qlora(tiny_llama(seed=3), ["q_proj"], r=4, init_lora_weights=method, use_dora=True, **kw)
    layer = dora.model.layers[0].self_attn.q_proj
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, layer.dora_weight_norm("default"))


def test_apply_qlora_init_errors():
    from model_utils import tiny_llama
    m = nl.quantize_model(tiny_llama())
    with pytest.raises(ValueError, match="dense weight"):
        nl.apply_qlora(m, ["q_proj"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights"):
        nl.apply_qlora(tiny_llama(), ["q_proj"], init_lora_weights="eva")
    with pytest.raises(ValueError, match="loftq_config"):
        nl.apply_qlora(tiny_llama(), ["q_proj"], init_lora_weights="pissa", loftq_config={"loftq_iter": 2})
