"""The AVX-512 fp32 GEMM of the CPU fused linear ("gemm512", csrc/cpu/linear_gemm_avx512.cpp):
forward and dx against the scalar csrc/ref twin and an fp64 truth on the dequantized weight, on
shapes at its tile (14 x 32), panel and block edges, with the ISA capped at avx512 (so bf16 takes
this fp32 path too, not the bf16 tile path). Outputs are poisoned with NaN before each run."""
import math

import pytest
import torch

import nf4lora as nl
from numerics import rel_err
from nf4lora import _C
from nf4lora._native import DTYPE_CODE, addr
from nf4lora.backends import default

pytestmark = pytest.mark.skipif(not _C.has_avx512(), reason="CPU lacks AVX-512 F/BW/VL/DQ")


@pytest.fixture
def isa_cap():
    """Set the ISA cap for the test (set_max_isa), restoring the previous one afterwards."""
    prev = _C.max_isa()
    try:
        yield _C.set_max_isa
    finally:
        _C.set_max_isa(prev)



def w_args(q):
    nested = q.absmax2 is not None
    return (q.packed.data_ptr(), 0 if nested else q.absmax.data_ptr(), q.absmax.data_ptr() if nested else 0,
            addr(q.absmax2), addr(q.code8), q.offset)


def forward(x, q, N, A, B, s, bias, p, seed, impl):
    """(y, u) from _C.qlora_forward into NaN-poisoned outputs."""
    M, K = x.shape
    r = 0 if A is None else A.shape[0]
    y = torch.full((M, N), float("nan"), dtype=x.dtype)
    u = torch.full((M, r), float("nan"))
    _C.qlora_forward(x.data_ptr(), DTYPE_CODE[x.dtype], M, *w_args(q), q.blocksize, N, K, addr(bias),
                     addr(A), addr(B), r, s, p, seed if p > 0 else 0, y.data_ptr(),
                     u.data_ptr() if r else 0, impl)
    return y, u


def backward_dx(dy, q, K, g, A, s, p, seed, impl):
    """dx from _C.qlora_backward_dx into a NaN-poisoned output."""
    M, N = dy.shape
    r = 0 if A is None else A.shape[0]
    dx = torch.full((M, K), float("nan"), dtype=dy.dtype)
    _C.qlora_backward_dx(dy.data_ptr(), DTYPE_CODE[dy.dtype], M, *w_args(q), q.blocksize, N, K, addr(A), r, s,
                         p, seed if p > 0 else 0, addr(g) if r else 0, dx.data_ptr(), impl)
    return dx


def truth_forward(x, W, A, B, s, bias, p, seed):
    y = x.double() @ W.t()
    if A is not None:
        xd = default.apply_dropout(x.double(), p, seed)
        y = y + s * (xd @ A.double().t()) @ B.double().t()
    return y if bias is None else y + bias.double()


def truth_dx(dy, W, g, A, s, p, seed):
    dx = dy.double() @ W
    if A is not None:
        dx = dx + s * default.apply_dropout(g.double() @ A.double(), p, seed)
    return dx


# (M, N, K, blocksize, double_quant, r, bias, dropout_p, dtype). M: one tile row short of 14 and
# past it, 32-column panels and their 16-wide halves (M = 17, 33: Mp = 32, 48), 511 (forward:
# 16 x 32 panels), 600 (two task blocks of rows in both directions); N at 14-row tile and
# 256-row chunk edges; K not a multiple of 32 (rows start at odd nibbles / unaligned groups), K
# past the 128-wide reduction chunk with the LoRA columns straddling it, blocks straddling rows.
F32 = torch.float32
CASES = [
    (17, 32, 48, 64, True, 0, False, 0.0, F32),
    (17, 48, 100, 128, False, 16, True, 0.1, F32),
    (33, 100, 1000, 64, False, 8, True, 0.3, F32),
    (33, 272, 96, 64, True, 0, True, 0.0, F32),
    (64, 130, 272, 128, True, 16, True, 0.0, F32),
    (64, 1000, 32, 64, False, 8, False, 0.0, F32),
    (511, 96, 130, 64, True, 1, False, 0.3, F32),
    (511, 33, 256, 128, False, 16, True, 0.0, F32),
    (600, 15, 64, 64, True, 1, True, 0.0, F32),
    (3, 29, 100, 64, True, 8, True, 0.2, F32),  # M <= 16 with K % 32 != 0: forward takes the GEMM too
    (1, 1, 33, 64, False, 1, True, 0.0, F32),   # one row, one output, one partial last group
    (33, 40, 64, 64, True, 130, True, 0.2, F32),  # LoRA columns past a whole reduction chunk
    (33, 100, 130, 64, True, 8, True, 0.3, torch.float16),
    (17, 130, 272, 64, False, 0, True, 0.0, torch.float16),
    (64, 96, 1000, 128, False, 16, False, 0.0, torch.bfloat16),
    (511, 48, 96, 64, True, 1, True, 0.3, torch.bfloat16),
]


