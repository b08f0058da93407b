"""The fused QLoRA linear on the CPU (issue 3): forward and every gradient against an fp64 torch
reference on the dequantized weight, the AVX2 kernels against their csrc/ref twins, gradcheck,
opcheck, torch.compile, dropout, and bad input."""
import math

import pytest
import torch

import nf4lora as nl
from numerics import rel_err
from nf4lora import _C
from nf4lora.backends import cpu_linear, default

ops = torch.ops.nf4lora



def make(N, K, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    return nl.quantize_nf4(w, blocksize, double_quant=double_quant)


def state(q):
    return (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)


def reference(x, q, A, B, s, bias, p=0.0, seed=None):
    """fp64 forward on the dequantized weight; returns y and the pieces backward needs."""
    w = q.dequantize(torch.float64)
    xd = default.apply_dropout(x.double().reshape(-1, x.shape[-1]), p, seed).reshape(x.shape)
    y = x.double() @ w.t() + s * (xd @ A.double().t()) @ B.double().t()
    if bias is not None:
        y = y + bias.double()
    return y


SHAPES = [  # (M, N, K): M across both paths, K/N off multiples of 8 and of the blocksize
    (1, 64, 128), (2, 37, 96), (7, 40, 70), (16, 130, 256), (17, 33, 64), (100, 65, 320), (513, 24, 96),
]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 16, 64])
def test_forward_backward_fp32_vs_fp64(M, N, K, r):
    q = make(N, K, seed=M + N + K)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    bias = torch.randn(N, generator=g).requires_grad_()
    s = 2.0 / r
    y = nl.qlora_linear(x, q, A, B, s, bias)
    x64, A64, B64, b64 = (t.detach().double().requires_grad_() for t in (x, A, B, bias))
    y64 = reference(x64, q, A64, B64, s, b64)
    assert rel_err(y, y64) <= 1e-5
    dy = torch.randn(M, N, generator=g)
    y.backward(dy)
    y64.backward(dy.double())
    for got, want in ((x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad), (bias.grad, b64.grad)):
        assert got.dtype == torch.float32
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 16, 100])
def test_half_precision_within_twice_torch_error(dtype, M):
    N, K, r = 96, 256, 8
    q = make(N, K, seed=M)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(r, K, generator=g) / 16).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    y = nl.qlora_linear(x, q, A, B, 0.5, None)
    assert y.dtype == dtype
    want = reference(x.detach(), q, A.detach(), B.detach(), 0.5, None)
    # torch's own error: the same computation in `dtype` (weight dequantized to dtype)
    wt = q.dequantize(dtype)
    torch_y = x.detach() @ wt.t() + 0.5 * ((x.detach() @ A.detach().to(dtype).t()) @ B.detach().to(dtype).t())
    assert rel_err(y, want) <= 2 * max(rel_err(torch_y, want), 1e-6)
    dy = torch.randn(M, N, generator=g).to(dtype)
    y.backward(dy)
    want_dx = dy.double() @ q.dequantize(torch.float64) + 0.5 * (dy.double() @ B.detach().double()) @ A.detach().double()
    torch_dx = dy @ wt + 0.5 * (dy @ B.detach().to(dtype)) @ A.detach().to(dtype)
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, want_dx) <= 2 * max(rel_err(torch_dx, want_dx), 1e-6)


