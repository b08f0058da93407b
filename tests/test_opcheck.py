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


def registry_ops():
    """Every op nf4lora registers with torch's dispatcher, read from the registry itself (a list
    filtered by name would silently shrink after a rename)."""
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("nf4lora::"))
    assert len(names) >= 13, f"the nf4lora op registry looks empty or partial: {names}"
    return names


def _linear_samples(gen):
    q = nf4lora.quantize_nf4(torch.randn(24, 64, generator=gen), 64)
    w = (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)
    x, A, B = torch.randn(5, 64, generator=gen), torch.randn(4, 64, generator=gen), torch.randn(24, 4, generator=gen)
    return w, x, A, B


def _adamw_args(bits, multi, gen):
    n = 5000
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    st = ([torch.zeros(n), torch.zeros(n)] if bits == 32 else
          [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
           torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))])
    hp = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 4096)
    return ([p], [g], *[[t] for t in st], *hp) if multi else (p, g, *st, *hp)


def _samples(name, gen):
    if name in ("quantize_nf4", "quantize_absmax", "dequantize_absmax", "dequantize_nf4"):
        a = _absmax(gen, 300)
        q = nf4lora.quantize_nf4(torch.randn(40, 96, generator=gen), 64)
        return {"quantize_nf4": (torch.randn(7, 33, generator=gen), 64),
                "quantize_absmax": (a, float(a.mean()), DYNAMIC_SIGNED),
                "dequantize_absmax": (*ops.quantize_absmax(a, float(a.mean()), DYNAMIC_SIGNED), DYNAMIC_SIGNED,
                                      float(a.mean())),
                "dequantize_nf4": (q.packed, q.absmax, q.absmax2, q.code8, q.offset, 64, [40, 96],
                                   torch.bfloat16)}[name]
    w, x, A, B = _linear_samples(gen)
    seed = torch.tensor(3)
    linear = {"nf4_linear": (x, *w, 24, torch.randn(24, generator=gen)),
              "nf4_linear_t": (torch.randn(5, 24, generator=gen), *w, 64),
              "qlora_fwd": (x, *w, 24, A, B, 0.5, None, 0.2, seed),
              "qlora_bwd_dx": (torch.randn(5, 24, generator=gen), *w, 64, torch.randn(5, 4, generator=gen), A,
                               0.5, 0.2, seed),
              "lora_grad_a": (torch.randn(5, 4, generator=gen), x, 0.5, 0.2, seed)}
    if name in linear:
        return linear[name]
    if name == "multi_lora_linear":  # more samples in tests/test_multi_lora.py
        pool_A, pool_B = torch.randn(3, 4, 64, generator=gen), torch.randn(3, 24, 4, generator=gen)
        return (x, *w, 24, pool_A, pool_B, torch.tensor([0, -1, 2, 0, 1]), torch.rand(3, generator=gen),
                None, 0)
    optim = {"adamw_step": (32, False), "adamw8bit_step": (8, False), "adamw_step_multi": (32, True),
             "adamw8bit_step_multi": (8, True)}
    if name in optim:
        return _adamw_args(*optim[name], gen)
    return None


@pytest.mark.parametrize("name", registry_ops())
def test_every_registered_op_passes_opcheck(name, gen):
    """Every op in the registry has a sample here and passes torch.library.opcheck on it (the
    quantization ops have more samples above, the linear and optimizer ops in their own files)."""
    args = _samples(name, gen)
    assert args is not None, f"nf4lora::{name} is registered but has no opcheck sample"
    torch.library.opcheck(getattr(ops, name), args)


def test_compile_fullgraph_quantize_and_dequantize(gen):
    """torch.compile(fullgraph=True) sees through the ops (fakes give shapes; no graph break)."""
    w = torch.randn(64, 96, generator=gen)
    q = nf4lora.quantize_nf4(w, 64, double_quant=True)
    deq = torch.compile(lambda q: nf4lora.dequantize_nf4(q) * 2, fullgraph=True)
    assert torch.equal(deq(q), nf4lora.dequantize_nf4(q) * 2)
    quant = torch.compile(lambda w: ops.quantize_nf4(w, 64), fullgraph=True)
    p, a = quant(w)
    assert torch.equal(p, q.packed)
