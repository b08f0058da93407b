"""PagedAdamW (32-bit and 8-bit paged state) on CPU.

Error model:
  - kernels: the AVX2 path, the scalar csrc/ref path and the pure-torch reference
    (backends/optim_default.py) are bit-identical, for every param dtype and awkward size;
  - optim_bits=32 vs torch.optim.AdamW: within 1e-6 relative over 100 steps;
  - optim_bits=8 vs the plain-torch blockwise reference: bit-identical; convergence within a few
    percent of the fp32 loss;
  - save / load / continue: bit-identical to an uninterrupted run.
"""
import io
import math

import pytest
import torch

import nf4lora as nl
from nf4lora import _native
from nf4lora._optim_ops import n_blocks
from nf4lora.backends import optim_cpu, optim_default
from nf4lora.nf4_format import dynamic_map
from numerics import max_rel_err

C = _native._C
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 63, 255, 256, 257, 4095, 4096, 70000 + 13]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The pure-torch references run many small ops; on a shared 2-core machine torch's intra-op
    threads only add contention (the nf4lora kernels keep their own OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hp_args(step, page_size=1024, **over):
    h = dict(HP, **over)
    return (h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], step, page_size)


def _state8(n):
    return [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(n_blocks(n)), torch.zeros(n_blocks(n))]


def _state32(n):
    return [torch.zeros(n), torch.zeros(n)]


# ----------------------------------------------------------------------------- codes and encoder


def test_unsigned_dynamic_map_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed=signed)
        theirs = bnbf.create_dynamic_map(signed=signed).float().cpu()
        assert torch.equal(ours, theirs)


def _encoder_isa(isa):
    """Select the fast encoder under test: 'avx512vbmi' (Code8Arith) or 'avx2' (Code8Lut)."""
    if not C.has_avx2():
        pytest.skip("needs AVX2")
    if isa == "avx512vbmi" and not C.has_avx512vbmi():
        pytest.skip("needs AVX-512 + VBMI")
    C.set_force_avx2(isa == "avx2")
    assert C.uses_avx512vbmi() == (isa == "avx512vbmi")


def _encode_both(x, signed):
    ref = torch.empty(x.numel(), dtype=torch.uint8)
    fast = torch.empty_like(ref)
    C.code8_encode(x.data_ptr(), x.numel(), signed, ref.data_ptr(), "ref")
    C.code8_encode(x.data_ptr(), x.numel(), signed, fast.data_ptr(), "fast")
    return ref, fast


@pytest.mark.parametrize("isa", ["avx512vbmi", "avx2"])
@pytest.mark.parametrize("signed", [True, False])
def test_fast_encoder_matches_search(signed, isa):
    """The fast encoders return exactly code8_encode's index, ties included: every midpoint, the
    floats next to it, every code, random values over all scales, specials."""
    _encoder_isa(isa)
    try:
        assert C.code8_lut_ok(signed) if isa == "avx2" else C.code8_arith_info(signed)["ok"]
        code = dynamic_map(signed=signed)
        mid = (code[1:] + code[:-1]) * 0.5
        g = torch.Generator().manual_seed(0)
        r = torch.rand(400_000, generator=g)
        up, down = torch.full_like(mid, 2.0), torch.full_like(mid, -2.0)
        parts = [mid, code, torch.nextafter(mid, up), torch.nextafter(mid, down),
                 torch.nextafter(torch.nextafter(mid, up), up),
                 torch.nextafter(torch.nextafter(mid, down), down),
                 r * 2 - 1 if signed else r, (r * 2 - 1) * torch.exp(-25 * torch.rand(400_000, generator=g)),
                 torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1.5, -1.5, 1.0000001, 0.99999994,
                               2.0 ** -30, 2.0 ** -31, 1e-45])]
        x = torch.cat(parts).float().contiguous()
        if not signed:
            x = x.abs()
        ref, fast = _encode_both(x, signed)
        assert torch.equal(ref, fast)
        # and the pure-torch search agrees too
        from nf4lora.backends.default import code8_encode
        assert torch.equal(code8_encode(x, code), ref)
    finally:
        C.set_force_avx2(False)


def test_arith_encoder_tables():
    """Code8Arith's proofs pass for both codes, with a tiny uncertainty band (units of 2^-16 of an
    index): the lanes it leaves to the scalar search are rare."""
    for signed in (True, False):
        info = C.code8_arith_info(signed)
        assert info["ok"] and 0 < info["near"] <= 8 and info["max_err"] < info["near"]


