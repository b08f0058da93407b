"""Fuzzing the public ops with hypothesis: quantize_nf4, dequantize_nf4, nf4_linear, qlora_linear
(forward and backward), multi_lora_linear, NF4Tensor and PagedAdamW over random shapes (0 and 1 included), dtypes,
strides and views, blocksizes, dropout, mixed ranks and non-finite values. Each case runs in a
forked worker (tests/fuzz_utils.py) and must equal the reference (the pure-torch backend, or
float64 math on the dequantized weight within the DESIGN.md error model) or raise a Python
exception that names the problem. Hundreds of cases by default; --fuzz-long runs ten times more.
The loaders (bitsandbytes state dicts, adapter files, optimizer state) are in test_fuzz_loaders.py."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import nf4lora as nl
from fuzz_utils import check_case, fuzz_settings
from nf4lora.backends import default as ref_be
from nf4lora.backends import optim_default
from nf4lora.nf4_format import DYNAMIC_SIGNED
from numerics import rel_err

# (hypothesis favours the first element of a list and 0 of an integer range: valid values first,
#  and a rare branch is taken on a middle value)
SIZES = [64, 1, 2, 3, 7, 31, 32, 33, 63, 0, 65, 100, 127, 128, 129, 255, 256, 257, 300]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
BAD_BLOCKSIZES = [0, 1, 16, 48, 100, 8192, -64, 64.0, "64", True, None]
ACT = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
MAX_NUMEL = 60_000


def _seed_gen(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def shapes(draw, min_dims=1, max_dims=3):
    dims = draw(st.lists(st.sampled_from(SIZES), min_size=min_dims, max_size=max_dims))
    while math.prod(dims) > MAX_NUMEL:
        dims[dims.index(max(dims))] //= 4
    return dims


@st.composite
def tensors(draw, shape, dtype, allow_views=True, scale=None):
    """A tensor of `shape` and `dtype`, possibly a non-contiguous view (transposed, strided slice)
    of a bigger one, possibly with huge / tiny / subnormal magnitudes."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = scale if scale is not None else draw(st.sampled_from([1.0, 1e-3, 1e4, 1e-30, 1e30]))
    view = draw(st.sampled_from(["contig", "transposed", "strided"])) if allow_views else "contig"
    g = _seed_gen(seed)
    if view == "transposed" and len(shape) >= 2:
        t = (torch.randn(*shape[::-1], generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.permute(*reversed(range(len(shape))))
    if view == "strided":
        t = (torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t[..., ::2]
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _describe(**kw):
    out = []
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = f"{v.dtype} {tuple(v.shape)} stride {v.stride()}"
        out.append(f"{k}={v}")
    return ", ".join(out)


# ----------------------------------------------------------------------------- quantize / dequantize
def _check_quantize(w, blocksize, double_quant):
    q = nl.quantize_nf4(w, blocksize, double_quant=double_quant)
    packed, absmax = ref_be.quantize_nf4(w.contiguous(), blocksize)
    assert torch.equal(q.packed, packed), "packed codes differ from the pure-torch reference"
    if double_quant:
        offset = float(absmax.mean())
        qa, a2 = ref_be.quantize_absmax(absmax, offset, DYNAMIC_SIGNED)
        assert q.offset == offset and torch.equal(q.absmax, qa) and torch.equal(q.absmax2, a2)
    else:
        assert torch.equal(q.absmax, absmax)
    for dtype in (None, torch.float32, torch.bfloat16, torch.float64):
        got = nl.dequantize_nf4(q, dtype)
        want = ref_be.dequantize_nf4(q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize,
                                     list(q.shape), dtype or w.dtype)
        assert got.dtype == want.dtype and got.shape == w.shape
        assert torch.equal(got, want), "dequantize differs from the pure-torch reference"
    back = nl.NF4Tensor.from_bnb_state_dict(q.to_bnb_state_dict("w"), "w")
    assert torch.equal(nl.dequantize_nf4(back), nl.dequantize_nf4(q))


def test_fuzz_quantize_dequantize(request):
    @st.composite
    def cases(draw):
        invalid_dtype = draw(st.integers(0, 9)) == 5
        dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.uint8] if invalid_dtype else
                                     [torch.float32, torch.float16, torch.bfloat16]))
        shape = draw(shapes())
        views = draw(st.integers(0, 4)) == 3  # the public quantize_nf4 takes contiguous tensors
        w = draw(tensors(shape, dtype if dtype.is_floating_point else torch.float32, allow_views=views,
                         scale=draw(st.sampled_from([1.0, 1.0, 1e-3, 1e4, 1e-30, 1e30]))))
        if not dtype.is_floating_point:
            w = w.to(dtype)
        bad_bs = draw(st.integers(0, 9)) == 5
        bs = draw(st.sampled_from(BAD_BLOCKSIZES if bad_bs else BLOCKSIZES))
        poison = draw(st.sampled_from([None] * 15 + [float("nan"), float("inf"), -float("inf")]))
        if poison is not None and w.numel() and dtype.is_floating_point:
            w = w.contiguous().clone()
            w.view(-1)[draw(st.integers(0, w.numel() - 1))] = poison
        return w, bs, draw(st.booleans()), poison

    @given(cases())
    def run(case):
        w, bs, dq, poison = case
        names = ["w", "blocksize", "double_quant"]
        if poison is not None:
            names = ["nan or inf", "blocksize", "dtype", "empty", "contiguous"]
        check_case("quantize_nf4+dequantize_nf4", lambda: _check_quantize(w, bs, dq), names,
                   _describe(w=w, blocksize=bs, double_quant=dq, poison=poison))
    fuzz_settings(request, 70)(run)()


