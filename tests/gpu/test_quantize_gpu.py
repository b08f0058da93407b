"""CUDA quantize/dequantize kernels vs the CPU reference (csrc/ref), bit for bit. Skipped without a
CUDA device (the CUDA module builds on machines without one; it cannot run there)."""
import pytest
import torch

import nf4lora as nl
from nf4lora._native import DTYPE_CODE, _C_cuda, cuda_available
from nf4lora.backends import cpu as cpu_be
from nf4lora.nf4_format import DYNAMIC_SIGNED

pytestmark = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and nf4lora._C_cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def bits(t):
    t = t.contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(a, b, what=""):
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, what
    ne = bits(a) != bits(b)
    assert not bool(ne.any()), f"{what}: {int(ne.sum())} of {a.numel()} differ"


def sizes_for(bs):
    return sorted({1, 3, 63, 65, bs - 1, bs, bs + 1, 2 * bs + 3, 3 * bs + 34, 4095, 100003})


def stream():
    return torch.cuda.current_stream().cuda_stream


@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_match_ref(dtype, bs, make_gen):
    gen = make_gen(bs)
    for n in sizes_for(bs):
        w = (torch.randn(n, generator=gen) * 3).to(dtype)
        w[: min(n, bs)] = 0 if n > 2 * bs else w[: min(n, bs)]       # an all-zero block
        p_ref, a_ref = cpu_be.quantize_nf4(w, bs, impl="ref")
        p, a = torch.ops.nf4lora.quantize_nf4(w.cuda(), bs)
        assert_bits_equal(p, p_ref, f"packed n={n}")
        assert_bits_equal(a, a_ref, f"absmax n={n}")
        off = float(a_ref.mean())
        q_ref, a2_ref = cpu_be.quantize_absmax(a_ref, off, DYNAMIC_SIGNED)
        q8, a2 = torch.ops.nf4lora.quantize_absmax(a, off, DYNAMIC_SIGNED.cuda())
        assert_bits_equal(q8, q_ref, "double-quant codes")
        assert_bits_equal(a2, a2_ref, "absmax2")
        for state_cpu in [(p_ref, a_ref, None, None, 0.0), (p_ref, q_ref, a2_ref, DYNAMIC_SIGNED, off)]:
            state_gpu = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in state_cpu)
            for odt in DTYPES:
                ref = cpu_be.dequantize_nf4(*state_cpu, bs, [n], odt, impl="ref")
                out = torch.ops.nf4lora.dequantize_nf4(*state_gpu, bs, [n], odt)
                assert_bits_equal(out, ref, f"dequant n={n} {odt}")


def test_heavy_tailed_and_extremes(make_gen):
    gen = make_gen(9)
    w = torch.randn(64 * 50, generator=gen)
    w[::97] *= 1e4
    w[0:64] *= 1e-39
    w[64:128] = 1e-44
    w[128:192] *= 3e38 / w[128:192].abs().max()
    for bs in (32, 64, 4096):
        p_ref, a_ref = cpu_be.quantize_nf4(w, bs, impl="ref")
        p, a = nl.quantize_nf4(w.cuda(), bs, double_quant=False).tensors()
        assert_bits_equal(p, p_ref)
        assert_bits_equal(a, a_ref)


def test_public_api_round_trip(make_gen):
    w = torch.randn(3, 5, 67, generator=make_gen(1), dtype=torch.bfloat16)
    for dq in (False, True):
        qc = nl.quantize_nf4(w, 64, double_quant=dq)
        qg = nl.quantize_nf4(w.cuda(), 64, double_quant=dq)
        for a, b in zip(qc.tensors(), qg.tensors()):
            assert_bits_equal(b, a)
        assert qg.offset == qc.offset
        assert_bits_equal(nl.dequantize_nf4(qg), nl.dequantize_nf4(qc))
        assert_bits_equal(nl.dequantize_nf4(qc.cuda()), nl.dequantize_nf4(qc))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_is_an_error(dtype):
    for bad in (float("nan"), float("inf")):
        w = torch.randn(1000, dtype=dtype)
        w[777] = bad
        with pytest.raises(ValueError, match="w contains NaN or Inf"):
            nl.quantize_nf4(w.cuda(), 64)


