"""nl.multi_lora_linear (issue 14): each row equals that row run alone through qlora_linear with its
adapter (nf4_linear for -1), in fp32 to 1e-5 and in bf16/fp16 within the fused op's error model;
ranks 4/8/16 zero-padded in one pool; empty and single-row batches; the BGMV and SGMV paths
(forced and chosen) against csrc/ref on every ISA tier this CPU has; opcheck; bad input rejected
with a ValueError/TypeError naming the argument before any kernel runs.

Error model (as tests/test_linear_paths.py states it for the fused op): fp32 relative Frobenius
error <= 1e-5 against the per-row runs; 16-bit outputs no worse than twice torch's own error
(dequantize + matmul + LoRA in that dtype) against the fp64 reference, plus a small floor."""
import pytest
import torch

import nf4lora as nl
from nf4lora import _native
from nf4lora.backends import multi_lora as backend
from nf4lora.multi_lora import multi_lora_plan
from multi_lora_refs import ref64, torch_lowp
from numerics import rel_err

ops = torch.ops.nf4lora
RANKS = (4, 8, 16)


def make_case(M, N, K, E, dtype=torch.float32, seed=0, bs=64, dq=True, idx=None, base_rows=True):
    g = torch.Generator().manual_seed(seed)
    q = nl.quantize_nf4(torch.randn(N, K, generator=g) * 0.05, bs, double_quant=dq)
    r_max = max(RANKS)
    ranks = [RANKS[e % len(RANKS)] for e in range(E)]
    A = torch.zeros(E, r_max, K)
    B = torch.zeros(E, N, r_max)
    for e, r in enumerate(ranks):  # zero-padded to r_max
        A[e, :r] = torch.randn(r, K, generator=g) * 0.1
        B[e, :, :r] = torch.randn(N, r, generator=g) * 0.1
    s = torch.rand(E, generator=g) * 2 + 0.25
    if idx is None:
        lo = -1 if base_rows else 0
        idx = torch.randint(lo, E, (M,), generator=g)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g)
    return x, q, A, B, torch.as_tensor(idx, dtype=torch.int64), s, bias, ranks


def per_row(x, q, A, B, idx, s, bias, ranks):
    """Each row alone: qlora_linear with its adapter's r_e ranks, or nf4_linear for -1."""
    rows = []
    for m in range(x.shape[0]):
        e = int(idx[m])
        if e < 0:
            rows.append(nl.nf4_linear(x[m:m + 1], q, bias))
        else:
            r = ranks[e]
            rows.append(nl.qlora_linear(x[m:m + 1], q, A[e, :r], B[e, :, :r], float(s[e]), bias))
    return torch.cat(rows)


# (M, N, K): awkward sizes, K not a multiple of 32 (odd NF4 nibble starts), N not of 16
SHAPES = [(1, 40, 64), (3, 33, 96), (37, 96, 200), (70, 130, 256), (65, 320, 512)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("E", [1, 5])
def test_rows_equal_each_row_alone_fp32(M, N, K, E):
    x, q, A, B, idx, s, bias, ranks = make_case(M, N, K, E, seed=M + N + E)
    y = nl.multi_lora_linear(x, q, A, B, idx, s, bias)
    want = per_row(x, q, A, B, idx, s, bias, ranks)
    assert y.shape == (M, N) and y.dtype == torch.float32
    for m in range(M):
        assert rel_err(y[m], want[m]) <= 1e-5, (m, int(idx[m]))
    assert rel_err(y, ref64(x, q, A, B, idx, s, bias)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(3, 96, 128), (37, 96, 200), (64, 320, 512)])
def test_16bit_within_the_fused_error_model(dtype, M, N, K):
    x, q, A, B, idx, s, bias, ranks = make_case(M, N, K, 6, dtype=dtype, seed=7 + M)
    y = nl.multi_lora_linear(x, q, A, B, idx, s, bias)
    assert y.dtype == dtype
    want = ref64(x, q, A, B, idx, s, bias)
    terr = rel_err(torch_lowp(x, q, A, B, idx, s, bias), want)
    assert rel_err(y, want) <= 2 * terr + 1e-6, (rel_err(y, want), terr)
    # and row by row against the fused op run alone (both within the model of the fp64 product)
    alone = per_row(x, q, A, B, idx, s, bias, ranks)
    for m in range(M):
        assert rel_err(y[m], want[m]) <= 2 * max(rel_err(alone[m], want[m]), terr) + 1e-6, m