@pytest.mark.parametrize("signed", [True, False])
def test_arith_encoder_outside_its_range(signed):
    """Values the optimizer never produces (|x| > 1.5, Inf, NaN, negatives for the unsigned code)
    still get code8_encode's answer: those lanes take the scalar search."""
    if not C.has_avx512vbmi():
        pytest.skip("needs AVX-512 + VBMI")
    x = torch.tensor([1.5000001, -1.75, 2.0, -3.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan"),
                      -0.5, -1e-7, -0.0] * 3, dtype=torch.float32)
    ref, fast = _encode_both(x, signed)
    assert torch.equal(ref, fast)


@pytest.mark.slow
@pytest.mark.parametrize("signed", [True, False])
def test_arith_encoder_exhaustive(signed):
    """Every float32 in [2^-31, 1.0000005] (2.6e8 bit patterns) plus 0 and all subnormals (below
    2^-30 the encoder sees one binade), and their negations for the signed code: the AVX-512
    encoder equals code8_encode. A few seconds per code."""
    if not C.has_avx512vbmi():
        pytest.skip("needs AVX-512 + VBMI")
    top = int(torch.tensor(1.0000005).view(torch.int32))
    lo = int(torch.tensor(2.0 ** -31).view(torch.int32))
    chunk = 1 << 24
    ref = torch.empty(chunk, dtype=torch.uint8)
    fast = torch.empty_like(ref)
    starts = [0] + list(range(lo, top, chunk))  # bit patterns; [0, chunk) holds 0 and the subnormals
    for start in starts:
        bits = torch.arange(start, min(start + chunk, top), dtype=torch.int32)
        for sign in ((1, -1) if signed else (1,)):
            x = bits.view(torch.float32) * sign
            n = x.numel()
            C.code8_encode(x.data_ptr(), n, signed, ref.data_ptr(), "ref")
            C.code8_encode(x.data_ptr(), n, signed, fast.data_ptr(), "fast")
            bad = (ref[:n] != fast[:n]).nonzero()
            assert bad.numel() == 0, f"x = {x[bad[0]].item()!r}: ref {ref[bad[0]].item()} fast {fast[bad[0]].item()}"


# ----------------------------------------------------------------------------- kernels: bit-exact


def _run_kernels(bits, dtype, n, steps=3, page_size=1024, impls=("default", "fast", "ref")):
    """Same inputs through default (pure torch), AVX2 and scalar ref; returns the results."""
    g = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=g).to(dtype)
    outs = []
    for impl in impls:
        p = p0.clone()
        st = _state8(n) if bits == 8 else _state32(n)
        gg = torch.Generator().manual_seed(1000 + n)
        for t in range(1, steps + 1):
            grad = (torch.randn(n, generator=gg) * (0.1 * t)).to(dtype)
            over = dict(lr=1e-2 * t, weight_decay=0.05 if t % 2 else 0.0, beta1=0.9 if t < 3 else 0.0)
            args = _hp_args(t, page_size, **over)
            if impl == "default":
                fn = optim_default.adamw8bit_step if bits == 8 else optim_default.adamw_step
                fn(p, grad, *st, *args)
            else:
                fn = optim_cpu.adamw8bit_step if bits == 8 else optim_cpu.adamw_step
                fn(p, grad, *st, *args, impl=impl)
        outs.append([p] + st)
    return outs


def _assert_same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: tensor {i} differs"


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_kernels_bit_exact(bits, dtype, n):
    default, fast, ref = _run_kernels(bits, dtype, n)
    _assert_same(fast, ref, "AVX2 vs scalar ref")
    _assert_same(default, ref, "pure torch vs scalar ref")


@pytest.mark.parametrize("bits", [32, 8])
def test_scalar_fallback_matches(bits):
    C.set_force_scalar(True)
    try:
        forced = _run_kernels(bits, torch.float32, 5000)[1]
    finally:
        C.set_force_scalar(False)
    _assert_same(forced, _run_kernels(bits, torch.float32, 5000)[2], "forced scalar vs ref")