def case_id(c):
    M, N, K, bs, dq, r, bias, p, dt = c
    return f"M{M}-N{N}-K{K}-bs{bs}{'-dq' if dq else ''}-r{r}{'-bias' if bias else ''}-p{p}-{str(dt)[6:]}"


def check_close(got, ref, truth, dtype):
    """got (fast) vs ref (scalar twin) and the fp64 truth."""
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) outputs"
    if dtype == torch.float32:
        assert rel_err(got, truth) <= 1e-5
        assert rel_err(got, ref) <= 1e-5
        # elementwise: summation-order noise of fp32 sums, small against the output's scale
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        # fp32 accumulators differ by summation order; after rounding to dtype at most 1 ulp apart
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), ref.float(), rtol=eps, atol=1e-5 * ref.abs().max().item())
        assert rel_err(got, truth) <= 1.05 * rel_err(ref, truth) + 1e-6


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemm512_matches_ref_and_fp64(isa_cap, case):
    M, N, K, bs, dq, r, with_bias, p, dtype = case
    g = torch.Generator().manual_seed(M * 1009 + N * 31 + K)
    q = nl.quantize_nf4(torch.randn(N, K, generator=g), bs, double_quant=dq)
    W = q.dequantize(torch.float64)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = torch.randn(r, K, generator=g) / math.sqrt(K) if r else None
    B = torch.randn(N, r, generator=g) if r else None
    bias = torch.randn(N, generator=g) if with_bias else None
    s, seed = 2.0 / max(r, 1), 1234 + M
    dy = torch.randn(M, N, generator=g).to(dtype)
    gg = dy.float() @ B if r else None

    isa_cap("avx512")
    assert _C.forward_path(M, N, K, DTYPE_CODE[dtype]) == "gemm512"
    assert _C.backward_path(M, N, K, DTYPE_CODE[dtype]) == "gemm512"
    y, u = forward(x, q, N, A, B, s, bias, p, seed, "fast")
    dx = backward_dx(dy, q, K, gg, A, s, p, seed, "fast")
    yr, ur = forward(x, q, N, A, B, s, bias, p, seed, "ref")
    dxr = backward_dx(dy, q, K, gg, A, s, p, seed, "ref")

    assert y.dtype == dtype and dx.dtype == dtype
    if r:
        torch.testing.assert_close(u, ur, rtol=1e-5, atol=1e-5)
    check_close(y, yr, truth_forward(x, W, A, B, s, bias, p, seed), dtype)
    check_close(dx, dxr, truth_dx(dy, W, gg, A, s, p, seed), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm512_and_avx2_gemm_agree(isa_cap, dtype):
    """The same call under the avx2 cap takes the AVX2 6x16 kernel ("gemm"); both agree."""
    M, N, K, r = 45, 70, 160, 4
    g = torch.Generator().manual_seed(7)
    q = nl.quantize_nf4(torch.randn(N, K, generator=g), 64, double_quant=True)
    x = torch.randn(M, K, generator=g).to(dtype)
    A, B, bias = torch.randn(r, K, generator=g) / 8, torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g).to(dtype)
    gg = dy.float() @ B
    out = {}
    for cap, name in (("avx512", "gemm512"), ("avx2", "gemm")):
        isa_cap(cap)
        assert _C.forward_path(M, N, K, DTYPE_CODE[dtype]) == name
        assert _C.backward_path(M, N, K, DTYPE_CODE[dtype]) == name
        assert _C.backward_path(1, N, K, DTYPE_CODE[dtype]) == name  # dx never takes the GEMV
        out[name] = (forward(x, q, N, A, B, 0.5, bias, 0.1, 5, "fast")[0],
                     backward_dx(dy, q, K, gg, A, 0.5, 0.1, 5, "fast"))
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    for a, b in zip(out["gemm512"], out["gemm"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=1e-5 * b.abs().max().item())


def test_gemm512_repeated_calls_and_shape_changes(isa_cap):
    """Kept per-thread scratch: a big call, then smaller and larger ones, all still exact."""
    isa_cap("avx512")
    g = torch.Generator().manual_seed(3)
    for M, N, K in ((200, 64, 512), (20, 30, 64), (300, 40, 700), (20, 30, 64)):
        q = nl.quantize_nf4(torch.randn(N, K, generator=g), 64, double_quant=False)
        x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
        W = q.dequantize(torch.float64)
        assert rel_err(forward(x, q, N, None, None, 0.0, None, 0.0, 0, "fast")[0], x.double() @ W.t()) <= 1e-5
        assert rel_err(backward_dx(dy, q, K, None, None, 0.0, 0.0, 0, "fast"), dy.double() @ W) <= 1e-5
