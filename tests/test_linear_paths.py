"""Every CPU path of the fused linear (issue 10): the bf16 tile paths (AMX-BF16, AVX512-BF16) against
their csrc/ref twin (W rounded to bf16, fp32 sums) on awkward shapes, the error model against torch's
own bf16 F.linear, the dispatcher's decisions as data, and each forcible path giving the same answer
within its error model. A path the CPU lacks is skipped with the reason."""
import math

import pytest
import torch

import nf4lora as nl
from numerics import rel_err
from nf4lora import _C
from nf4lora.backends import cpu_linear

BF16 = torch.bfloat16
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}



def tier_available(tier):
    """Why `tier` cannot run here (a skip reason), or None when it can."""
    have = {
        "scalar": True,
        "avx2": _C.has_avx2(),
        "avx512": _C.has_avx512(),
        "avx512_bf16": _C.has_avx512bf16(),
        "amx": _C.has_amx_bf16() and _C.amx_status() == "granted",
    }
    if not have[tier]:
        detail = f" ({_C.amx_status()})" if tier == "amx" else ""
        return f"this CPU cannot run the {tier} tier{detail}"
    return None


def need(tier):
    reason = tier_available(tier)
    if reason:
        pytest.skip(reason)


def make(N, K, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nl.quantize_nf4(torch.randn(N, K, generator=g) * 0.05, blocksize, double_quant=double_quant)


def state(q):
    return (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)


TILE_TIERS = ["amx", "avx512_bf16"]
# (M, N, K): M off the 16/32-row tiles, N at and off the 16/32-row pairs and the 64-row tasks, K at
# 32-column steps, off them (element-wise decode), and past one 4096-column chunk
TILE_SHAPES = [
    (1, 16, 32), (3, 33, 64), (15, 64, 96), (17, 31, 128), (33, 80, 70), (64, 100, 160),
    (511, 48, 256), (2, 65, 4096 + 64), (40, 130, 1000), (19, 37, 95),  # odd K: rows start mid-byte
]


@pytest.mark.parametrize("tier", TILE_TIERS)
@pytest.mark.parametrize("M,N,K", TILE_SHAPES)
@pytest.mark.parametrize("bs,dq", [(64, True), (128, False)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_tile_path_matches_its_reference(tier, M, N, K, bs, dq, p):
    """Forward (y and u) and dx of a bf16 tile path against csrc/ref with W rounded to bf16: the
    same products summed in another order, so the fp32 sums agree to ~1e-6 and the bf16 outputs
    to one rounding step."""
    need(tier)
    r = 3 if K % 2 else 4
    q = make(N, K, bs, dq, seed=M * 7 + N + K)
    g = torch.Generator().manual_seed(M + 3 * N + K)
    x = torch.randn(M, K, generator=g).to(BF16)
    A, B = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g)
    bias = torch.randn(N, generator=g)
    seed = torch.tensor(1234)
    dy = torch.randn(M, N, generator=g).to(BF16)
    gg = dy.float() @ B
    with nl.max_cpu_isa(tier):
        fwd = _C.forward_path(M, N, K, CODE[BF16])
        small = "gemv512" if K % 32 == 0 else _C.forward_path(M, N, K, CODE[torch.float32])
        assert fwd == (tier if M >= _C.BF16_TILE_MIN_ROWS else small)
        assert _C.backward_path(M, N, K, CODE[BF16]) == tier
        y, u = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, p, seed)
        dx = cpu_linear.qlora_backward_dx(dy, *state(q), K, gg, A, 0.7, p, seed)
    ref = "ref_bf16w" if fwd == tier else "ref"
    yr, ur = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, p, seed, impl=ref)
    dxr = cpu_linear.qlora_backward_dx(dy, *state(q), K, gg, A, 0.7, p, seed, impl="ref_bf16w")
    torch.testing.assert_close(u, ur, rtol=1e-5, atol=1e-5)
    for got, want in ((y, yr), (dx, dxr)):
        assert got.dtype == BF16
        assert rel_err(got, want) <= 2e-3
        # one bf16 step (2^-8 relative) where the fp32 sums straddle a rounding boundary
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5 * want.float().abs().max().item())


def test_tile_decode_equals_dequantize():
    """The tile path's W is the bf16 tensor dequantize_nf4 gives: an identity x recovers it."""
    tiers = [t for t in TILE_TIERS if tier_available(t) is None]
    if not tiers:
        pytest.skip("no bf16 tile path on this CPU")
    N, K = 96, 256
    q = make(N, K, seed=5)
    eye = torch.eye(K, dtype=BF16)
    for tier in tiers:
        with nl.max_cpu_isa(tier):
            wt = nl.nf4_linear(eye, q)  # [K, N] = I W^T
        assert torch.equal(wt.t(), nl.dequantize_nf4(q, BF16)), tier