@pytest.mark.skipif(not C.has_avx2(), reason="needs AVX2")
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_isa_paths_bit_exact(isa, bits, dtype):
    """The AVX-512 kernels (optim_avx512.cpp; 8-bit: optim8_avx512vbmi.cpp where the CPU has VBMI)
    and the forced-AVX2 path both match the scalar ref, with sizes that leave 16-lane and 8-lane
    tails; also the encoders."""
    if isa == "avx512" and not C.has_avx512():
        pytest.skip("needs AVX-512")
    C.set_force_avx2(isa == "avx2")
    try:
        assert C.uses_avx512() == (isa == "avx512")
        for n in (4096 + 8, 70000 + 13):
            fast, ref = _run_kernels(bits, dtype, n, impls=("fast", "ref"))
            _assert_same(fast, ref, f"{isa} vs scalar ref, n={n}")
        code = dynamic_map(signed=True)
        x = torch.cat([(code[1:] + code[:-1]) * 0.5, code, torch.rand(10_007) * 2 - 1]).float()
        ref, fast = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(x.numel(), dtype=torch.uint8)
        C.code8_encode(x.data_ptr(), x.numel(), True, ref.data_ptr(), "ref")
        C.code8_encode(x.data_ptr(), x.numel(), True, fast.data_ptr(), "fast")
        assert torch.equal(ref, fast)
    finally:
        C.set_force_avx2(False)


def _same_nan_aware(a, b):
    if a.dtype.is_floating_point:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("bits", [32, 8])
def test_nonfinite_grads_same_on_every_backend(bits, isa):
    """Inf and NaN gradients ruin the state (as in torch), but every backend ruins it the same way:
    the 8-bit block absmax ignores NaN everywhere, NaN/Inf values take the same codes."""
    if isa == "avx512" and not C.has_avx512():
        pytest.skip("needs AVX-512")
    n = 4096 * 3 + 77
    C.set_force_avx2(isa == "avx2")
    try:
        outs = []
        for impl in ("fast", "ref", "default"):
            torch.manual_seed(0)
            p = torch.randn(n)
            st = _state8(n) if bits == 8 else _state32(n)
            for t in range(1, 4):
                g = torch.randn(n)
                g[100], g[5000], g[n - 3] = float("inf"), float("nan") if t == 2 else -float("inf"), float("nan")
                args = _hp_args(t, 1024)
                if impl == "default":
                    fn = optim_default.adamw8bit_step if bits == 8 else optim_default.adamw_step
                    fn(p, g, *st, *args)
                else:
                    fn = optim_cpu.adamw8bit_step if bits == 8 else optim_cpu.adamw_step
                    fn(p, g, *st, *args, impl=impl)
            outs.append([p] + st)
        fast, ref, default = outs
        assert ref[0].isnan().any()
        for name, out in (("fast", fast), ("default", default)):
            for i, (x, y) in enumerate(zip(out, ref)):
                assert _same_nan_aware(x, y), f"{name} vs ref: tensor {i} differs"
    finally:
        C.set_force_avx2(False)


@pytest.mark.parametrize("bits", [32, 8])
def test_page_size_does_not_change_results(bits):
    base = _run_kernels(bits, torch.float32, 33_333, page_size=1 << 20, impls=("fast",))[0]
    for ps in (256, 768, 16384, 20480):
        out = _run_kernels(bits, torch.float32, 33_333, page_size=ps, impls=("fast",))[0]
        _assert_same(out, base, f"page {ps}")


def test_noncontiguous_param_op():
    w = torch.randn(64, 96)
    a, b = w.clone().t(), w.clone().t().contiguous()
    g = torch.randn(96, 64)
    sa, sb = _state32(a.numel()), _state32(b.numel())
    torch.ops.nf4lora.adamw_step(a, g, *sa, *_hp_args(1))
    torch.ops.nf4lora.adamw_step(b, g, *sb, *_hp_args(1))
    assert not a.is_contiguous() and torch.equal(a, b)


@pytest.mark.parametrize("bits", [32, 8])
def test_opcheck(bits):
    n = 5000
    p, grad = torch.randn(40, 125), torch.randn(40, 125)
    st = _state8(n) if bits == 8 else _state32(n)
    op = torch.ops.nf4lora.adamw8bit_step if bits == 8 else torch.ops.nf4lora.adamw_step
    torch.library.opcheck(op, (p, grad, *st, *_hp_args(1)))