def test_minus_one_rows_are_exactly_the_base():
    x, q, A, B, _, s, bias, _ = make_case(9, 64, 128, 3)
    idx = torch.tensor([-1, 0, -1, 2, 1, -1, -1, 0, -1])
    y = nl.multi_lora_linear(x, q, A, B, idx, s, bias)
    base = nl.nf4_linear(x, q, bias)
    for m in (idx == -1).nonzero().squeeze(1).tolist():
        assert torch.equal(y[m], base[m])
    all_base = nl.multi_lora_linear(x, q, A, B, torch.full((9,), -1), s, bias)
    assert torch.equal(all_base, base)


def test_mixed_ranks_padding_is_invisible():
    """ranks 4/8/16 in one pool: each equals its unpadded adapter run alone (covered row by row
    above); here the pool's padding is checked to be what the docs ask for."""
    x, q, A, B, idx, s, bias, ranks = make_case(12, 48, 64, 6, idx=list(range(6)) * 2)
    assert sorted(set(ranks)) == [4, 8, 16]
    for e, r in enumerate(ranks):
        assert not A[e, r:].any() and not B[e, :, r:].any()
    y = nl.multi_lora_linear(x, q, A, B, idx, s, bias)
    assert rel_err(y, per_row(x, q, A, B, idx, s, bias, ranks)) <= 1e-5


def test_empty_and_single_row_batches():
    x, q, A, B, _, s, bias, ranks = make_case(1, 40, 96, 3)
    empty = nl.multi_lora_linear(x[:0], q, A, B, torch.zeros(0, dtype=torch.int64), s, bias)
    assert empty.shape == (0, 40)
    for e in (-1, 0, 2):
        y = nl.multi_lora_linear(x, q, A, B, torch.tensor([e]), s, bias)
        assert rel_err(y, per_row(x, q, A, B, torch.tensor([e]), s, bias, ranks)) <= 1e-5


def test_leading_dims_and_int32_indices_and_no_bias():
    x, q, A, B, idx, s, _, ranks = make_case(12, 40, 64, 4)
    x3 = x.reshape(3, 4, 64)
    y = nl.multi_lora_linear(x3, q, A, B, idx.reshape(3, 4).to(torch.int32), s.tolist())
    assert y.shape == (3, 4, 40)
    assert rel_err(y.reshape(12, 40), nl.multi_lora_linear(x, q, A, B, idx, s)) == 0.0


