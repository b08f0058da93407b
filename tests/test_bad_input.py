"""Bad input: every case is a ValueError / TypeError / KeyError whose message names the argument or
state-dict key, raised before a kernel could read out of bounds (DESIGN.md "The kernel ABI",
"NF4 format": loading validates every length, dtype, blocksize and shape first)."""
import json
import re

import pytest
import torch

import nf4lora as nl
from nf4lora import NF4Tensor
from nf4lora.nf4_format import DYNAMIC_SIGNED

ops = torch.ops.nf4lora


def raises(exc, *names):
    """pytest.raises(exc) whose message must mention every name given."""
    pattern = "".join(f"(?=.*{re.escape(n)})" for n in names)
    return pytest.raises(exc, match=re.compile(pattern, re.S))


@pytest.fixture
def w(gen):
    return torch.randn(40, 96, generator=gen)


# ============================================================================= quantize_nf4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pos", [0, 63, 64, 3839])
def test_quantize_non_finite(w, dtype, bad, pos):
    x = w.to(dtype).reshape(-1).clone()
    x[pos] = bad
    for dq in (False, True):
        with raises(ValueError, "w", "NaN or Inf"):
            nl.quantize_nf4(x.reshape(40, 96), 64, double_quant=dq)
    with raises(ValueError, "w", "NaN or Inf"):
        ops.quantize_nf4(x, 64)


def test_quantize_non_finite_partial_block_and_scalar_path(w):
    from nf4lora._native import _C
    x = w.reshape(-1)[:100].clone()
    x[99] = float("nan")       # in the partial last block (scalar code path)
    with raises(ValueError, "w", "NaN or Inf"):
        nl.quantize_nf4(x, 64)
    x = w.reshape(-1).clone()
    x[5] = float("inf")
    _C.set_force_scalar(True)
    try:
        with raises(ValueError, "w", "NaN or Inf"):
            nl.quantize_nf4(x, 64)
    finally:
        _C.set_force_scalar(False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64, torch.int8])
def test_quantize_wrong_dtype(w, dtype):
    with raises(ValueError, "w", "dtype"):
        nl.quantize_nf4(w.to(dtype), 64)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64])
def test_quantize_op_wrong_dtype(w, dtype):
    with raises(ValueError, "w", "dtype"):
        ops.quantize_nf4(w.to(dtype), 64)


def test_quantize_not_a_tensor():
    with raises(TypeError, "w"):
        nl.quantize_nf4([1.0, 2.0], 64)
    with raises(TypeError, "w"):
        nl.quantize_nf4(None, 64)


def test_quantize_non_contiguous(w):
    with raises(ValueError, "w", "contiguous"):
        nl.quantize_nf4(w.t(), 64)
    with raises(ValueError, "w", "contiguous"):
        nl.quantize_nf4(w[:, ::2], 64)


@pytest.mark.parametrize("shape", [(0,), (0, 64), (64, 0), (3, 0, 5)])
def test_quantize_empty(shape):
    with raises(ValueError, "w", "empty"):
        nl.quantize_nf4(torch.empty(shape), 64)
    with raises(ValueError, "w", "empty"):
        ops.quantize_nf4(torch.empty(shape), 64)


@pytest.mark.parametrize("bs", [0, 1, 16, 31, 48, 100, 8192, -64, 1 << 40])
def test_quantize_bad_blocksize(w, bs):
    with raises(ValueError, "blocksize", str(bs)):
        nl.quantize_nf4(w, bs)
    with raises(ValueError, "blocksize"):
        ops.quantize_nf4(w, bs)


@pytest.mark.parametrize("bs", [64.0, "64", None, True])
def test_quantize_blocksize_type(w, bs):
    with raises(TypeError, "blocksize"):
        nl.quantize_nf4(w, bs)


@pytest.mark.parametrize("dq", [1, "yes", None])
def test_quantize_double_quant_type(w, dq):
    with raises(TypeError, "double_quant"):
        nl.quantize_nf4(w, 64, double_quant=dq)


# ============================================================================= dequantize_nf4
def test_dequantize_bad_arguments(w):
    q = nl.quantize_nf4(w, 64)
    with raises(TypeError, "q", "NF4Tensor"):
        nl.dequantize_nf4(w)
    with raises(TypeError, "q"):
        nl.dequantize_nf4(q.to_bnb_state_dict())
    for dt in (torch.int32, torch.uint8, "float32", torch.complex64):
        with raises(ValueError, "dtype"):
            nl.dequantize_nf4(q, dt)


