"""multi_lora_linear on CUDA (BGMV and SGMV kernels of csrc/cuda/multi_lora.cu) against the CPU op
and the fp64 reference, on fresh random inputs and awkward shapes, outputs poisoned first. Skipped
without CUDA."""
import pytest
import torch

import nf4lora as nl
from multi_lora_refs import ref64, torch_lowp
from numerics import rel_err

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
_C_cuda = pytest.importorskip("nf4lora._C_cuda")

DEV = "cuda"


def case(M, N, K, E, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = nl.quantize_nf4(torch.randn(N, K, generator=g) * 0.05, 64)
    A = torch.randn(E, r, K, generator=g) * 0.1
    B = torch.randn(E, N, r, generator=g) * 0.1
    s = torch.rand(E, generator=g) + 0.5
    idx = torch.randint(-1, E, (M,), generator=g)
    idx[: M // 2] = 0
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g)
    return x, q, A, B, idx, s, bias


@pytest.mark.parametrize("min_rows", [1, 10**6, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,E,r", [(1, 4096, 4096, 1, 16), (64, 4096, 4096, 64, 16),
                                       (37, 300, 200, 5, 8), (200, 512, 256, 3, 16)])
def test_cuda_matches_reference(min_rows, dtype, M, N, K, E, r):
    x, q, A, B, idx, s, bias = case(M, N, K, E, r, dtype, seed=M + E)
    torch.full((64 << 20,), float("nan"), device=DEV)  # poison the caching allocator
    qd = q.to(DEV)
    y = nl.multi_lora_linear(x.to(DEV), qd, A.to(DEV), B.to(DEV), idx.to(DEV), s.to(DEV),
                             bias.to(DEV), sgmv_min_rows=min_rows)
    assert torch.isfinite(y).all()
    want = ref64(x, q, A, B, idx, s, bias)
    if dtype == torch.float32:
        assert rel_err(y, want) <= 1e-5
    else:  # the fused op's error model: within twice torch's own error in that dtype
        terr = rel_err(torch_lowp(x.to(DEV), q, A.to(DEV), B.to(DEV), idx, s, bias.to(DEV)), want)
        assert rel_err(y, want) <= 2 * terr + 1e-6, (rel_err(y, want), terr)


def test_cuda_bad_index_rejected():
    x, q, A, B, idx, s, bias = case(4, 64, 64, 2, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="adapter_idx"):
        nl.multi_lora_linear(x.to(DEV), q.to(DEV), A.to(DEV), B.to(DEV),
                             torch.tensor([0, 2, 0, 0], device=DEV), s.to(DEV))