def test_poisoned_outputs_fully_written(make_gen):
    gen = make_gen(4)
    guard = 256
    for bs in (32, 64, 4096):
        for n in (1, 3, 63, 65, 2 * bs + 3, 5 * bs + 1):
            w = torch.randn(n, generator=gen).cuda()
            nb, nbytes = -(-n // bs), (n + 1) // 2
            packed = torch.full((nbytes + guard,), 0xAB, dtype=torch.uint8, device="cuda")
            absmax = torch.full((nb + guard,), float("nan"), device="cuda")
            flag = torch.zeros(1, dtype=torch.int32, device="cuda")
            _C_cuda.nf4_quantize(w.data_ptr(), 0, n, bs, packed.data_ptr(), absmax.data_ptr(),
                                 flag.data_ptr(), stream())
            p_ref, a_ref = cpu_be.quantize_nf4(w.cpu(), bs, impl="ref")
            assert_bits_equal(packed[:nbytes], p_ref)
            assert_bits_equal(absmax[:nb], a_ref)
            assert bool((packed[nbytes:] == 0xAB).all()) and bool(absmax[nb:].isnan().all())
            assert flag.item() == 0
            for odt in DTYPES:
                out = torch.full((n + guard,), float("nan"), dtype=odt, device="cuda")
                _C_cuda.nf4_dequantize(p_ref.cuda().data_ptr(), a_ref.cuda().data_ptr(), 0, 0, 0,
                                       0.0, bs, n, out.data_ptr(), DTYPE_CODE[odt], stream())
                torch.cuda.synchronize()
                ref = cpu_be.dequantize_nf4(p_ref, a_ref, None, None, 0.0, bs, [n], odt, impl="ref")
                assert_bits_equal(out[:n], ref)
                assert bool(out[n:].isnan().all())


def test_misaligned_views():
    """Kernels that vectorize must still handle buffers that are not 16-byte aligned."""
    base = torch.randn(4096 * 3 + 7, device="cuda")
    w = base[1:1 + 4096 * 3]                      # 4-byte aligned only
    p, a = torch.ops.nf4lora.quantize_nf4(w, 64)
    p_ref, a_ref = cpu_be.quantize_nf4(w.cpu(), 64, impl="ref")
    assert_bits_equal(p, p_ref)
    pbuf = torch.zeros(p.numel() + 3, dtype=torch.uint8, device="cuda")
    pbuf[3:] = p
    pv = pbuf[3:]                                 # packed at an odd address
    for odt in DTYPES:
        out = torch.ops.nf4lora.dequantize_nf4(pv, a, None, None, 0.0, 64, [w.numel()], odt)
        ref = cpu_be.dequantize_nf4(p_ref, a_ref, None, None, 0.0, 64, [w.numel()], odt, impl="ref")
        assert_bits_equal(out, ref)


def test_state_dict_round_trip_on_cuda(make_gen):
    gen = make_gen(2)
    for dq in (False, True):
        w = torch.randn(256, 320, generator=gen, dtype=torch.bfloat16)
        q = nl.quantize_nf4(w, 64, double_quant=dq)
        sd = {k: v for k, v in q.to_bnb_state_dict().items()}
        q2 = nl.NF4Tensor.from_bnb_state_dict({k: v.cuda() for k, v in sd.items()})
        assert_bits_equal(nl.dequantize_nf4(q2), nl.dequantize_nf4(q))


@pytest.mark.slow
def test_more_than_2_31_elements():
    """64-bit indexing: n > 2^31 (about 4.3 GB of bf16 in, 2.1 GB packed)."""
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 130
    if free < 16 * n:
        pytest.skip("not enough GPU memory")
    w = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    p, a = torch.ops.nf4lora.quantize_nf4(w, 64)
    tail = slice(n - 64 * 1000, n)
    p_ref, a_ref = cpu_be.quantize_nf4(w[tail].cpu(), 64, impl="ref")
    assert_bits_equal(p[(n - 64 * 1000) // 2:], p_ref)
    assert_bits_equal(a[-1000:], a_ref)
    out = torch.ops.nf4lora.dequantize_nf4(p, a, None, None, 0.0, 64, [n], torch.bfloat16)
    ref = cpu_be.dequantize_nf4(p_ref, a_ref, None, None, 0.0, 64, [64 * 1000], torch.bfloat16)
    assert_bits_equal(out[tail], ref)