def _multi_case(bits, n_list, dtypes):
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(n, generator=g).to(dt) for n, dt in zip(n_list, dtypes)]
    grads = [torch.randn(n, generator=g).to(dt) for n, dt in zip(n_list, dtypes)]
    states = [_state8(n) if bits == 8 else _state32(n) for n in n_list]
    return params, grads, states


@pytest.mark.parametrize("bits", [32, 8])
def test_multi_tensor_op_matches_single(bits):
    """The multi-tensor op (one OpenMP region over a whole list: mixed sizes incl. partial blocks,
    mixed dtypes, a non-contiguous param) gives exactly what the single-tensor op gives."""
    sizes = [5000, 100, 256, 4096 * 5 + 3, 70_001, 1]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.float32]
    pa, ga, sa = _multi_case(bits, sizes, dtypes)
    pb, gb, sb = _multi_case(bits, sizes, dtypes)
    pa[2] = pa[2].view(16, 16).t()  # non-contiguous: the single-tensor path inside the multi op
    pb[2] = pb[2].view(16, 16).t()
    ga[2], gb[2] = ga[2].view(16, 16), gb[2].view(16, 16)
    single = torch.ops.nf4lora.adamw8bit_step if bits == 8 else torch.ops.nf4lora.adamw_step
    multi = torch.ops.nf4lora.adamw8bit_step_multi if bits == 8 else torch.ops.nf4lora.adamw_step_multi
    for t in (1, 2, 3):
        for p, g, st in zip(pa, ga, sa):
            single(p, g, *st, *_hp_args(t, 1024))
        multi(pb, gb, *[list(x) for x in zip(*sb)], *_hp_args(t, 1024))
    for i in range(len(sizes)):
        _assert_same([pa[i]] + sa[i], [pb[i]] + sb[i], f"tensor {i}")
    # the device-generic kernel (what CUDA tensors get: the single op per tensor) agrees too
    pc, gc_, sc = _multi_case(bits, sizes, dtypes)
    pc[2], gc_[2] = pc[2].view(16, 16).t(), gc_[2].view(16, 16)
    generic = optim_default.adamw8bit_step_multi if bits == 8 else optim_default.adamw_step_multi
    for t in (1, 2, 3):
        generic(pc, gc_, *[list(x) for x in zip(*sc)], *_hp_args(t, 1024))
    for i in range(len(sizes)):
        _assert_same([pc[i]] + sc[i], [pb[i]] + sb[i], f"generic, tensor {i}")


@pytest.mark.parametrize("bits", [32, 8])
def test_multi_tensor_op_checks_everything_first(bits):
    """A bad tensor anywhere in the list raises (naming what is wrong) before any tensor changes."""
    params, grads, states = _multi_case(bits, [3000, 5000, 4000], [torch.float32] * 3)
    states[2][0] = states[2][0][:-1].clone()  # exp_avg one element short
    before = [p.clone() for p in params]
    multi = torch.ops.nf4lora.adamw8bit_step_multi if bits == 8 else torch.ops.nf4lora.adamw_step_multi
    with pytest.raises(ValueError, match="exp_avg"):
        multi(params, grads, *[list(x) for x in zip(*states)], *_hp_args(1))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    with pytest.raises(ValueError, match="grads has 2 tensors"):
        multi(params, grads[:2], *[list(x) for x in zip(*states)], *_hp_args(1))


@pytest.mark.parametrize("bits", [32, 8])
def test_multi_opcheck(bits):
    params, grads, states = _multi_case(bits, [5000, 300], [torch.float32, torch.bfloat16])
    multi = torch.ops.nf4lora.adamw8bit_step_multi if bits == 8 else torch.ops.nf4lora.adamw_step_multi
    torch.library.opcheck(multi, (params, grads, *[list(x) for x in zip(*states)], *_hp_args(1)))


# ----------------------------------------------------------------------------- vs torch.optim.AdamW