# ============================================================================= NF4Tensor constructor
def test_nf4tensor_constructor_checks(w):
    q = nl.quantize_nf4(w, 64, double_quant=True)
    with raises(ValueError, "absmax2", "code8"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64, absmax2=q.absmax2)
    with raises(ValueError, "dtype"):
        NF4Tensor(q.packed, q.absmax, q.shape, torch.int8, 64, q.absmax2, q.code8, q.offset)
    with raises(ValueError, "blocksize"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 48, q.absmax2, q.code8, q.offset)
    with raises(ValueError, "offset"):
        NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64, q.absmax2, q.code8, float("nan"))
    with raises(ValueError, "packed"):
        NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, 64, q.absmax2, q.code8, q.offset)
    with raises(ValueError, "absmax"):
        NF4Tensor(q.packed, q.absmax[:-1], q.shape, q.dtype, 64, q.absmax2, q.code8, q.offset)
    with raises(ValueError, "shape"):
        NF4Tensor(q.packed, q.absmax, (41, 96), q.dtype, 64, q.absmax2, q.code8, q.offset)
    with raises(TypeError, "packed"):
        NF4Tensor(q.packed.tolist(), q.absmax, q.shape, q.dtype, 64)


# ============================================================================= from_bnb_state_dict
@pytest.fixture(params=[False, True], ids=["plain", "nested"])
def sd(request, w):
    return nl.quantize_nf4(w, 64, double_quant=request.param).to_bnb_state_dict("weight")


QS = "weight.quant_state.bitsandbytes__nf4"


def meta_of(sd):
    return json.loads(bytes(sd[QS].tolist()).decode())


