"""torch.library.opcheck on every nf4lora quantization op (schema, fake/meta kernel, dispatch,
autograd registration), with several sample inputs each."""
import pytest
import torch

import nf4lora  # noqa: F401  (registers torch.ops.nf4lora.*)
from nf4lora.nf4_format import DYNAMIC_SIGNED

ops = torch.ops.nf4lora


def _samples_quantize(gen):
    out = []
    for shape, dtype, bs in [((1,), torch.float32, 64), ((3,), torch.bfloat16, 32),
                             ((7, 33), torch.float16, 64), ((40, 96), torch.float32, 128),
                             ((2, 3, 65), torch.bfloat16, 4096), ((130,), torch.float64, 64)]:
        out.append((torch.randn(*shape, generator=gen).to(dtype), bs))
    return out


def _absmax(gen, n):
    return torch.rand(n, generator=gen) * 2 + 0.01


def test_opcheck_quantize_nf4(gen):
    for w, bs in _samples_quantize(gen):
        torch.library.opcheck(ops.quantize_nf4, (w, bs))


def test_opcheck_quantize_absmax(gen):
    for n in (1, 255, 256, 257, 1000):
        a = _absmax(gen, n)
        torch.library.opcheck(ops.quantize_absmax, (a, float(a.mean()), DYNAMIC_SIGNED))


def test_opcheck_dequantize_absmax(gen):
    for n in (1, 256, 700):
        a = _absmax(gen, n)
        q8, a2 = ops.quantize_absmax(a, float(a.mean()), DYNAMIC_SIGNED)
        torch.library.opcheck(ops.dequantize_absmax, (q8, a2, DYNAMIC_SIGNED, float(a.mean())))


@pytest.mark.parametrize("dq", [False, True])
def test_opcheck_dequantize_nf4(gen, dq):
    for shape, bs, out_dtype in [((1,), 64, torch.float32), ((3, 5), 32, torch.bfloat16),
                                 ((40, 96), 64, torch.float16), ((600, 96), 64, torch.float32),
                                 ((2, 3, 65), 128, torch.float64)]:
        w = torch.randn(*shape, generator=gen)
        q = nf4lora.quantize_nf4(w, bs, double_quant=dq)
        args = (q.packed, q.absmax, q.absmax2, q.code8, q.offset, bs, list(shape), out_dtype)
        torch.library.opcheck(ops.dequantize_nf4, args)


def test_every_quantize_op_is_covered():
    """Fails when a quantization op is added without an opcheck here."""
    covered = {"quantize_nf4", "quantize_absmax", "dequantize_absmax", "dequantize_nf4"}
    from nf4lora import _ops
    quant_ops = {name for name in getattr(_ops, "_SCHEMAS", {}) if "quant" in name}
    assert quant_ops <= covered, f"ops without opcheck: {sorted(quant_ops - covered)}"


def test_compile_fullgraph_quantize_and_dequantize(gen):
    """torch.compile(fullgraph=True) sees through the ops (fakes give shapes; no graph break)."""
    w = torch.randn(64, 96, generator=gen)
    q = nf4lora.quantize_nf4(w, 64, double_quant=True)
    deq = torch.compile(lambda q: nf4lora.dequantize_nf4(q) * 2, fullgraph=True)
    assert torch.equal(deq(q), nf4lora.dequantize_nf4(q) * 2)
    quant = torch.compile(lambda w: ops.quantize_nf4(w, 64), fullgraph=True)
    p, a = quant(w)
    assert torch.equal(p, q.packed)