def _make_groups(params, which):
    """Three groups with different lr / weight decay / betas."""
    a, b, c = params[:2], params[2:4], params[4:]
    return [
        {"params": a},
        {"params": b, "lr": 3e-3, "weight_decay": 0.0},
        {"params": c, "lr": 5e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    ]


@pytest.mark.parametrize("sched", ["step", "cosine", "lambda"])
def test_matches_torch_adamw_100_steps(sched):
    g = torch.Generator().manual_seed(1)
    shapes = [(37, 29), (29,), (300, 17), (1,), (4096 + 5,), (8, 8, 8)]
    init = [torch.randn(s, generator=g) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    o1 = nl.PagedAdamW(_make_groups(ours, 0), lr=1e-2, weight_decay=0.02, optim_bits=32)
    o2 = torch.optim.AdamW(_make_groups(ref, 0), lr=1e-2, weight_decay=0.02, foreach=False)

    def scheduler(o):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.7)
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100)
        return torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.05 * t))

    s1, s2 = scheduler(o1), scheduler(o2)
    for t in range(100):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g) * (1 + (t % 7))
            p.grad, q.grad = grad.clone(), grad.clone()
        ours[3].grad = ref[3].grad = None  # a param without a grad on some steps is skipped
        if t % 10 == 0:
            ours[3].grad = torch.ones(1)
            ref[3].grad = torch.ones(1)
        o1.step()
        o2.step()
        s1.step()
        s2.step()
    for p, q in zip(ours, ref):
        assert max_rel_err(p.detach(), q.detach()) < 1e-6
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6 * q.abs().max().item())
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]