def with_meta(sd, **changes):
    meta = meta_of(sd)
    for k, v in changes.items():
        if v is KeyError:
            meta.pop(k, None)
        else:
            meta[k] = v
    out = dict(sd)
    out[QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def load(sd):
    return NF4Tensor.from_bnb_state_dict(sd, prefix="weight")


def test_state_dict_valid_loads(sd, w):
    q = load(sd)
    assert tuple(q.shape) == (40, 96)


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", QS])
def test_state_dict_missing_key(sd, key):
    bad = {k: v for k, v in sd.items() if k != key}
    with raises(KeyError, key):
        load(bad)


def test_state_dict_missing_nested_key(w):
    sd = nl.quantize_nf4(w, 64, double_quant=True).to_bnb_state_dict()
    bad = {k: v for k, v in sd.items() if k != "weight.nested_quant_map"}
    with raises(KeyError, "weight.nested_quant_map"):
        load(bad)
    # nested metadata without nested tensors is inconsistent
    plain = nl.quantize_nf4(w, 64, double_quant=False).to_bnb_state_dict()
    bad = dict(plain)
    bad["weight.nested_quant_map"] = DYNAMIC_SIGNED.clone()
    with raises((KeyError, ValueError), "weight.nested_absmax"):
        load(bad)


def test_state_dict_wrong_prefix(sd):
    with raises(KeyError, "layer.weight"):
        NF4Tensor.from_bnb_state_dict(sd, prefix="layer.weight")


def test_state_dict_truncated_absmax(sd):
    for cut in (1, 10, sd["weight.absmax"].numel()):
        bad = dict(sd)
        bad["weight.absmax"] = sd["weight.absmax"][:-cut]
        with raises(ValueError, "weight.absmax"):
            load(bad)
    bad = dict(sd)
    bad["weight.absmax"] = torch.cat([sd["weight.absmax"], sd["weight.absmax"][:1]])
    with raises(ValueError, "weight.absmax"):
        load(bad)


def test_state_dict_truncated_packed(sd):
    for cut in (1, 100, sd["weight"].numel() - 1):
        bad = dict(sd)
        bad["weight"] = sd["weight"][:-cut]
        with raises(ValueError, "'weight'", "packed"):
            load(bad)


@pytest.mark.parametrize("n", [0, 15, 17, 256])
def test_state_dict_quant_map_wrong_length(sd, n):
    bad = dict(sd)
    bad["weight.quant_map"] = torch.linspace(-1, 1, n)
    with raises(ValueError, "weight.quant_map"):
        load(bad)


def test_state_dict_quant_map_wrong_values(sd):
    bad = dict(sd)
    bad["weight.quant_map"] = torch.linspace(-1, 1, 16)    # FP4-like table: not NF4
    with raises(ValueError, "weight.quant_map"):
        load(bad)
    bad["weight.quant_map"] = sd["weight.quant_map"].double()
    with raises(ValueError, "weight.quant_map"):
        load(bad)


@pytest.mark.parametrize("shape", [[40, 97], [41, 96], [3841], [40, 96, 2], [40, 95]])
def test_state_dict_shape_numel_mismatch(sd, shape):
    with raises(ValueError, "'weight'"):
        load(with_meta(sd, shape=shape))


@pytest.mark.parametrize("shape", [[], [0, 96], [-40, -96], [40.0, 96], "40x96", None, [True, 96],
                                   [40, "96"], {"a": 1}])
def test_state_dict_bad_shape_value(sd, shape):
    with raises(ValueError, QS, "shape"):
        load(with_meta(sd, shape=shape))


@pytest.mark.parametrize("dtype", ["float64", "int8", "torch.float32", "Float32", "", None, 32,
                                   "__class__", "uint8"])
def test_state_dict_unknown_dtype_string(sd, dtype):
    with raises(ValueError, QS, "dtype"):
        load(with_meta(sd, dtype=dtype))


@pytest.mark.parametrize("field", ["dtype", "shape", "blocksize", "quant_type"])
def test_state_dict_missing_meta_field(sd, field):
    with raises((ValueError, KeyError), QS, field):
        load(with_meta(sd, **{field: KeyError}))


@pytest.mark.parametrize("bs", [0, 48, 8192, -64, "64", 64.5, None, True])
def test_state_dict_bad_blocksize(sd, bs):
    with raises(ValueError, QS, "blocksize"):
        load(with_meta(sd, blocksize=bs))


def test_state_dict_blocksize_inconsistent_with_absmax(sd):
    # a valid blocksize that disagrees with the stored absmax length
    with raises(ValueError, "weight.absmax"):
        load(with_meta(sd, blocksize=128))


@pytest.mark.parametrize("qt", ["fp4", "int4", None, 4])
def test_state_dict_quant_type(sd, qt):
    with raises(ValueError, QS, "quant_type"):
        load(with_meta(sd, quant_type=qt))


def test_state_dict_fp4_key(sd):
    bad = {k: v for k, v in sd.items() if k != QS}
    bad["weight.quant_state.bitsandbytes__fp4"] = sd[QS]
    with raises(ValueError, "FP4"):
        load(bad)


@pytest.mark.parametrize("payload", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[1, 2]", b"null",
                                     b'"nf4"', b"42"])
def test_state_dict_garbage_json(sd, payload):
    bad = dict(sd)
    bad[QS] = torch.tensor(list(payload), dtype=torch.uint8)
    with raises(ValueError, QS):
        load(bad)


def test_state_dict_quant_state_not_bytes(sd):
    bad = dict(sd)
    bad[QS] = torch.tensor([1.5, 2.5])
    with raises(ValueError, QS):
        load(bad)
    bad[QS] = "{}"
    with raises(ValueError, QS):
        load(bad)


def test_state_dict_value_not_tensor(sd):
    for key in ("weight", "weight.absmax", "weight.quant_map"):
        bad = dict(sd)
        bad[key] = sd[key].tolist()
        with raises(ValueError, key):
            load(bad)