def torch_bf16_layer(x, w16, A, B, s):
    """What a user gets from torch in bf16: the dequantized weight and the LoRA in bf16."""
    return x @ w16.t() + s * ((x @ A.to(BF16).t()) @ B.to(BF16).t())


@pytest.mark.parametrize("tier", TILE_TIERS + ["avx512", "avx2"])
@pytest.mark.parametrize("M,N,K", [(64, 256, 512), (7, 96, 4096 + 32)])
def test_bf16_error_model_fwd_and_grads(tier, M, N, K):
    """Each path's y, dx, dA and dB within 2x the error of torch's bf16 computation on the
    dequantized weight, both measured against fp64 on the same (NF4) weight."""
    need(tier)
    r, s = 16, 0.5
    q = make(N, K, seed=M + K)
    g = torch.Generator().manual_seed(N)
    x = torch.randn(M, K, generator=g).to(BF16).requires_grad_()
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).requires_grad_()
    B = (torch.randn(N, r, generator=g) / 4).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(BF16)
    with nl.max_cpu_isa(tier):
        y = nl.qlora_linear(x, q, A, B, s)
        y.backward(dy)
    w64 = q.dequantize(torch.float64)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ w64.t() + s * (x64 @ A64.t()) @ B64.t()
    y64.backward(dy.double())
    xt, At, Bt = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yt = torch_bf16_layer(xt, q.dequantize(BF16), At, Bt, s)
    yt.backward(dy)
    for name, got, torch_val, want in (("y", y, yt, y64), ("dx", x.grad, xt.grad, x64.grad),
                                       ("dA", A.grad, At.grad, A64.grad), ("dB", B.grad, Bt.grad, B64.grad)):
        assert rel_err(got, want) <= 2 * max(rel_err(torch_val, want), 1e-6), name


# The dispatcher's decisions as data: (tier cap, activation dtype, M, N, K) -> (forward, backward).
# A row runs where the CPU has that tier's features.
DISPATCH = [
    ("amx", BF16, 1, 4096, 4096, "gemv512", "amx"),
    ("amx", BF16, 2, 4096, 4096, "gemv512", "amx"),  # below BF16_TILE_MIN_ROWS the GEMV streams faster
    ("amx", BF16, 3, 4096, 4096, "amx", "amx"),
    ("amx", BF16, 512, 4096, 11008, "amx", "amx"),
    ("amx", BF16, 512, 64, 70, "amx", "amx"),
    ("amx", torch.float32, 4, 4096, 4096, "gemv512", "gemm512"),
    ("amx", torch.float32, 8, 4096, 4096, "gemv512", "gemm512"),
    ("amx", torch.float32, 9, 4096, 4096, "gemm512", "gemm512"),  # AVX-512 GEMM beats the AVX2 GEMV
    ("amx", torch.float32, 16, 4096, 4096, "gemm512", "gemm512"),
    ("amx", torch.float32, 512, 4096, 4096, "gemm512", "gemm512"),
    ("amx", torch.float16, 512, 4096, 4096, "gemm512", "gemm512"),
    ("avx512_bf16", BF16, 1, 4096, 4096, "gemv512", "avx512_bf16"),
    ("avx512_bf16", BF16, 16, 4096, 4096, "avx512_bf16", "avx512_bf16"),
    ("avx512", BF16, 4, 4096, 4096, "gemv512", "gemm512"),
    ("avx512", BF16, 5, 4096, 4096, "gemv512", "gemm512"),
    ("avx512", BF16, 17, 4096, 4096, "gemm512", "gemm512"),
    ("avx512", torch.float32, 4, 64, 70, "gemm512", "gemm512"),  # K % 32 != 0: the panel GEMM
    ("avx2", BF16, 1, 4096, 4096, "gemv", "gemm"),
    ("avx2", BF16, 16, 4096, 4096, "gemv", "gemm"),
    ("avx2", torch.float32, 4, 64, 70, "gemm", "gemm"),
    ("avx2", torch.float32, 17, 4096, 4096, "gemm", "gemm"),
    ("scalar", BF16, 512, 4096, 4096, "ref", "ref"),
    ("scalar", torch.float32, 1, 4096, 4096, "ref", "ref"),
]


@pytest.mark.parametrize("tier,dtype,M,N,K,fwd,bwd", DISPATCH)
def test_dispatch_table(tier, dtype, M, N, K, fwd, bwd):
    need(tier)
    with nl.max_cpu_isa(tier):
        assert _C.forward_path(M, N, K, CODE[dtype]) == fwd
        assert _C.backward_path(M, N, K, CODE[dtype]) == bwd


def test_cap_is_restored_and_validated():
    before = _C.max_isa()
    with pytest.raises(RuntimeError):
        with nl.max_cpu_isa("avx2"):
            assert _C.max_isa() == "avx2"
            raise RuntimeError("inside")
    assert _C.max_isa() == before
    with pytest.raises(ValueError, match="tier must be one of"):
        with nl.max_cpu_isa("sse9"):
            pass
    with pytest.raises(ValueError, match="max_isa must be one of"):
        _C.set_max_isa("sse9")
    assert _C.max_isa() == before