@pytest.mark.parametrize("M,N,K", [(1, 20, 64), (3, 37, 96), (17, 50, 128), (40, 33, 70), (100, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fast_kernels_match_ref(M, N, K, dtype, p):
    """The dispatched kernels (GEMV/GEMM, bf16 tiles) vs their scalar csrc/ref twin on fresh inputs,
    outputs checked elementwise (tests/test_linear_paths.py forces each tier)."""
    r = 4
    q = make(N, K, blocksize=32, seed=K)
    g = torch.Generator().manual_seed(M * 7 + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    A, B, bias = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    seed = torch.tensor(99)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    tile = ("amx", "avx512_bf16")  # bf16 tile paths: W rounded to bf16, their own reference
    y, u = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, p, seed)
    yr, ur = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, p, seed,
                                      impl="ref_bf16w" if _C.forward_path(M, N, K, code) in tile else "ref")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(u, ur, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol * 10)
    dy = torch.randn(M, N, generator=g).to(dtype)
    gg = dy.float() @ B
    dx = cpu_linear.qlora_backward_dx(dy, *state(q), K, gg, A, 0.7, p, seed)
    dxr = cpu_linear.qlora_backward_dx(dy, *state(q), K, gg, A, 0.7, p, seed,
                                       impl="ref_bf16w" if _C.backward_path(M, N, K, code) in tile else "ref")
    torch.testing.assert_close(dx.float(), dxr.float(), rtol=tol, atol=tol * 10)
    dA = cpu_linear.lora_grad_a(gg, x, 0.7, p, seed)
    dAr = cpu_linear.lora_grad_a(gg, x, 0.7, p, seed, impl="ref")
    torch.testing.assert_close(dA, dAr, rtol=1e-5, atol=1e-3)


def test_scalar_fallback_matches_avx2():
    q = make(48, 128)
    x = torch.randn(20, 128)
    fast = nl.nf4_linear(x, q)
    _C.set_force_scalar(True)
    try:
        assert _C.forward_path(20, 48, 128) == "ref"
        slow = nl.nf4_linear(x, q)
    finally:
        _C.set_force_scalar(False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


# The dispatcher's decisions (which path for which CPU tier, dtype and M) are tested as a table
# in tests/test_linear_paths.py::test_dispatch_table.


GEMV512_SHAPES = [  # (M, N, K, blocksize): M <= 8, K % 32 == 0; blocks that straddle rows (K = 96,
    # blocksize 64), one block per 32-group, blocks longer than a row, a partial last block
    (1, 64, 128, 64), (2, 37, 96, 64), (3, 40, 160, 32), (4, 33, 256, 64), (1, 19, 4096, 4096),
    (4, 7, 1056, 256), (3, 130, 64, 128), (5, 33, 256, 64), (8, 40, 160, 32), (7, 19, 96, 64),
]


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("M,N,K,bs", GEMV512_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_avx512_and_avx2_match_ref(avx512, M, N, K, bs, double_quant):
    """The M <= 8 GEMV on each x86 path against the csrc/ref twin and fp64: relative Frobenius
    error 1e-5 (elementwise, a K = 4096 fp32 dot product with cancellation differs by more than
    1e-5 from the sequential ref sum on either path)."""
    if not _C.has_avx2():
        pytest.skip("CPU lacks AVX2: only the scalar reference runs")
    if avx512 and not _C.has_avx512():
        pytest.skip("CPU lacks AVX-512 F/BW/VL/DQ")
    q = make(N, K, blocksize=bs, double_quant=double_quant, seed=M * 131 + K)
    g = torch.Generator().manual_seed(N + bs)
    x = torch.randn(M, K, generator=g)
    A, B, bias = torch.randn(2, K, generator=g) / 8, torch.randn(N, 2, generator=g), torch.randn(N, generator=g)
    with nl.max_cpu_isa("avx512" if avx512 else "avx2"):
        assert _C.forward_path(M, N, K) == ("gemv512" if avx512 else "gemv")
        y, _ = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, 0.0, None)
    yr, _ = cpu_linear.qlora_forward(x, *state(q), N, A, B, 0.7, bias, 0.0, None, impl="ref")
    assert rel_err(y, yr) <= 1e-5
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    assert rel_err(y, reference(x.double(), q, A.double(), B.double(), 0.7, bias.double())) <= 1e-5


def test_outputs_fully_written():
    """Poison: every output element must be written (NaN garbage in would show)."""
    q = make(50, 96)
    x = torch.randn(19, 96)
    y = torch.full((19, 50), float("nan"))
    u = torch.full((19, 3), float("nan"))
    A, B = torch.randn(3, 96), torch.randn(50, 3)
    from nf4lora._native import addr
    _C.qlora_forward(x.data_ptr(), 0, 19, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                     addr(q.absmax2), addr(q.code8), q.offset, 64, 50, 96, 0, A.data_ptr(),
                     B.data_ptr(), 3, 1.0, 0.0, 0, y.data_ptr(), u.data_ptr(), "fast")
    assert torch.isfinite(y).all() and torch.isfinite(u).all()
    dx = torch.full((19, 96), float("nan"))
    dy = torch.randn(19, 50)
    _C.qlora_backward_dx(dy.data_ptr(), 0, 19, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                         addr(q.absmax2), addr(q.code8), q.offset, 64, 50, 96, 0, 0, 1.0, 0.0, 0, 0,
                         dx.data_ptr(), "fast")
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_leading_dims_bias_and_plain_nf4_linear(double_quant):
    q = make(24, 64, double_quant=double_quant)
    x = torch.randn(2, 3, 5, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    y = nl.nf4_linear(x, q, bias)
    assert y.shape == (2, 3, 5, 24)
    want = x.detach().double() @ q.dequantize(torch.float64).t() + bias.detach().double()
    assert rel_err(y, want) <= 1e-5
    y.sum().backward()
    want_dx = torch.ones(2, 3, 5, 24, dtype=torch.float64) @ q.dequantize(torch.float64)
    assert rel_err(x.grad, want_dx) <= 1e-5
    torch.testing.assert_close(bias.grad, torch.full((24,), 30.0))
    y2 = nl.qlora_linear(x.detach(), q, torch.zeros(4, 64), torch.zeros(24, 4), 1.0)
    assert y2.shape == (2, 3, 5, 24)


def test_gradcheck_float64_default_backend():
    q = make(12, 40, blocksize=32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(3, 40, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B, b: nl.qlora_linear(x, q, A, B, 0.5, b, dropout_p=0.25, seed=3),
                                    (x, A, B, b))
    assert torch.autograd.gradcheck(lambda x, b: nl.nf4_linear(x, q, b), (x, b))


def test_dropout_statistics_and_determinism():
    M, K = 256, 512
    p = 0.3
    mask = default.dropout_mask(M, K, p, 1234, "cpu")
    assert abs((~mask).float().mean().item() - p) < 0.01
    assert torch.equal(mask, default.dropout_mask(M, K, p, 1234, "cpu"))
    assert not torch.equal(mask, default.dropout_mask(M, K, p, 1235, "cpu"))
    # the C++ kernels use the same mask: u = D(x) A^T with A = I picks D(x) itself
    x = torch.randn(M, K)
    A = torch.eye(K)[:64]
    q = make(8, K)
    _, u = cpu_linear.qlora_forward(x, *state(q), 8, A, torch.zeros(8, 64), 1.0, None, p, torch.tensor(1234))
    want = torch.where(mask[:, :64], x[:, :64] * (1 / (1 - p)), torch.zeros(()))
    torch.testing.assert_close(u, want)
    # same torch seed -> same output; training-mode QLoRALinear draws its seed from torch's RNG
    layer = nl.QLoRALinear.from_linear(torch.nn.Linear(K, 16), r=4, lora_dropout=p, init_lora_weights=False)
    xs = torch.randn(4, K)
    torch.manual_seed(5)
    a = layer(xs)
    torch.manual_seed(5)
    b = layer(xs)
    c = layer(xs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    layer.eval()
    assert torch.equal(layer(xs), layer(xs))


def test_dropout_gradients_use_the_forward_mask():
    q = make(16, 64)
    x = torch.randn(6, 64, dtype=torch.float32, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(16, 4, requires_grad=True)
    seed = torch.tensor(77)
    y = nl.qlora_linear(x, q, A, B, 0.5, dropout_p=0.4, seed=seed)
    y.backward(torch.ones_like(y))
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = reference(x64, q, A64, B64, 0.5, None, p=0.4, seed=77)
    y64.backward(torch.ones_like(y64))
    assert rel_err(y, y64) <= 1e-5
    for got, want in ((x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        assert rel_err(got, want) <= 1e-5


def _op_samples():
    q = make(24, 64)
    st = state(q)
    x = torch.randn(5, 64)
    A, B, b = torch.randn(4, 64), torch.randn(24, 4), torch.randn(24)
    seed = torch.tensor(3)
    return [
        (ops.nf4_linear, (x, *st, 24, b)),
        (ops.nf4_linear, (x.bfloat16(), *st, 24, None)),
        (ops.nf4_linear_t, (torch.randn(5, 24), *st, 64)),
        (ops.qlora_fwd, (x, *st, 24, A, B, 0.5, b, 0.0, None)),
        (ops.qlora_fwd, (torch.randn(20, 64), *st, 24, A, B, 0.5, None, 0.2, seed)),
        (ops.qlora_bwd_dx, (torch.randn(5, 24), *st, 64, torch.randn(5, 4), A, 0.5, 0.2, seed)),
        (ops.lora_grad_a, (torch.randn(5, 4), x, 0.5, 0.2, seed)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_autograd_registration():
    q = make(24, 64)
    x = torch.randn(5, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    torch.library.opcheck(ops.qlora_fwd, (x, *state(q), 24, A, B, 0.5, None, 0.0, None),
                          test_utils=("test_autograd_registration",))
    torch.library.opcheck(ops.nf4_linear, (x, *state(q), 24, None), test_utils=("test_autograd_registration",))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q = make(32, 64)
    A, B = torch.randn(4, 64), torch.randn(32, 4)
    x = torch.randn(3, 7, 64)
    f = torch.compile(lambda x: nl.qlora_linear(x, q, A, B, 0.5) + nl.nf4_linear(x, q), fullgraph=True)
    torch.testing.assert_close(f(x), nl.qlora_linear(x, q, A, B, 0.5) + nl.nf4_linear(x, q))

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    qmodel = torch.nn.Sequential(nl.QLoRALinear.from_linear(model[0], r=4, init_lora_weights=False),
                                 torch.nn.GELU(),
                                 nl.QLoRALinear.from_linear(model[2], r=4, init_lora_weights=False))
    cm = torch.compile(qmodel, fullgraph=True)
    xin = torch.randn(5, 64, requires_grad=True)
    y_eager = qmodel(xin)
    y_comp = cm(xin)
    torch.testing.assert_close(y_comp, y_eager)
    params = [xin, qmodel[0].lora_A_weight, qmodel[2].lora_B_weight]  # the active adapter's A, B
    g_eager = torch.autograd.grad(y_eager.sum(), params)
    g_comp = torch.autograd.grad(y_comp.sum(), params)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


class TestBadInput:
    q = make(16, 64)

    def test_mismatched_k(self):
        with pytest.raises(ValueError, match="x must have last dimension 64"):
            nl.nf4_linear(torch.randn(3, 63), self.q)

    def test_wrong_lora_shapes(self):
        x = torch.randn(3, 64)
        with pytest.raises(ValueError, match="lora_A"):
            nl.qlora_linear(x, self.q, torch.randn(4, 63), torch.randn(16, 4), 1.0)
        with pytest.raises(ValueError, match="lora_B"):
            nl.qlora_linear(x, self.q, torch.randn(4, 64), torch.randn(16, 5), 1.0)
        with pytest.raises(ValueError, match="lora_A must be 2-D"):
            nl.qlora_linear(x, self.q, torch.randn(64), torch.randn(16, 4), 1.0)

    def test_dtypes(self):
        with pytest.raises(ValueError, match="x must have dtype"):
            nl.nf4_linear(torch.randn(3, 64).int(), self.q)
        with pytest.raises(ValueError, match="lora_A must have dtype"):
            nl.qlora_linear(torch.randn(3, 64), self.q, torch.ones(4, 64, dtype=torch.int64),
                            torch.randn(16, 4), 1.0)
        with pytest.raises(TypeError, match="q must be an NF4Tensor"):
            nl.nf4_linear(torch.randn(3, 64), torch.randn(16, 64))

    def test_non_finite_scaling_and_bad_dropout(self):
        x = torch.randn(3, 64)
        A, B = torch.randn(4, 64), torch.randn(16, 4)
        for s in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="scaling must be finite"):
                nl.qlora_linear(x, self.q, A, B, s)
        with pytest.raises(ValueError, match="dropout_p"):
            nl.qlora_linear(x, self.q, A, B, 1.0, dropout_p=1.0)
        with pytest.raises(ValueError, match="bias must have shape"):
            nl.nf4_linear(x, self.q, torch.randn(15))

    def test_raw_ops_validate_state(self):
        st = list(state(self.q))
        st[0] = st[0][:-1]  # truncated packed codes
        with pytest.raises(ValueError, match="packed"):
            ops.nf4_linear(torch.randn(2, 64), *st, 16, None)
        with pytest.raises(ValueError, match="lora_B"):
            ops.qlora_fwd(torch.randn(2, 64), *state(self.q), 16, torch.randn(4, 64), torch.randn(15, 4),
                          1.0, None, 0.0, None)
        with pytest.raises(ValueError, match="seed"):
            ops.qlora_fwd(torch.randn(2, 64), *state(self.q), 16, torch.randn(4, 64), torch.randn(16, 4),
                          1.0, None, 0.5, None)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="meta"):
            nl.nf4_linear(torch.randn(3, 64, device="meta"), self.q)


_MEMORY_SCRIPT = r"""
import resource, torch, nf4lora as nl
N = K = 8192
g = torch.Generator().manual_seed(0)
packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
absmax = torch.rand(N * K // 64, generator=g) + 0.5
q = nl.NF4Tensor(packed, absmax, (N, K), torch.bfloat16, 64)  # built directly: no dense W ever
small = nl.quantize_nf4(torch.randn(64, 64), 64)
nl.qlora_linear(torch.randn(8, 64, requires_grad=True), small, torch.randn(4, 64), torch.randn(64, 4), 1.0).sum().backward()
for M in (8, 64):  # GEMV and GEMM forward; GEMM backward
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(16, K, requires_grad=True)
    B = torch.zeros(N, 16, requires_grad=True)
    nl.qlora_linear(x, q, A, B, 1.0).float().sum().backward()
    print(M, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_no_dense_weight_copy():
    """Forward + backward of an 8192 x 8192 layer must never allocate a dense copy of W: the peak
    resident memory of a fresh process grows far less than even a bf16 copy (128 MiB)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    dense_bf16 = 8192 * 8192 * 2
    for line in out.strip().splitlines():
        M, grew = map(int, line.split())
        assert grew < dense_bf16 / 4, f"M={M}: peak RSS grew {grew / 2**20:.1f} MiB"
