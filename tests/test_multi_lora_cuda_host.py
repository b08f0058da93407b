"""The CUDA multi-adapter kernels (csrc/cuda/multi_lora.cu) checked on the CPU, no GPU needed:
nf4lora._C_cuda.multi_lora_emulate_host runs the shrink and expand kernels block by block, warp by
warp and lane by lane through the same __host__ __device__ functions the kernels call (the
__shfl_xor_sync butterfly emulated), on BGMV tiles (one row per block) and SGMV tiles (rows sorted
by adapter, runs split inside a tile), against the csrc/ref twin."""
import pytest
import torch

from nf4lora import _native
from numerics import rel_err

_C_cuda = pytest.importorskip("nf4lora._C_cuda")
if not hasattr(_C_cuda, "multi_lora_emulate_host"):
    pytest.skip("nf4lora._C_cuda built without the multi-adapter kernels", allow_module_level=True)

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def case(M, N, K, E, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = torch.randn(E, r, K, generator=g) * 0.1
    B = torch.randn(E, N, r, generator=g) * 0.1
    s = torch.rand(E, generator=g) + 0.5
    idx = torch.randint(-1, E, (M,), generator=g)
    idx[: M // 3] = 0  # a long run of one adapter (after sorting) and scattered rows
    idx = idx[torch.randperm(M, generator=g)]
    y0 = torch.randn(M, N, generator=g).to(dtype)  # stands for the base
    return x, A, B, s, idx, y0


PCODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def run_emulation(x, A, B, s, idx, y0, sgmv):
    M, K = x.shape
    E, N, r = B.shape
    y = y0.clone()
    u = torch.full((M, r), float("nan"))  # poison: rows with an adapter must be written
    order = torch.argsort(idx, stable=True) if sgmv else None
    _C_cuda.multi_lora_emulate_host(x.data_ptr(), CODE[x.dtype], M, K, N, A.data_ptr(), B.data_ptr(),
                                    idx.data_ptr(), 0 if order is None else order.data_ptr(),
                                    s.data_ptr(), E, r, u.data_ptr(), y.data_ptr(), sgmv, PCODE[A.dtype])
    return y, u


def run_ref(x, A, B, s, idx, y0):
    M, K = x.shape
    E, N, r = B.shape
    y = y0.clone()
    _native._C.multi_lora_add(x.data_ptr(), CODE[x.dtype], M, K, N, A.data_ptr(), B.data_ptr(),
                              idx.data_ptr(), s.data_ptr(), E, r, y.data_ptr(), 0, "ref", PCODE[A.dtype])
    return y


@pytest.mark.parametrize("sgmv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,E,r", [(1, 300, 64, 1, 4), (19, 257, 100, 4, 16), (40, 64, 33, 7, 8),
                                       (9, 513, 96, 3, 20)])
def test_emulated_kernels_match_ref(sgmv, dtype, pool, M, N, K, E, r):
    x, A, B, s, idx, y0 = case(M, N, K, E, r, dtype, seed=M * 7 + r)
    A, B = A.to(pool), B.to(pool)
    y, u = run_emulation(x, A, B, s, idx, y0, sgmv)
    want = run_ref(x, A, B, s, idx, y0)
    used = idx >= 0
    assert torch.isfinite(u[used]).all(), "a row with an adapter was not shrunk"
    assert torch.isnan(u[~used]).all(), "a base-only row was written"
    assert torch.equal(y[~used], y0[~used])
    if dtype == torch.float32:
        assert rel_err(y, want) <= 1e-6
    else:
        torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    # u equals x A^T of each row's adapter
    for m in used.nonzero().squeeze(1).tolist():
        want_u = x[m].float() @ A[int(idx[m])].float().t()
        assert rel_err(u[m], want_u) <= 1e-5


def test_sgmv_tile_splits_runs_at_adapter_changes():
    """A tile of sorted positions holding several adapters runs each run separately; a run longer
    than the tile continues in the next block."""
    T = _C_cuda.MULTI_LORA_SGMV_TILE
    idx = torch.tensor([2] * (T + 3) + [0, 1, 1] + [-1] * 2)
    M = idx.numel()
    x, A, B, s, _, y0 = case(M, 40, 64, 3, 8, torch.float32, seed=1)
    y, _ = run_emulation(x, A, B, s, idx, y0, True)
    assert rel_err(y, run_ref(x, A, B, s, idx, y0)) <= 1e-6


def test_out_of_range_rows_are_skipped_not_read():
    """The kernels skip adapter ids outside [0, E) (the Python layer rejects them earlier)."""
    x, A, B, s, _, y0 = case(4, 40, 64, 2, 4, torch.float32, seed=2)
    idx = torch.tensor([5, -3, 1, 0])
    for sgmv in (False, True):
        y, _ = run_emulation(x, A, B, s, idx, y0, sgmv)
        assert torch.equal(y[:2], y0[:2])
