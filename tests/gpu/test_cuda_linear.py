"""CUDA NF4 linear kernels (GEMV, tensor-core GEMM, SIMT fallback, LoRA kernels) against the
pure-torch reference and fp64 torch, on fresh random inputs and awkward shapes, with outputs
poisoned before each run. Skipped without CUDA.

Error model (DESIGN.md "Testing model"): relative Frobenius error vs the fp64 product on the
dequantized weight <= 1e-5 for fp32 activations, and for bf16/fp16 no worse than twice torch's
own error (torch.matmul in that dtype on the weight rounded to it) plus a small floor."""
import pytest
import torch

import nf4lora as nl
from nf4lora.backends import default
from numerics import rel_err

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
_C_cuda = pytest.importorskip("nf4lora._C_cuda")

DEV = "cuda"
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {"simt": 0, "gemv": 1, "gemm": 2}




def check_close(got, ref64, dtype, torch_lowp=None, floor=1e-6):
    """got vs the fp64 reference: 1e-5 in fp32; <= 2x torch's error (+ floor) in 16-bit."""
    assert torch.isfinite(got).all(), "non-finite outputs (unwritten poison?)"
    err = rel_err(got, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        terr = rel_err(torch_lowp, ref64)
        assert err <= 2 * terr + floor, (err, terr)


def poison_allocator(nbytes=64 << 20):
    """Leave NaN-filled blocks in torch's caching allocator so torch.empty outputs start poisoned."""
    t = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del t


def make_weight(N, K, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(N, K, device=DEV, generator=g)
    q = nl.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    wd = q.dequantize(torch.float32)
    return q, wd


def state(q):
    return (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)


M_SET = [1, 3, 16, 17, 255, 4097]
NK_SET = [(96, 160), (1000, 4096), (4096, 4096), (300, 1000), (257, 33)]


# ------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("NK", NK_SET, ids=str)
@pytest.mark.parametrize("M", M_SET)
def test_nf4_linear_forward(M, NK, dtype):
    N, K = NK
    if M * N * K > 2**33:
        pytest.skip("large")
    q, wd = make_weight(N, K, seed=M + N)
    g = torch.Generator(device=DEV).manual_seed(M)
    x = torch.randn(M, K, device=DEV, generator=g).to(dtype)
    bias = torch.randn(N, device=DEV, generator=g)
    ref = x.double() @ wd.double().t() + bias.double()
    poison_allocator()
    y = torch.ops.nf4lora.nf4_linear(x, *state(q), N, bias)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.shape == (M, N)
    lowp = None if dtype == torch.float32 else (x @ wd.to(dtype).t() + bias.to(dtype))
    check_close(y, ref, dtype, lowp)


@pytest.mark.parametrize("path", ["simt", "gemv", "gemm"])
@pytest.mark.parametrize("blocksize,dq", [(32, False), (64, True), (256, True), (4096, False)])
def test_forced_paths_poisoned(path, blocksize, dq):
    """Each kernel directly through the launcher, into a NaN-filled output."""
    M = 2 if path == "gemv" else 37
    N, K = 200, 512
    q, wd = make_weight(N, K, blocksize, dq, seed=blocksize)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    y = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
    plan = _C_cuda.linear_plan(M, N, K, False, 2, True, PATHS[path])
    assert plan["ok"] and plan["path"] == path
    ws = torch.full((max(plan["ws_floats"], 1),), float("nan"), device=DEV)
    nested = q.double_quant
    _C_cuda.qlora_forward(x.data_ptr(), 2, M, q.packed.data_ptr(),
                          0 if nested else q.absmax.data_ptr(), q.absmax.data_ptr() if nested else 0,
                          q.absmax2.data_ptr() if nested else 0, q.code8.data_ptr() if nested else 0,
                          q.offset, blocksize, N, K, 0, 0, 0, 0, 0.0, 0.0, 0, y.data_ptr(), 0,
                          ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream,
                          PATHS[path])
    torch.cuda.synchronize()
    ref = x.double() @ wd.double().t()
    check_close(y, ref, torch.bfloat16, x @ wd.bfloat16().t())


# ------------------------------------------------------------------------- QLoRA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,r,p", [(1, 4096, 4096, 16, 0.0), (3, 96, 160, 5, 0.1),
                                       (16, 1000, 4096, 16, 0.0), (17, 300, 1000, 8, 0.05),
                                       (255, 257, 33, 3, 0.0), (4097, 4096, 4096, 16, 0.1)])