# ----------------------------------------------------------------------------- the fused linear
def _reference_linear(x, W, bias, A, B, s, p, seed, dy):
    """float64 y and grads (x, A, B, bias) from the dequantized weight and the default dropout mask."""
    K = W.shape[1]
    x64 = x.detach().double().reshape(-1, K).requires_grad_()
    leaves = [x64]
    y = x64 @ W.double().T
    if bias is not None:
        b64 = bias.detach().double().requires_grad_()
        leaves.append(b64)
        y = y + b64
    if A is not None:
        A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
        leaves += [A64, B64]
        xd = ref_be.apply_dropout(x64, p, torch.tensor(seed)) if p > 0 else x64
        y = y + s * (xd @ A64.T) @ B64.T
    y.backward(dy.double().reshape(y.shape))
    return y, [t.grad for t in leaves]


def _check_linear(x, q, bias, A, B, s, p, seed, backward):
    leaves = [t for t in (x, bias, A, B) if t is not None]
    for t in leaves:
        t.requires_grad_(backward)
    if A is None:
        y = nl.nf4_linear(x, q, bias)
    else:
        y = nl.qlora_linear(x, q, A, B, s, bias, dropout_p=p, seed=seed)
    N = q.shape[0]
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
    W = nl.dequantize_nf4(q, torch.float64)
    dy = torch.randn(y.shape, generator=_seed_gen(5), dtype=torch.float64).to(y.dtype)
    y_ref, grads_ref = _reference_linear(x, W, bias, A, B, s, p, seed, dy)
    if y.numel() == 0:
        return
    tol = TOL[x.dtype]
    assert rel_err(y, y_ref.reshape(y.shape)) <= tol, f"y: rel err {rel_err(y, y_ref.reshape(y.shape))}"
    if not backward:
        return
    y.backward(dy)
    names = ["x", "bias", "lora_A", "lora_B"] if bias is not None else ["x", "lora_A", "lora_B"]
    for name, t, g_ref in zip(names, leaves, grads_ref):
        assert t.grad is not None and t.grad.shape == t.shape, f"grad of {name}"
        g_ref = g_ref.reshape(t.shape)
        if g_ref.abs().max() == 0:
            assert bool((t.grad == 0).all()), f"grad of {name} should be zero"
            continue
        gtol = tol if name == "x" else max(tol, TOL[t.dtype], 1e-4)  # grads come back in t's dtype
        err = rel_err(t.grad, g_ref)
        assert err <= gtol, f"grad of {name}: rel err {err} > {gtol}"