# ------------------------------------------------------------------------ BGMV / SGMV paths
def _runs_idx(M, seed):
    """Long runs (adapters 0, 1 with many rows), short ones (2..9 with one or two), base rows;
    shuffled so nothing arrives sorted."""
    idx = [0] * 20 + [1] * 9 + [2, 3, 3, 4, 5, 6, 6, 7, 8, 9] + [-1] * 5
    idx = (idx * (M // len(idx) + 1))[:M]
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(idx)[perm]


def test_plan_groups_long_runs_and_scatters_short_ones():
    idx = _runs_idx(44, 0)
    p = multi_lora_plan(idx)
    default_min = _native._C.MULTI_LORA_SGMV_MIN_ROWS
    counts = torch.bincount(idx[idx >= 0])
    assert p["sgmv_groups"] == int((counts >= default_min).sum())
    assert p["sgmv_rows"] == int(counts[counts >= default_min].sum())
    assert p["bgmv_rows"] == int(counts[counts < default_min].sum())
    forced_sgmv, forced_bgmv = multi_lora_plan(idx, 1), multi_lora_plan(idx, 45)
    assert forced_sgmv["bgmv_rows"] == 0 and forced_sgmv["sgmv_groups"] == int((counts > 0).sum())
    assert forced_bgmv["sgmv_rows"] == 0 and forced_bgmv["bgmv_rows"] == int((idx >= 0).sum())


def tiers():
    out = ["scalar"]
    if _native._C.has_avx2():
        out.append("avx2")
    if _native._C.has_avx512():
        out.append("avx512")
    return out


def _backend(x, q, A, B, idx, s, bias, min_rows, impl="fast"):
    return backend.multi_lora_linear_cpu(x, q.packed, q.absmax, q.absmax2, q.code8, q.offset,
                                         q.blocksize, q.shape[0], A, B, idx, s, bias, min_rows,
                                         impl=impl)


@pytest.mark.parametrize("tier", tiers())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("min_rows", [0, 1, 10**6])
@pytest.mark.parametrize("M,N,K", [(44, 100, 96), (131, 70, 200), (7, 17, 33)])
def test_kernel_matches_ref_on_every_path(tier, dtype, pool, min_rows, M, N, K):
    """The C++ kernel (BGMV, SGMV, both; fp32 and 16-bit pools) against the csrc/ref twin on the
    same base: the LoRA sums agree to fp32 rounding, so fp32 outputs to 1e-6 and 16-bit ones to one
    rounding step."""
    x, q, A, B, _, s, bias, _ = make_case(M, N, K, 10, dtype=dtype, seed=M)
    A, B = A.to(pool), B.to(pool)
    idx = _runs_idx(M, M)
    with nl.max_cpu_isa(tier):
        want = _backend(x, q, A, B, idx, s, bias, min_rows, impl="ref")
        got = _backend(x, q, A, B, idx, s, bias, min_rows)
        base = _backend(x, q, A, B, torch.full_like(idx, -1), s, bias, min_rows)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert rel_err(got, want) <= 1e-6
    else:
        # the LoRA term added to the same rounded base; sums in another order may flip one step
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    # the base rows are untouched by the LoRA pass
    keep = idx == -1
    assert torch.equal(got[keep], base[keep])


@pytest.mark.parametrize("pool", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16bit_pools_equal_their_values_in_fp32(pool, dtype):
    """A 16-bit pool gives what the same (rounded) numbers give as a float32 pool: the kernels
    convert on load and sum in fp32."""
    x, q, A, B, idx, s, bias, _ = make_case(50, 130, 256, 8, dtype=dtype, seed=11)
    A16, B16 = A.to(pool), B.to(pool)
    for min_rows in (1, 1000):
        got = nl.multi_lora_linear(x, q, A16, B16, idx, s, bias, sgmv_min_rows=min_rows)
        want = nl.multi_lora_linear(x, q, A16.float(), B16.float(), idx, s, bias, sgmv_min_rows=min_rows)
        assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 2e-3)


def test_sgmv_and_bgmv_agree_with_each_other():
    x, q, A, B, _, s, bias, _ = make_case(96, 256, 512, 10, seed=3)
    idx = _runs_idx(96, 3)
    a = nl.multi_lora_linear(x, q, A, B, idx, s, bias, sgmv_min_rows=1)
    b = nl.multi_lora_linear(x, q, A, B, idx, s, bias, sgmv_min_rows=97)
    assert rel_err(a, b) <= 1e-6


def test_float64_through_the_default_backend():
    x, q, A, B, idx, s, bias, ranks = make_case(10, 40, 64, 3)
    y = nl.multi_lora_linear(x.double(), q, A.double(), B.double(), idx, s.double(), bias.double())
    assert y.dtype == torch.float64
    assert rel_err(y, ref64(x, q, A, B, idx, s, bias)) <= 1e-12


def test_opcheck():
    for M, dtype, dq in [(5, torch.float32, True), (9, torch.bfloat16, False), (0, torch.float32, True),
                         (6, torch.float64, True)]:
        x, q, A, B, idx, s, bias, _ = make_case(max(M, 1), 24, 64, 3, dtype=dtype, dq=dq)
        x, idx = x[:M], idx[:M]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        args = (x, q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize, 24, A.to(acc),
                B.to(acc), idx, s.to(acc), bias.to(acc), 0)
        torch.library.opcheck(ops.multi_lora_linear, args)


def test_compile_fullgraph():
    x, q, A, B, idx, s, bias, _ = make_case(8, 24, 64, 3)
    f = torch.compile(lambda x: nl.multi_lora_linear(x, q, A, B, idx, s, bias) * 2, fullgraph=True)
    assert torch.equal(f(x), nl.multi_lora_linear(x, q, A, B, idx, s, bias) * 2)


def test_threads_equal_serial():
    import threading
    x, q, A, B, idx, s, bias, _ = make_case(64, 256, 512, 16, seed=5)
    want = nl.multi_lora_linear(x, q, A, B, idx, s, bias)
    out = [None] * 4

    def run(i):
        out[i] = nl.multi_lora_linear(x, q, A, B, idx, s, bias, sgmv_min_rows=[None, 1, 100, 2][i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert torch.equal(out[0], want)
    assert all(rel_err(o, want) <= 1e-6 for o in out)


# ------------------------------------------------------------------------ bad input
def _good():
    x, q, A, B, idx, s, bias, _ = make_case(6, 24, 64, 3)
    return dict(x=x, q=q, A_pool=A, B_pool=B, adapter_idx=idx, scalings=s, bias=bias)


@pytest.mark.parametrize("change,exc,words", [
    (dict(adapter_idx=torch.tensor([0, 1, 2, 3, 0, 0])), ValueError, "adapter_idx"),
    (dict(adapter_idx=torch.tensor([0, -2, 0, 0, 0, 0])), ValueError, "adapter_idx"),
    (dict(adapter_idx=torch.tensor([0, 1, 2])), ValueError, "adapter_idx"),
    (dict(adapter_idx=torch.zeros(6)), ValueError, "adapter_idx"),
    (dict(A_pool=torch.zeros(3, 16, 64, dtype=torch.float64)), ValueError, "A_pool"),
    (dict(B_pool=torch.zeros(3, 24, 16, dtype=torch.bfloat16)), ValueError, "B_pool"),
    (dict(A_pool=torch.zeros(3, 16, 65)), ValueError, "A_pool"),
    (dict(A_pool=torch.zeros(16, 64)), ValueError, "A_pool"),
    (dict(A_pool=torch.zeros(0, 16, 64)), ValueError, "A_pool"),
    (dict(A_pool=torch.zeros(3, 64, 16).transpose(1, 2)), ValueError, "A_pool"),
    (dict(B_pool=torch.zeros(3, 25, 16)), ValueError, "B_pool"),
    (dict(B_pool=torch.zeros(3, 24, 8)), ValueError, "B_pool"),
    (dict(B_pool=torch.zeros(4, 24, 16)), ValueError, "B_pool"),
    (dict(scalings=torch.ones(4)), ValueError, "scalings"),
    (dict(scalings=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "scalings"),
    (dict(scalings=torch.tensor([1.0, float("inf"), 1.0])), ValueError, "scalings"),
    (dict(scalings=torch.ones(3, 1)), ValueError, "scalings"),
    (dict(x=torch.zeros(6, 63)), ValueError, "x"),
    (dict(x=torch.zeros(6, 64, dtype=torch.int32)), ValueError, "x"),
    (dict(bias=torch.zeros(23)), ValueError, "bias"),
    (dict(q=torch.zeros(24, 64)), TypeError, "q"),
    (dict(A_pool=torch.zeros(3, 16, 64, device="meta")), ValueError, "A_pool"),
    (dict(adapter_idx=torch.zeros(6, dtype=torch.int64, device="meta")), ValueError, "adapter_idx"),
])
def test_bad_input_is_rejected_before_any_kernel(change, exc, words):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=words):
        nl.multi_lora_linear(**args)


def test_bad_input_at_the_op_level_too():
    a = _good()
    q = a["q"]
    base = (a["x"], q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize, 24)
    with pytest.raises(ValueError, match="adapter_idx"):
        ops.multi_lora_linear(*base, a["A_pool"], a["B_pool"], torch.tensor([0, 1, 2, 5, 0, 0]),
                              a["scalings"], None, 0)
    with pytest.raises(ValueError, match="adapter_idx must be int64"):
        ops.multi_lora_linear(*base, a["A_pool"], a["B_pool"], a["adapter_idx"].int(), a["scalings"],
                              None, 0)
    bad, y = torch.tensor([0, 9, 0, 0, 0, 0]), torch.zeros(6, 24)  # alive across the call
    with pytest.raises(ValueError, match="adapter_idx out of range"):  # the kernel's own check
        _native._C.multi_lora_add(a["x"].data_ptr(), 0, 6, 64, 24, a["A_pool"].data_ptr(),
                                  a["B_pool"].data_ptr(), bad.data_ptr(), a["scalings"].data_ptr(),
                                  3, 16, y.data_ptr())


def test_grad_is_refused_clearly():
    a = _good()
    a["x"] = a["x"].requires_grad_()
    with pytest.raises(RuntimeError, match="inference"):
        nl.multi_lora_linear(**a)
    with torch.no_grad():
        nl.multi_lora_linear(**a)


def test_bad_sgmv_min_rows():
    with pytest.raises(ValueError, match="sgmv_min_rows"):
        nl.multi_lora_linear(**_good(), sgmv_min_rows=0)