def test_qlora_forward_backward_vs_fp64(M, N, K, r, p, dtype):
    q, wd = make_weight(N, K, seed=7 + M)
    g = torch.Generator(device=DEV).manual_seed(M + r)
    x0 = torch.randn(M, K, device=DEV, generator=g)
    A0 = torch.randn(r, K, device=DEV, generator=g) / K**0.5
    B0 = torch.randn(N, r, device=DEV, generator=g) / r**0.5
    b0 = torch.randn(N, device=DEV, generator=g)
    dy0 = torch.randn(M, N, device=DEV, generator=g)
    seed = torch.tensor(991, dtype=torch.int64)
    s = 2.0

    def run(dt):
        x = x0.detach().to(dt).clone().requires_grad_()
        acc = torch.float64 if dt == torch.float64 else torch.float32
        A, B, b = (t.detach().to(acc).clone().requires_grad_() for t in (A0, B0, b0))
        y = nl.qlora_linear(x, q, A, B, s, bias=b, dropout_p=p, seed=seed)
        y.backward(dy0.to(dt))
        return y, x.grad, A.grad, B.grad, b.grad

    poison_allocator()
    got = run(dtype)
    torch.cuda.synchronize()
    ref = run(torch.float64)  # the pure-torch backend on the same device, in fp64
    # 16-bit: compare against torch's own error of the same math in that dtype
    for name, gt, rf in zip(("y", "dx", "dA", "dB", "db"), got, ref):
        assert torch.isfinite(gt).all(), name
        err = rel_err(gt, rf)
        tol = 1e-5 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 3e-3)
        assert err <= tol, (name, err)