def test_matches_torch_adamw_real_gradients():
    """A small regression trained with real gradients: ours and torch's track each other."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randn(256, 1)
    m1 = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    m2 = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    m2.load_state_dict(m1.state_dict())
    o1 = nl.PagedAdamW(m1.parameters(), lr=3e-3, weight_decay=0.01)
    o2 = torch.optim.AdamW(m2.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(100):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert max_rel_err(p.detach(), q.detach()) < 1e-5  # real gradients feed rounding back in


# ----------------------------------------------------------------------------- 8-bit


def _plain_torch_reference_step(params, states, step, lr, b1, b2, eps, wd, page_size, min8):
    for p, st in zip(params, states):
        if p.grad is None:
            continue
        args = (lr, b1, b2, eps, wd, step, page_size)
        if p.numel() >= min8:
            optim_default.adamw8bit_step(p.data, p.grad, *st, *args)
        else:
            optim_default.adamw_step(p.data, p.grad, *st, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_matches_plain_torch_reference(dtype):
    g = torch.Generator().manual_seed(2)
    shapes = [(100, 50), (4096,), (4095,), (33, 300), (10,)]
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone() for t in init]
    opt = nl.PagedAdamW(ours, lr=2e-3, weight_decay=0.01, optim_bits=8, page_size=2048)
    states = [_state8(t.numel()) if t.numel() >= 4096 else _state32(t.numel()) for t in ref]
    for step in range(1, 21):
        for p, q in zip(ours, ref):
            grad = (torch.randn(p.shape, generator=g) * 0.01).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        _plain_torch_reference_step(ref, states, step, 2e-3, 0.9, 0.999, 1e-8, 0.01, 2048, 4096)
    for p, q, st in zip(ours, ref, states):
        assert torch.equal(p.detach(), q)
        mine = opt.state[p]
        assert (mine["exp_avg"].dtype == torch.uint8) == (p.numel() >= 4096)
        keys = ["exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"][: len(st)]
        for k, t in zip(keys, st):
            assert torch.equal(mine[k], t), k


def _train(optim_bits, steps=150):
    """A noisy nonlinear regression whose loss floor is the noise (0.09): no memorisation, so the
    final loss measures the optimizer, not overfitting."""
    torch.manual_seed(0)
    n, d, k = 2048, 128, 32
    x = torch.randn(n, d)
    w_true = torch.randn(d, k) / d ** 0.5
    y = torch.tanh(x @ w_true) + 0.3 * torch.randn(n, k)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, k))
    opt = nl.PagedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, optim_bits=optim_bits)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item(), opt


def test_8bit_converges_like_32bit():
    loss32, _ = _train(32)
    loss8, opt8 = _train(8)
    eight = [st for st in opt8.state.values() if st["exp_avg"].dtype == torch.uint8]
    assert len(eight) == 1  # the 128x64 weight (>= 4096 elements); the rest stay 32-bit
    assert loss32 < 0.12  # it learned (start ~0.6, noise floor 0.09)
    assert abs(loss8 - loss32) <= 0.03 * loss32, (loss8, loss32)


def test_8bit_state_memory_is_quarter():
    p = torch.nn.Parameter(torch.randn(256 * 1024))
    p.grad = torch.randn_like(p)
    o32, o8 = nl.PagedAdamW([p], optim_bits=32), nl.PagedAdamW([p], optim_bits=8)
    o32.step()
    o8.step()

    def nbytes(o):
        return sum(t.numel() * t.element_size() for st in o.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))

    assert nbytes(o32) >= 3.9 * nbytes(o8)


# ----------------------------------------------------------------------------- state dict


def _model(dtype=torch.float32):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(48, 100), torch.nn.ReLU(), torch.nn.Linear(100, 5)).to(dtype)


def _data():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(32, 48, generator=g), torch.randn(32, 5, generator=g)) for _ in range(12)]


def _train_steps(model, opt, sched, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("optim_bits,dtype", [(32, torch.float32), (8, torch.float32), (8, torch.bfloat16)])
def test_save_load_resume_bit_identical(optim_bits, dtype):
    data = _data()
    kw = dict(lr=5e-3, weight_decay=0.01, optim_bits=optim_bits, page_size=1024, min_8bit_size=512)

    def fresh():
        m = _model(dtype)
        o = nl.PagedAdamW(m.parameters(), **kw)
        s = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
        return m, o, s

    m_ref, o_ref, s_ref = fresh()
    _train_steps(m_ref, o_ref, s_ref, data)

    m1, o1, s1 = fresh()
    _train_steps(m1, o1, s1, data[:5])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    m2, o2, s2 = fresh()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)  # not the checkpoint's values until loaded
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    s2.load_state_dict(ck["sched"])
    if optim_bits == 8:
        assert any(st["exp_avg"].dtype == torch.uint8 for st in o2.state.values())
    _train_steps(m2, o2, s2, data[5:])
    for p, q in zip(m2.parameters(), m_ref.parameters()):
        assert torch.equal(p, q)
    for st, st_ref in zip(o2.state.values(), o_ref.state.values()):
        assert st["step"] == st_ref["step"]
        for k in st:
            if isinstance(st[k], torch.Tensor):
                assert torch.equal(st[k], st_ref[k]), k


def test_state_dict_is_plain():
    m = _model()
    o = nl.PagedAdamW(m.parameters(), optim_bits=8, min_8bit_size=512)
    _train_steps(m, o, torch.optim.lr_scheduler.StepLR(o, 5), _data()[:2])
    sd = o.state_dict()

    def plain(v):
        if isinstance(v, dict):
            return all(plain(k) and plain(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (torch.Tensor, int, float, bool, str))

    assert plain(sd)
    st = sd["state"][0]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    assert st["exp_avg"].shape == (48 * 100,) and st["exp_avg_absmax"].shape == (math.ceil(4800 / 256),)
    # the live state is not aliased by a load: loading a copy leaves it untouched
    o2 = nl.PagedAdamW(_model().parameters(), optim_bits=8, min_8bit_size=512)
    o2.load_state_dict(sd)
    assert o2.state[next(iter(o2.state))]["exp_avg"].data_ptr() != st["exp_avg"].data_ptr()


def test_load_state_dict_rejects_bad_state():
    m = _model()
    o = nl.PagedAdamW(m.parameters())
    _train_steps(m, o, torch.optim.lr_scheduler.StepLR(o, 5), _data()[:1])
    sd = o.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:-1]
    with pytest.raises(ValueError, match="exp_avg"):
        nl.PagedAdamW(_model().parameters()).load_state_dict(sd)
    with pytest.raises(ValueError, match="param_groups"):
        nl.PagedAdamW(_model().parameters()).load_state_dict({"state": {}})


# ----------------------------------------------------------------------------- optimizer behaviour


def test_skips_params_without_grad_and_zero_grad_and_closure():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    b0 = b.detach().clone()
    opt = nl.PagedAdamW([a, b], lr=0.1)
    a.grad = torch.ones(10)

    def closure():
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    assert torch.equal(b.detach(), b0) and b not in opt.state
    assert opt.state[a]["step"] == 1
    opt.zero_grad()
    assert a.grad is None


def test_closure_computes_grad():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = nl.PagedAdamW([w], lr=0.5, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    for _ in range(60):
        opt.step(closure)
    assert w.abs().max() < 0.5


def test_bias_correction_first_step():
    """First step moves every element by lr * sign(g) (up to eps), the AdamW hallmark."""
    p = torch.nn.Parameter(torch.zeros(7))
    p.grad = torch.tensor([1.0, -2.0, 3.0, -1e-3, 5.0, -6.0, 0.25])
    nl.PagedAdamW([p], lr=0.01, weight_decay=0.0).step()
    torch.testing.assert_close(p.detach(), -0.01 * p.grad.sign(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(optim_bits=16), "optim_bits"),
    (dict(page_size=1000), "page_size"),
    (dict(page_size=0), "page_size"),
])
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        nl.PagedAdamW([torch.nn.Parameter(torch.randn(3))], **kw)


def test_bad_hyperparameter_types_raise():
    with pytest.raises(TypeError, match="betas"):
        nl.PagedAdamW([torch.nn.Parameter(torch.randn(3))], betas=0.9)
    with pytest.raises(TypeError, match="lr"):
        nl.PagedAdamW([torch.nn.Parameter(torch.randn(3))], lr="fast")
    with pytest.raises(ValueError, match="lr"):  # bad value in one param group
        nl.PagedAdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0}])


def test_bad_lr_set_later_raises_in_step():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    opt = nl.PagedAdamW([p])
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-3
    opt.param_groups[0]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match="betas"):
        opt.step()


def test_sparse_grad_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    opt = nl.PagedAdamW(emb.parameters())
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_complex_raises():
    with pytest.raises(TypeError, match="complex"):
        nl.PagedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="complex"):  # at the op level too
        torch.ops.nf4lora.adamw_step(torch.randn(3), torch.randn(3, dtype=torch.complex64),
                                     *_state32(3), *_hp_args(1))
    with pytest.raises(TypeError, match="float64|float32"):
        nl.PagedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_op_rejects_bad_state():
    p, g = torch.randn(300), torch.randn(300)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        torch.ops.nf4lora.adamw_step(p, g, torch.zeros(300), torch.zeros(299), *_hp_args(1))
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        st = _state8(300)
        st[2] = torch.zeros(1)
        torch.ops.nf4lora.adamw8bit_step(p, g, *st, *_hp_args(1))
    with pytest.raises(ValueError, match="page_size"):
        torch.ops.nf4lora.adamw_step(p, g, *_state32(300), *_hp_args(1, page_size=100))
    with pytest.raises(ValueError, match="step"):
        torch.ops.nf4lora.adamw_step(p, g, *_state32(300), *_hp_args(0))
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.nf4lora.adamw_step(p, g.half(), *_state32(300), *_hp_args(1))


def test_native_launcher_checks_arguments():
    """The launcher itself rejects bad constants and sizes (ValueError naming it)."""
    p, g, m, v = torch.randn(8), torch.randn(8), torch.zeros(8), torch.zeros(8)
    good = (0.99, 0.999, 0.1, 0.001, 1e-3, 0.03, 1e-8)
    bad = (0.99, 1.5, 0.1, 0.001, 1e-3, 0.03, 1e-8)
    with pytest.raises(ValueError, match="adamw32"):
        C.adamw32(p.data_ptr(), g.data_ptr(), 0, m.data_ptr(), v.data_ptr(), 8, *bad, 256, "fast")
    with pytest.raises(ValueError, match="adamw32"):
        C.adamw32(p.data_ptr(), g.data_ptr(), 0, m.data_ptr(), v.data_ptr(), 8, *good, 100, "fast")
    with pytest.raises(ValueError, match="adamw8"):
        C.adamw8(p.data_ptr(), g.data_ptr(), 0, 0, 0, 0, 0, 8, *good, 256, "ref")


def test_low_precision_params():
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.nn.Parameter(torch.randn(5000).to(dtype))
        p.grad = torch.randn(5000).to(dtype)
        p0 = p.detach().clone()
        opt = nl.PagedAdamW([p], lr=1e-2, optim_bits=8)
        opt.step()
        assert p.dtype == dtype and not torch.equal(p, p0)
        assert opt.state[p]["exp_avg_absmax"].dtype == torch.float32


def test_public_api():
    assert "PagedAdamW" in nl.__all__
    opt = nl.PagedAdamW([torch.nn.Parameter(torch.randn(2))])
    assert opt.defaults["paged"] is True and opt.defaults["optim_bits"] == 32
    assert isinstance(opt, torch.optim.Optimizer)


def test_load_keeps_own_placement_settings():
    m = _model()
    o = nl.PagedAdamW(m.parameters(), paged=True, page_size=1024, lr=0.5)
    _train_steps(m, o, torch.optim.lr_scheduler.StepLR(o, 5), _data()[:1])
    o2 = nl.PagedAdamW(m.parameters(), paged=False, page_size=4096, lr=0.1)
    o2.load_state_dict(o.state_dict())
    g = o2.param_groups[0]
    assert g["paged"] is False and g["page_size"] == 4096 and g["lr"] == 0.5


# ----------------------------------------------------------------------------- CUDA paging plan (host)


@pytest.mark.skipif(_native._C_cuda is None, reason="CUDA module not built")
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("n,page", [(1, 256), (1000, 256), (70_013, 2048), (65_536, 16_384)])
def test_paged_plan_emulated_on_cpu(bits, n, page):
    """The CUDA paged launcher's page/slot plan (the host code it runs), emulated with CPU copies
    and the CPU kernel on the staging slots: same result as one pass over the whole tensor, slots
    of in-flight pages never collide, every piece fits its slot."""
    CC = _native._C_cuda
    plan = CC.paged_plan(bits, n, page)
    slot_bytes = CC.paged_slot_bytes(bits, page)
    assert len(plan) == -(-n // page) and sum(pg["len"] for pg in plan) == n
    for i, pg in enumerate(plan):
        assert pg["off"] == i * page and pg["slot"] == i % CC.PAGED_SLOTS
        if i >= 1:  # copy-in of i+1, update of i, copy-out of i-1: three different slots
            assert len({plan[j]["slot"] for j in range(max(0, i - 1), min(len(plan), i + 2))}) == \
                min(len(plan), i + 2) - max(0, i - 1)
        ends = [pg["m_at"] + pg["m_bytes"], pg["v_at"] + pg["m_bytes"]]
        assert pg["m_at"] + pg["m_bytes"] <= pg["v_at"]
        if bits == 8:
            assert pg["v_at"] + pg["m_bytes"] <= pg["am_at"] and pg["am_at"] % 4 == 0
            assert pg["am_at"] + 4 * pg["nblocks"] <= pg["av_at"]
            ends.append(pg["av_at"] + 4 * pg["nblocks"])
            assert pg["block_off"] == pg["off"] // 256 and pg["nblocks"] == -(-pg["len"] // 256)
        assert max(ends) <= slot_bytes
    # emulate: host state -> slot -> kernel -> host
    g = torch.Generator().manual_seed(n)
    p0, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    whole_p, paged_p = p0.clone(), p0.clone()
    whole = _state8(n) if bits == 8 else _state32(n)
    host = [t.clone() for t in whole]
    staging = torch.zeros(CC.PAGED_SLOTS * slot_bytes, dtype=torch.uint8)
    sdt = torch.uint8 if bits == 8 else torch.float32
    for t in (1, 2):
        args = _hp_args(t, page)
        (optim_cpu.adamw8bit_step if bits == 8 else optim_cpu.adamw_step)(whole_p, grad, *whole, *args)
        for pg in plan:
            base = pg["slot"] * slot_bytes
            o, ln, bo, nb = pg["off"], pg["len"], pg["block_off"], pg["nblocks"]

            def piece(at, nbytes, dtype):
                return staging[base + at: base + at + nbytes].view(dtype)

            views = [piece(pg["m_at"], pg["m_bytes"], sdt), piece(pg["v_at"], pg["m_bytes"], sdt)]
            srcs = [host[0][o:o + ln], host[1][o:o + ln]]
            if bits == 8:
                views += [piece(pg["am_at"], 4 * nb, torch.float32), piece(pg["av_at"], 4 * nb, torch.float32)]
                srcs += [host[2][bo:bo + nb], host[3][bo:bo + nb]]
            for v, s in zip(views, srcs):
                v.copy_(s)
            fn = optim_cpu.adamw8bit_step if bits == 8 else optim_cpu.adamw_step
            fn(paged_p[o:o + ln], grad[o:o + ln], *views, *_hp_args(t, page))
            for v, s in zip(views, srcs):
                s.copy_(v)
    assert torch.equal(paged_p, whole_p)
    for a, b in zip(host, whole):
        assert torch.equal(a, b)