def test_fuzz_linear(request):
    @st.composite
    def cases(draw):
        N = draw(st.sampled_from([1, 2, 3, 31, 32, 33, 64, 65, 96, 130]))
        K = draw(st.sampled_from([1, 2, 3, 31, 32, 33, 64, 65, 96, 130, 256]))
        bs = draw(st.sampled_from(BLOCKSIZES[:5]))
        dq = draw(st.booleans())
        wq = torch.randn(N, K, generator=_seed_gen(draw(st.integers(0, 1000))))
        q = nl.quantize_nf4(wq, bs, double_quant=dq)
        dtype = draw(st.sampled_from(ACT))
        lead = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 40]), min_size=1, max_size=2))
        kx = K
        mismatch = draw(st.integers(0, 14)) == 7
        if mismatch:
            kx = K + draw(st.sampled_from([-1, 1, 7])) if K > 1 else 2
        x = draw(tensors([*lead, kx], dtype, scale=1.0))
        bias = draw(tensors([N], torch.float32, allow_views=False, scale=1.0)) if draw(st.booleans()) else None
        lora = draw(st.booleans())
        r = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
        A = draw(tensors([r, K], draw(st.sampled_from([torch.float32, torch.bfloat16])), scale=0.1)) if lora else None
        B = draw(tensors([N, r], torch.float32, scale=0.1)) if lora else None
        p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9])) if lora else 0.0
        seed = draw(st.integers(0, 2**62))
        s = draw(st.sampled_from([0.5, 2.0, 1 / math.sqrt(8)]))
        return x, q, bias, A, B, s, p, seed, draw(st.booleans())

    @given(cases())
    def run(case):
        x, q, bias, A, B, s, p, seed, backward = case
        check_case("nf4_linear/qlora_linear", lambda: _check_linear(*case), ["x", "last dimension"],
                   _describe(x=x, q=q, bias=bias, lora_A=A, lora_B=B, scaling=s, dropout_p=p,
                             seed=seed, backward=backward))

    fuzz_settings(request, 80)(run)()


def _check_multi_lora(x, q, A, B, idx, s, bias, min_rows):
    y = nl.multi_lora_linear(x, q, A, B, idx, s, bias, sgmv_min_rows=min_rows)
    N = q.shape[0]
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
    if y.numel() == 0:
        return
    W = nl.dequantize_nf4(q, torch.float64)
    x2 = x.reshape(-1, x.shape[-1]).double()
    ref = x2 @ W.t() + (0 if bias is None else bias.double())
    for m, e in enumerate(idx.reshape(-1).tolist()):
        if e >= 0:
            ref[m] += float(s[e]) * (x2[m] @ A[e].double().t()) @ B[e].double().t()
    assert rel_err(y, ref.reshape(y.shape)) <= TOL[x.dtype], f"y: rel err {rel_err(y, ref.reshape(y.shape))}"