def test_dropout_matches_default_bit_for_bit_in_mask():
    """Same seed -> same dropped elements as backends/default (fp32, tight tolerance)."""
    M, N, K, r, p = 64, 128, 256, 8, 0.5
    q, _ = make_weight(N, K)
    x = torch.randn(M, K, device=DEV)
    A = torch.randn(r, K, device=DEV)
    seed = torch.tensor(123, dtype=torch.int64)
    B = torch.randn(N, r, device=DEV)
    _, u = torch.ops.nf4lora.qlora_fwd(x, *state(q), N, A, B, 0.5, None, p, seed)  # u: the shrink
    xd = default.apply_dropout(x, p, seed)
    torch.testing.assert_close(u, xd @ A.t(), rtol=1e-5, atol=1e-4)
    g = torch.randn(M, r, device=DEV)
    da = torch.ops.nf4lora.lora_grad_a(g, x, 0.25, p, seed)
    torch.testing.assert_close(da, default.lora_grad_a(g, x, 0.25, p, seed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [1, 3, 16, 17, 255, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_dx_ops(M, dtype):
    N, K, r, p = 1000, 4096, 16, 0.1
    q, wd = make_weight(N, K, seed=M)
    dy = torch.randn(M, N, device=DEV).to(dtype)
    gg = torch.randn(M, r, device=DEV)
    A = torch.randn(r, K, device=DEV) / 64
    seed = torch.tensor(5, dtype=torch.int64)
    poison_allocator()
    dx = torch.ops.nf4lora.qlora_bwd_dx(dy, *state(q), K, gg, A, 0.5, p, seed)
    dx0 = torch.ops.nf4lora.nf4_linear_t(dy, *state(q), K)
    torch.cuda.synchronize()
    ref = default.qlora_bwd_dx(dy.double(), *state(q), K, gg.double(), A.double(), 0.5, p, seed)
    ref0 = dy.double() @ wd.double()
    check_close(dx0, ref0, dtype, dy @ wd.to(dtype))
    lowp = dy @ wd.to(dtype) + 0.5 * default.apply_dropout(gg @ A, p, seed).to(dtype)
    check_close(dx, ref.double(), dtype, lowp)


def test_lora_grad_a_large_m_split():
    M, K, r = 5000, 384, 16
    g = torch.randn(M, r, device=DEV)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    da = torch.ops.nf4lora.lora_grad_a(g, x, 0.5, 0.0, None)
    ref = 0.5 * (g.double().t() @ x.double())
    assert rel_err(da, ref) < 1e-5


# ------------------------------------------------------------------------- errors, compile
def test_bad_arguments_raise():
    q, _ = make_weight(64, 128)
    x = torch.randn(4, 128, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        torch.ops.nf4lora.nf4_linear(x[:, :100], *state(q), 64, None)
    with pytest.raises(ValueError):
        torch.ops.nf4lora.nf4_linear(x, *state(q), 64, torch.zeros(63, device=DEV))
    with pytest.raises(ValueError):  # null output pointer
        _C_cuda.qlora_forward(x.data_ptr(), 2, 4, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                              q.absmax2.data_ptr(), q.code8.data_ptr(), q.offset, 64, 64, 128, 0, 0, 0,
                              0, 0.0, 0.0, 0, 0, 0, 0, 0, torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError):  # bad blocksize
        _C_cuda.qlora_forward(x.data_ptr(), 2, 4, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                              q.absmax2.data_ptr(), q.code8.data_ptr(), q.offset, 48, 64, 128, 0, 0, 0,
                              0, 0.0, 0.0, 0, x.data_ptr(), 0, 0, 0,
                              torch.cuda.current_stream().cuda_stream)
    with pytest.raises(RuntimeError):  # forced path not eligible -> kUnsupported
        _C_cuda.qlora_forward(x.data_ptr(), 2, 4, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                              q.absmax2.data_ptr(), q.code8.data_ptr(), q.offset, 64, 64, 128, 0, 0, 0,
                              0, 0.0, 0.0, 0, x.data_ptr(), 0, 0, 0,
                              torch.cuda.current_stream().cuda_stream, 1)


def test_opcheck():
    q, _ = make_weight(96, 160)
    x = torch.randn(5, 160, device=DEV, dtype=torch.bfloat16)
    A = torch.randn(4, 160, device=DEV)
    B = torch.randn(96, 4, device=DEV)
    torch.library.opcheck(torch.ops.nf4lora.nf4_linear.default, (x, *state(q), 96, None))
    torch.library.opcheck(torch.ops.nf4lora.qlora_fwd.default,
                          (x, *state(q), 96, A, B, 0.5, None, 0.0, None))


def test_torch_compile_fullgraph():
    q, wd = make_weight(256, 512)
    x = torch.randn(8, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(16, 512, device=DEV) / 20).requires_grad_()
    B = (torch.randn(256, 16, device=DEV) / 4).requires_grad_()

    def f(x, A, B):
        return nl.qlora_linear(x, q, A, B, 2.0).float().square().sum()

    eager = f(x, A, B)
    ge = torch.autograd.grad(eager, (x, A, B))
    cf = torch.compile(f, fullgraph=True)
    comp = cf(x, A, B)
    gc = torch.autograd.grad(comp, (x, A, B))
    torch.testing.assert_close(comp, eager, rtol=1e-3, atol=1e-3)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- vs csrc/ref
@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 33, 64), (17, 64, 160), (40, 96, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_cuda_matches_csrc_ref(M, N, K, dtype, p):
    """The fused forward and dx on the GPU against the scalar C++ reference (csrc/ref) on the CPU,
    same inputs and dropout seed."""
    from nf4lora.backends import cpu_linear

    r = 4
    q, _ = make_weight(N, K, seed=N + K)
    qc = q.cpu()
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    A, B, bias = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g).to(dtype)
    seed = torch.tensor(1234)
    y_ref, u_ref = cpu_linear.qlora_forward(x, *state(qc), N, A, B, 0.5, bias, p, seed, impl="ref")
    gg = dy.float() @ B
    dx_ref = cpu_linear.qlora_backward_dx(dy, *state(qc), K, gg, A, 0.5, p, seed, impl="ref")
    poison_allocator()
    y, u = torch.ops.nf4lora.qlora_fwd(x.to(DEV), *state(q), N, A.to(DEV), B.to(DEV), 0.5,
                                       bias.to(DEV), p, seed)
    dx = torch.ops.nf4lora.qlora_bwd_dx(dy.to(DEV), *state(q), K, gg.to(DEV), A.to(DEV), 0.5, p, seed)
    torch.cuda.synchronize()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(u.cpu(), u_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.cpu().float(), y_ref.float(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(dx.cpu().float(), dx_ref.float(), rtol=tol, atol=tol * 10)