def test_state_dict_wrong_tensor_dtypes(sd):
    nested = "weight.nested_absmax" in sd
    bad = dict(sd)
    bad["weight"] = sd["weight"].view(torch.int8)
    with raises(ValueError, "'weight'"):
        load(bad)
    bad = dict(sd)
    bad["weight"] = torch.zeros(sd["weight"].numel() // 2, 1, dtype=torch.bfloat16)  # quant_storage
    with raises(ValueError, "'weight'"):
        load(bad)
    bad = dict(sd)
    bad["weight.absmax"] = sd["weight.absmax"].float() if nested else sd["weight.absmax"].half()
    with raises(ValueError, "weight.absmax"):
        load(bad)


def test_state_dict_non_finite_absmax(w):
    sd = nl.quantize_nf4(w, 64, double_quant=False).to_bnb_state_dict()
    bad = dict(sd)
    a = sd["weight.absmax"].clone()
    a[3] = float("nan")
    bad["weight.absmax"] = a
    with raises(ValueError, "weight.absmax", "NaN"):
        load(bad)


def test_state_dict_absmax_wrong_rank(w):
    sd = nl.quantize_nf4(w, 64, double_quant=False).to_bnb_state_dict()
    bad = dict(sd)
    bad["weight.absmax"] = sd["weight.absmax"].reshape(6, 10)
    with raises(ValueError, "weight.absmax"):
        load(bad)


def nested_sd(gen, rows=600):
    # 600 x 96 / 64 = 900 blocks -> 4 nested blocks
    w = torch.randn(rows, 96, generator=gen)
    return nl.quantize_nf4(w, 64, double_quant=True).to_bnb_state_dict()


def test_state_dict_wrong_nested_sizes(gen):
    sd = nested_sd(gen)
    assert sd["weight.nested_absmax"].numel() == 4
    for t in (sd["weight.nested_absmax"][:-1], sd["weight.nested_absmax"][:0],
              torch.cat([sd["weight.nested_absmax"], sd["weight.nested_absmax"]])):
        bad = dict(sd)
        bad["weight.nested_absmax"] = t
        with raises(ValueError, "weight.nested_absmax"):
            load(bad)
    for n in (0, 255, 257, 16):
        bad = dict(sd)
        bad["weight.nested_quant_map"] = torch.linspace(-1, 1, n)
        with raises(ValueError, "weight.nested_quant_map"):
            load(bad)
    bad = dict(sd)
    bad["weight.nested_absmax"] = sd["weight.nested_absmax"].half()
    with raises(ValueError, "weight.nested_absmax"):
        load(bad)
    bad = dict(sd)
    bad["weight.nested_quant_map"] = sd["weight.nested_quant_map"].double()
    with raises(ValueError, "weight.nested_quant_map"):
        load(bad)


def test_state_dict_bad_nested_meta(gen):
    sd = nested_sd(gen)
    for field, value in [("nested_blocksize", 128), ("nested_blocksize", None),
                         ("nested_dtype", "float16"), ("nested_offset", None),
                         ("nested_offset", "0.1"), ("nested_offset", float("nan")),
                         ("nested_offset", True), ("nested_offset", KeyError)]:
        with raises(ValueError, QS, field):
            load(with_meta(sd, **{field: value}))


def test_state_dict_non_finite_nested(gen):
    sd = nested_sd(gen)
    for key in ("weight.nested_absmax", "weight.nested_quant_map"):
        bad = dict(sd)
        t = sd[key].clone()
        t[0] = float("inf")
        bad[key] = t
        with raises(ValueError, key):
            load(bad)


# ============================================================================= raw ops
def state(gen, dq, shape=(40, 96), bs=64):
    q = nl.quantize_nf4(torch.randn(*shape, generator=gen), bs, double_quant=dq)
    return q


def test_op_dequantize_inconsistent_tensors(gen):
    q = state(gen, False)
    args = dict(packed=q.packed, absmax=q.absmax, absmax2=None, code8=None, offset=0.0,
                blocksize=64, shape=[40, 96], dtype=torch.float32)

    def call(**kw):
        a = dict(args)
        a.update(kw)
        return ops.dequantize_nf4(a["packed"], a["absmax"], a["absmax2"], a["code8"], a["offset"],
                                  a["blocksize"], a["shape"], a["dtype"])

    call()
    with raises(ValueError, "packed"):
        call(packed=q.packed[:-1])
    with raises(ValueError, "packed"):
        call(packed=q.packed.view(torch.int8))
    with raises(ValueError, "absmax"):
        call(absmax=q.absmax[:-1])
    with raises(ValueError, "absmax"):
        call(absmax=q.absmax.double())
    with raises(ValueError, "absmax"):
        call(absmax=q.absmax.to(torch.uint8))   # codes without absmax2/code8
    with raises(ValueError, "shape"):
        call(shape=[41, 96])
    with raises(ValueError, "shape"):
        call(shape=[0, 96])
    with raises(ValueError, "shape"):
        call(shape=[-40, -96])
    with raises(ValueError, "blocksize"):
        call(blocksize=48)
    with raises(ValueError, "blocksize"):
        call(blocksize=0)
    with raises(ValueError, "dtype"):
        call(dtype=torch.int32)
    with raises(ValueError, "packed", "contiguous"):
        call(packed=torch.stack([q.packed, q.packed], 1)[:, 0])
    with raises(ValueError, "absmax", "contiguous"):
        call(absmax=torch.stack([q.absmax, q.absmax], 1)[:, 0])
    with raises(ValueError, "absmax2"):
        call(absmax2=torch.ones(1))        # absmax2 without code8


def test_op_dequantize_inconsistent_nested(gen):
    q = state(gen, True, shape=(600, 96))
    base = (q.packed, q.absmax, q.absmax2, q.code8, q.offset, 64, [600, 96], torch.bfloat16)
    ops.dequantize_nf4(*base)

    def call(i, v):
        a = list(base)
        a[i] = v
        return ops.dequantize_nf4(*a)

    with raises(ValueError, "absmax2"):
        call(2, q.absmax2[:-1])
    with raises(ValueError, "absmax2"):
        call(2, q.absmax2.half())
    with raises(ValueError, "code8"):
        call(3, q.code8[:255])
    with raises(ValueError, "code8"):
        call(3, None)
    with raises(ValueError, "code8"):
        call(3, q.code8.double())
    with raises(ValueError, "absmax"):
        call(1, q.absmax[:-1])
    with raises(ValueError, "absmax"):
        call(1, q.absmax.float())
    with raises(ValueError, "offset"):
        call(4, float("nan"))
    with raises(ValueError, "offset"):
        call(4, float("inf"))


def test_op_quantize_absmax_bad(gen):
    a = torch.rand(300, generator=gen)
    ops.quantize_absmax(a, 0.5, DYNAMIC_SIGNED)
    with raises(ValueError, "code8"):
        ops.quantize_absmax(a, 0.5, DYNAMIC_SIGNED[:100])
    with raises(ValueError, "code8"):
        ops.quantize_absmax(a, 0.5, DYNAMIC_SIGNED.double())
    with raises(ValueError, "absmax"):
        ops.quantize_absmax(a[:0], 0.5, DYNAMIC_SIGNED)
    with raises(ValueError, "absmax"):
        ops.quantize_absmax(a.to(torch.uint8), 0.5, DYNAMIC_SIGNED)
    with raises(ValueError, "absmax", "NaN or Inf"):
        ops.quantize_absmax(torch.tensor([1.0, float("nan")]), 0.5, DYNAMIC_SIGNED)
    with raises(ValueError, "offset"):
        ops.quantize_absmax(a, float("nan"), DYNAMIC_SIGNED)


def test_op_dequantize_absmax_bad(gen):
    a = torch.rand(600, generator=gen)
    q8, a2 = ops.quantize_absmax(a, 0.5, DYNAMIC_SIGNED)
    ops.dequantize_absmax(q8, a2, DYNAMIC_SIGNED, 0.5)
    with raises(ValueError, "absmax2"):
        ops.dequantize_absmax(q8, a2[:-1], DYNAMIC_SIGNED, 0.5)
    with raises(ValueError, "absmax2"):
        ops.dequantize_absmax(q8, a2.double(), DYNAMIC_SIGNED, 0.5)
    with raises(ValueError, "code8"):
        ops.dequantize_absmax(q8, a2, DYNAMIC_SIGNED[:16], 0.5)
    with raises(ValueError, "qabsmax"):
        ops.dequantize_absmax(q8.float(), a2, DYNAMIC_SIGNED, 0.5)
    with raises(ValueError, "qabsmax"):
        ops.dequantize_absmax(q8[:0], a2[:0], DYNAMIC_SIGNED, 0.5)
    with raises(ValueError, "offset"):
        ops.dequantize_absmax(q8, a2, DYNAMIC_SIGNED, float("inf"))


def test_native_module_rejects_bad_sizes():
    """The C++ launchers check their own arguments too (status -> ValueError), before any read."""
    from nf4lora._native import _C
    buf = torch.zeros(64)
    out = torch.zeros(64, dtype=torch.uint8)
    am = torch.zeros(4)
    for impl in ("fast", "ref"):
        with raises(ValueError, "nf4_quantize", "blocksize"):
            _C.nf4_quantize(buf.data_ptr(), 0, 64, 48, out.data_ptr(), am.data_ptr(), impl)
        with raises(ValueError, "nf4_quantize", "size"):
            _C.nf4_quantize(buf.data_ptr(), 0, 0, 64, out.data_ptr(), am.data_ptr(), impl)
        with raises(ValueError, "nf4_quantize", "size"):
            _C.nf4_quantize(buf.data_ptr(), 0, -5, 64, out.data_ptr(), am.data_ptr(), impl)
        with raises(ValueError, "nf4_quantize", "null"):
            _C.nf4_quantize(0, 0, 64, 64, out.data_ptr(), am.data_ptr(), impl)
        with raises(ValueError, "dtype"):
            _C.nf4_quantize(buf.data_ptr(), 7, 64, 64, out.data_ptr(), am.data_ptr(), impl)
        with raises(ValueError, "nf4_dequantize", "null"):
            _C.nf4_dequantize(out.data_ptr(), 0, 0, 0, 0, 0.0, 64, 64, buf.data_ptr(), 0, impl)
        with raises(ValueError, "nf4_dequantize", "null"):   # nested without absmax2/code8
            _C.nf4_dequantize(out.data_ptr(), 0, out.data_ptr(), 0, 0, 0.0, 64, 64,
                              buf.data_ptr(), 0, impl)
    # the fused linear's LoRA side (nf4lora/epilogue.h LinearEpilogue::check)
    q = nl.quantize_nf4(torch.randn(8, 64), double_quant=False)
    state = (q.packed.data_ptr(), q.absmax.data_ptr(), 0, 0, 0, 0.0, 64, 8, 64)
    x, y, u, A = torch.randn(2, 64), torch.empty(2, 8), torch.empty(2, 4), torch.randn(4, 64)
    B, g, dx = torch.randn(8, 4), torch.randn(2, 4), torch.empty(2, 64)
    for impl in ("fast", "ref"):
        with raises(ValueError, "qlora_forward", "size"):       # negative rank
            _C.qlora_forward(x.data_ptr(), 0, 2, *state, 0, A.data_ptr(), B.data_ptr(), -1, 1.0,
                             0.0, 0, y.data_ptr(), u.data_ptr(), impl)
        with raises(ValueError, "qlora_forward", "null"):       # rank without u to write
            _C.qlora_forward(x.data_ptr(), 0, 2, *state, 0, A.data_ptr(), B.data_ptr(), 4, 1.0,
                             0.0, 0, y.data_ptr(), 0, impl)
        with raises(ValueError, "qlora_forward", "null"):       # rank without lora_A
            _C.qlora_forward(x.data_ptr(), 0, 2, *state, 0, 0, B.data_ptr(), 4, 1.0, 0.0, 0,
                             y.data_ptr(), u.data_ptr(), impl)
        with raises(ValueError, "qlora_backward_dx", "null"):   # rank without g
            _C.qlora_backward_dx(y.data_ptr(), 0, 2, *state, A.data_ptr(), 4, 1.0, 0.0, 0, 0,
                                 dx.data_ptr(), impl)
    with raises(ValueError, "impl"):
        _C.nf4_quantize(buf.data_ptr(), 0, 64, 64, out.data_ptr(), am.data_ptr(), "avx512")
    with raises(ValueError, "absmax_quantize", "size"):
        _C.absmax_quantize(am.data_ptr(), 0, 0.0, DYNAMIC_SIGNED.data_ptr(), out.data_ptr(),
                           am.data_ptr())
    with raises(ValueError, "absmax_dequantize", "null"):
        _C.absmax_dequantize(out.data_ptr(), 0, DYNAMIC_SIGNED.data_ptr(), 0.0, 4, am.data_ptr())


def test_state_checked_once_then_again_when_its_tensors_change(gen):
    """Validation once: a weight's state is checked when built and trusted per call; a state whose
    tensors were swapped or resized afterwards is checked again, never read out of bounds."""
    q = nl.quantize_nf4(torch.randn(64, 128, generator=gen))
    x = torch.randn(2, 128, generator=gen)
    want = nl.nf4_linear(x, q)
    assert torch.equal(nl.nf4_linear(x, q), want)  # trusted path, same answer
    q.absmax = q.absmax[:-1].clone()               # swapped for a too-short one
    with pytest.raises(ValueError, match="absmax"):
        nl.nf4_linear(x, q)
    q2 = nl.quantize_nf4(torch.randn(64, 128, generator=gen), double_quant=False)
    nl.nf4_linear(x, q2)
    q2.packed.resize_(10)                          # resized in place after it was trusted
    with pytest.raises(ValueError, match="packed"):
        nl.nf4_linear(x, q2)