def test_fuzz_multi_lora(request):
    """multi_lora_linear over random shapes (empty batches included), dtypes, pool dtypes, views of
    x, ranks, adapter counts, index patterns and SGMV/BGMV thresholds; sometimes an index out of
    [-1, E), a non-finite scaling or a pool of the wrong dtype, which must be an error naming it."""
    @st.composite
    def cases(draw):
        N = draw(st.sampled_from([1, 3, 32, 33, 65, 130]))
        K = draw(st.sampled_from([1, 3, 31, 32, 64, 65, 130]))
        q = nl.quantize_nf4(torch.randn(N, K, generator=_seed_gen(draw(st.integers(0, 1000)))),
                            draw(st.sampled_from(BLOCKSIZES[:4])), double_quant=draw(st.booleans()))
        dtype = draw(st.sampled_from(ACT))
        lead = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 40]), min_size=1, max_size=2))
        x = draw(tensors([*lead, K], dtype, scale=1.0))
        E, r = draw(st.sampled_from([1, 2, 5, 16])), draw(st.sampled_from([1, 4, 8, 16, 17]))
        pools = [torch.float64] if dtype == torch.float64 else [torch.float32, torch.bfloat16, torch.float16]
        pool = draw(st.sampled_from(pools + [torch.float64 if dtype != torch.float64 else torch.float32]))
        A = draw(tensors([E, r, K], torch.float64, allow_views=False, scale=0.1)).to(pool)
        B = draw(tensors([E, N, r], torch.float64, allow_views=False, scale=0.1)).to(pool)
        g = _seed_gen(draw(st.integers(0, 1000)))
        idx = torch.randint(-1, E, tuple(lead), generator=g)
        if idx.numel() and draw(st.integers(0, 9)) == 7:
            idx.view(-1)[0] = draw(st.sampled_from([E, -2, E + 100]))
        s = torch.rand(E, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
        if draw(st.integers(0, 9)) == 7:
            s[0] = draw(st.sampled_from([float("nan"), float("inf")]))
        bias = draw(tensors([N], torch.float32, allow_views=False, scale=1.0)) if draw(st.booleans()) else None
        return x, q, A, B, idx, s, bias, draw(st.sampled_from([None, 1, 2, 1000]))

    @given(cases())
    def run(case):
        x, q, A, B, idx, s, bias, min_rows = case
        check_case("multi_lora_linear", lambda: _check_multi_lora(*case),
                   ["adapter_idx", "scalings", "A_pool", "B_pool"],
                   _describe(x=x, q=q, A_pool=A, B_pool=B, adapter_idx=idx, scalings=s, bias=bias,
                             sgmv_min_rows=min_rows))

    fuzz_settings(request, 60)(run)()


BAD_LINEAR_ARGS = {
    "x": [torch.zeros(2, 5, dtype=torch.int32), "x", torch.zeros(()), torch.zeros(2, 7)],
    "q": [torch.zeros(4, 8), None, 3],
    "lora_A": [torch.zeros(2, 7), torch.zeros(8), torch.zeros(2, 8, dtype=torch.int64), [1.0]],
    "lora_B": [torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4)],
    "bias": [torch.zeros(5), torch.zeros(4, 1), torch.zeros(4, dtype=torch.int32)],
    "scaling": [float("nan"), float("inf"), "2", None, torch.ones(2)],
    "dropout_p": [1.0, -0.1, float("nan"), 2, "0.1"],
}


def test_fuzz_linear_bad_arguments(request):
    """One argument of a valid qlora_linear call replaced by something wrong: an exception naming it."""
    q = nl.quantize_nf4(torch.randn(4, 8, generator=_seed_gen(0)), 32)
    good = dict(x=torch.randn(3, 8), q=q, lora_A=torch.randn(2, 8), lora_B=torch.randn(4, 2),
                scaling=2.0, bias=torch.randn(4), dropout_p=0.1)

    @given(st.sampled_from(sorted(BAD_LINEAR_ARGS)), st.data())
    def run(name, data):
        bad = data.draw(st.sampled_from(BAD_LINEAR_ARGS[name]))
        kw = {**good, name: bad}

        def case():
            nl.qlora_linear(kw["x"], kw["q"], kw["lora_A"], kw["lora_B"], kw["scaling"], kw["bias"],
                            dropout_p=kw["dropout_p"])
            raise AssertionError(f"accepted {name}={bad!r}")
        check_case("qlora_linear bad argument", case, [name], _describe(**{name: bad}))

    fuzz_settings(request, 30)(run)()