def test_info_reports_what_runs():
    info = nl.info()
    feats = info["cpu"]["features"]
    assert feats["avx2"] == _C.has_avx2() and feats["amx_bf16"] == _C.has_amx_bf16()
    assert info["cpu"]["amx"] == "granted" or info["cpu"]["amx"] == "not present" or \
        info["cpu"]["amx"].startswith("refused: ")
    assert info["threads"] >= 1 and info["max_isa"] in nl.dispatch.TIERS
    for name, dtype in (("float32", torch.float32), ("bfloat16", BF16), ("float16", torch.float16)):
        assert info["paths"][name]["forward M=512"] == _C.forward_path(512, 4096, 4096, CODE[dtype])
        assert info["paths"][name]["backward M=16"] == _C.backward_path(16, 4096, 4096, CODE[dtype])
    if tier_available("amx") is None:
        assert info["paths"]["bfloat16"]["forward M=512"] == "amx"
        with nl.max_cpu_isa("avx512"):
            assert nl.info()["paths"]["bfloat16"]["forward M=512"] != "amx"
    import json
    json.dumps(info)


def test_every_forcible_path_agrees():
    """One bf16 layer's forward and input gradient on every tier this CPU can force: each within
    its error model of fp64 (fp32 paths: the output rounding only)."""
    M, N, K, r = 33, 64, 256, 8
    q = make(N, K, seed=11)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(BF16)
    A, B = torch.randn(r, K, generator=g) / 16, torch.randn(N, r, generator=g) / 4
    dy = torch.randn(M, N, generator=g).to(BF16)
    w64 = q.dequantize(torch.float64)
    want_y = x.double() @ w64.t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    want_dx = dy.double() @ w64 + 0.5 * (dy.double() @ B.double()) @ A.double()
    torch_err = rel_err(torch_bf16_layer(x, q.dequantize(BF16), A, B, 0.5), want_y)
    ran = []
    for tier in nl.dispatch.TIERS:
        if tier_available(tier):
            continue
        with nl.max_cpu_isa(tier):
            xx = x.clone().requires_grad_()
            y = nl.qlora_linear(xx, q, A, B, 0.5)
            y.backward(dy)
        exact = _C.forward_path(M, N, K, CODE[BF16]) not in TILE_TIERS or tier in ("scalar", "avx2", "avx512")
        bound = 2 ** -8 if exact else 2 * torch_err
        assert rel_err(y, want_y) <= bound, tier
        assert rel_err(xx.grad, want_dx) <= max(bound, 2 * torch_err), tier
        ran.append(tier)
    assert "scalar" in ran and len(ran) >= 2


@pytest.mark.parametrize("tier", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16])
@pytest.mark.parametrize("M,K,r", [(1, 16, 1), (17, 33, 12), (100, 100, 13), (33, 70, 30)])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_lora_grad_a_matches_ref(tier, dtype, M, K, r, p):
    """dA = s g^T D(x) on each vector path vs the scalar reference (row blocks of 12, column tails)."""
    need(tier)
    gen = torch.Generator().manual_seed(M * K + r)
    gg = torch.randn(M, r, generator=gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    seed = torch.tensor(77)
    with nl.max_cpu_isa(tier):
        dA = cpu_linear.lora_grad_a(gg, x, 0.3, p, seed)
    dAr = cpu_linear.lora_grad_a(gg, x, 0.3, p, seed, impl="ref")
    torch.testing.assert_close(dA, dAr, rtol=1e-5, atol=1e-5 * dAr.abs().max().item())


def test_amx_refused_falls_back_and_says_so():
    """Where the XTILEDATA permission is refused (simulated: NF4LORA_NO_AMX=1), bf16 takes the next
    path and info() says why; results stay within the bf16 error model."""
    if not _C.has_amx_bf16():
        pytest.skip("CPU has no AMX-BF16: nothing to refuse")
    import subprocess
    import sys
    code = (
        "import json, torch, nf4lora as nl\n"
        "i = nl.info()\n"
        "q = nl.quantize_nf4(torch.randn(64, 128), 64)\n"
        "x = torch.randn(33, 128).bfloat16()\n"
        "y = nl.nf4_linear(x, q).float()\n"
        "w = nl.dequantize_nf4(q, torch.float64)\n"
        "err = ((y.double() - x.double() @ w.t()).norm() / (x.double() @ w.t()).norm()).item()\n"
        "print(json.dumps({'amx': i['cpu']['amx'], 'path': i['paths']['bfloat16']['forward M=512'], 'err': err}))\n")
    import os
    env = dict(os.environ, NF4LORA_NO_AMX="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["amx"].startswith("refused: ")
    assert got["path"] == ("avx512_bf16" if _C.has_avx512bf16() else "gemm512")
    assert got["err"] < 1e-2