# ----------------------------------------------------------------------------- NF4Tensor
def test_fuzz_nf4tensor_constructor(request):
    """NF4Tensor built from inconsistent parts: an error naming the part, never a kernel reading
    past a buffer (the dequantize runs when the constructor accepts)."""
    @given(st.data())
    def run(data):
        shape = data.draw(shapes())
        shape = [max(1, s) for s in shape]
        bs = data.draw(st.sampled_from(BLOCKSIZES))
        dq = data.draw(st.booleans())
        q = nl.quantize_nf4(torch.randn(*shape, generator=_seed_gen(1)), bs, double_quant=dq)
        parts = dict(packed=q.packed, absmax=q.absmax, absmax2=q.absmax2, code8=q.code8)
        which = data.draw(st.sampled_from(["packed", "absmax", "absmax2", "code8", "shape", "none"]))
        how = data.draw(st.sampled_from(["shorter", "longer", "dtype", "2d"]))
        new_shape = list(shape)
        if which == "shape":
            new_shape = data.draw(st.sampled_from([[*shape[:-1], shape[-1] + 1], [2**31, 2**31], [0], [-1]]))
        elif which != "none" and parts[which] is not None:
            t = parts[which]
            t = {"shorter": t[:-1] if t.numel() > 0 else t, "longer": torch.cat([t, t[:1]]),
                 "dtype": t.to(torch.float16 if t.dtype != torch.float16 else torch.float32),
                 "2d": t.reshape(1, -1) if which != "packed" else t[: max(0, t.numel() - 1)]}[how]
            parts[which] = t

        def case():
            q2 = nl.NF4Tensor(parts["packed"], parts["absmax"], new_shape, torch.float32, bs,
                              parts["absmax2"], parts["code8"], q.offset)
            assert torch.equal(nl.dequantize_nf4(q2), nl.dequantize_nf4(q))
        check_case("NF4Tensor(...)", case, [which, "shape", "elements", "blocks"],
                   _describe(which=which, how=how, shape=new_shape))

    fuzz_settings(request, 40)(run)()


# ----------------------------------------------------------------------------- PagedAdamW
def _check_adamw(shapes_, dtypes, bits, page_size, min8, lr, wd, steps, seed):
    g = _seed_gen(seed)
    init = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes_, dtypes)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone() for t in init]
    opt = nl.PagedAdamW(ours, lr=lr, weight_decay=wd, optim_bits=bits, page_size=page_size,
                        min_8bit_size=min8)
    group = opt.param_groups[0]
    ref_state = [opt._init_state(p, group) for p in ref]
    for step in range(1, steps + 1):
        for p, r in zip(ours, ref):
            grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
            p.grad, r.grad = grad.clone(), grad.clone()
        opt.step()
        for r, st_ in zip(ref, ref_state):
            if r.numel() == 0:
                continue
            args = (lr, 0.9, 0.999, 1e-8, wd, step, page_size)
            if st_["exp_avg"].dtype == torch.uint8:
                optim_default.adamw8bit_step(r, r.grad, st_["exp_avg"], st_["exp_avg_sq"],
                                             st_["exp_avg_absmax"], st_["exp_avg_sq_absmax"], *args)
            else:
                optim_default.adamw_step(r, r.grad, st_["exp_avg"], st_["exp_avg_sq"], *args)
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert torch.equal(p.detach(), r), f"param {i} ({tuple(p.shape)}, {p.dtype}) differs from the reference"


def test_fuzz_paged_adamw(request):
    @given(st.data())
    def run(data):
        n = data.draw(st.integers(1, 4))
        shapes_ = [data.draw(shapes(max_dims=2)) for _ in range(n)]
        dtypes = [data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])) for _ in range(n)]
        bits = data.draw(st.sampled_from([8, 32]))
        page_size = data.draw(st.sampled_from([256, 512, 4096, 1 << 20]))
        min8 = data.draw(st.sampled_from([0, 1, 256, 4096]))
        lr = data.draw(st.sampled_from([1e-3, 0.1, 0.0]))
        wd = data.draw(st.sampled_from([0.0, 0.01]))
        steps = data.draw(st.integers(1, 3))
        seed = data.draw(st.integers(0, 1000))
        check_case("PagedAdamW.step", lambda: _check_adamw(shapes_, dtypes, bits, page_size, min8, lr,
                                                            wd, steps, seed), [],
                   _describe(shapes=shapes_, dtypes=dtypes, bits=bits, page_size=page_size,
                             min_8bit_size=min8, lr=lr, wd=wd, steps=steps))

    fuzz_settings(request, 40)(run)()
