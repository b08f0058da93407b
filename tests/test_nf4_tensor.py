"""NF4Tensor as a torch.Tensor subclass: what transformers, PEFT, torch.compile and the usual model
plumbing see and do (shape, dtype, to, deepcopy, save/load, compile), the ops FSDP2 uses, and a
clear error for everything else."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import nf4lora as nl
from model_utils import tiny_llama, tokens
from numerics import rel_err


def _q(shape=(64, 128), dtype=torch.float32, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nl.quantize_nf4(torch.randn(shape, generator=g).to(dtype), double_quant=double_quant)


def _qmodel(seed=0):
    m = tiny_llama(seed=seed)
    nl.apply_qlora(m, "all-linear", r=4, init_lora_weights=False)
    return m


def _same_codes(a, b):
    return (a.shape == b.shape and a.blocksize == b.blocksize and a.offset == b.offset
            and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_dtype_device_are_the_logical_weights(dtype):
    q = _q((48, 96), dtype)
    assert isinstance(q, torch.Tensor) and q.shape == (48, 96) and q.dtype == dtype
    assert q.device.type == "cpu" and q.numel() == 48 * 96 and q.dim() == 2
    assert not q.requires_grad
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 48 * 96 // 2
    assert "NF4Tensor(shape=(48, 96)" in repr(q)


def test_model_weights_as_transformers_and_peft_see_them():
    m = _qmodel()
    layer = m.model.layers[0].mlp.up_proj
    assert isinstance(layer.weight, torch.nn.Parameter) and isinstance(layer.weight, nl.NF4Tensor)
    assert layer.weight.shape == (layer.out_features, layer.in_features) == (128, 64)
    assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
    # transformers: the model's dtype and parameter count read the logical weights
    assert m.dtype == torch.float32
    dense = tiny_llama()
    assert m.num_parameters(only_trainable=False) == dense.num_parameters() + sum(
        p.numel() for n, p in m.named_parameters() if "lora_" in n)
    # PEFT's count of trainable parameters: the adapters only
    from peft.peft_model import PeftModel
    trainable, total = PeftModel.get_nb_trainable_parameters(type("M", (), {"named_parameters": m.named_parameters})())
    assert trainable == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert total == m.num_parameters(only_trainable=False)


def test_f_linear_runs_the_fused_op(gen):
    q = _q()
    x, b = torch.randn(5, 128, generator=gen), torch.randn(64, generator=gen)
    assert torch.equal(F.linear(x, q, b), nl.nf4_linear(x, q, b))
    assert torch.equal(F.linear(x, q), nl.nf4_linear(x, q))


def test_model_to_dtype_changes_the_compute_dtype_not_the_codes():
    m = _qmodel()
    ids = tokens()
    before = {n: mod.weight.detach() for n, mod in m.named_modules() if isinstance(mod, nl.QLoRALinear)}
    want = m(ids).logits
    m.to(torch.bfloat16)
    for n, mod in m.named_modules():
        if isinstance(mod, nl.QLoRALinear):
            assert mod.weight.dtype == torch.bfloat16 and isinstance(mod.weight, torch.nn.Parameter)
            assert all(torch.equal(a, b) for a, b in zip(mod.weight.tensors(), before[n].tensors()))
    got = m(ids).logits
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), want) < 0.05
    with pytest.raises(ValueError, match="compute dtype"):
        m.model.layers[0].mlp.up_proj.weight.to(torch.float64)


def test_deepcopy_is_independent_and_equal():
    m = _qmodel()
    ids = tokens()
    c = copy.deepcopy(m)
    assert torch.equal(c(ids).logits, m(ids).logits)
    wc, wm = c.model.layers[0].mlp.up_proj.weight, m.model.layers[0].mlp.up_proj.weight
    assert isinstance(wc, nl.NF4Tensor) and _same_codes(wc, wm)
    assert wc.packed.data_ptr() != wm.packed.data_ptr()
    with torch.no_grad():
        wc.packed.zero_()
    assert not torch.equal(wc.packed, wm.packed)


def test_state_dict_save_load_weights_only():
    m = _qmodel(seed=0)
    sd = m.state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert sd[key].dtype == torch.uint8 and tuple(sd[key].shape) == (128 * 64 // 2, 1)  # bitsandbytes
    assert key + ".quant_state.bitsandbytes__nf4" in sd and key + ".nested_absmax" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = _qmodel(seed=5)
    fresh.load_state_dict(loaded)
    ids = tokens()
    assert torch.equal(fresh(ids).logits, m(ids).logits)


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    layers = torch.nn.Sequential(
        nl.QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, init_lora_weights=False),
        torch.nn.GELU(),
        nl.QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, init_lora_weights=False))
    x = torch.randn(6, 128, generator=gen)
    want = layers(x)
    want.square().sum().backward()
    grads = [p.grad.clone() for p in layers.parameters() if p.requires_grad]
    layers.zero_grad()
    compiled = torch.compile(layers, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.square().sum().backward()
    assert torch.equal(got, want)
    for p, g in zip([p for p in layers.parameters() if p.requires_grad], grads):
        assert rel_err(p.grad, g) < 1e-6


def test_ops_fsdp2_uses_keep_the_bytes():
    q = _q((64, 128))
    top, bottom = torch.chunk(q, 2)
    assert top.shape == bottom.shape == (32, 128)
    assert torch.equal(bottom.packed, q.packed[32 * 64:]) and torch.equal(bottom.absmax, q.absmax[64:])
    padded = q.new_zeros(top.shape)
    padded.narrow(0, 0, 32).copy_(bottom)  # writes through the row view
    assert torch.equal(padded.packed, bottom.packed) and torch.equal(padded.absmax, bottom.absmax)
    flat = q.view(-1)
    back = torch.as_strided(flat, (64, 128), (128, 1), 0)
    assert flat.shape == (64 * 128,) and _same_codes(back, q)
    assert _same_codes(q.clone(), q) and q.clone().packed.data_ptr() != q.packed.data_ptr()
    assert _same_codes(q.detach(), q)


def test_a_row_shard_computes_correctly_or_is_refused(gen):
    # a 2-row weight of 8192 codes per row: 128 blocks per row, 256 per nested block
    q = _q((4, 8192))
    halves = torch.chunk(q, 2)
    x = torch.randn(3, 8192, generator=gen)
    with pytest.raises(ValueError, match="absmax2"):  # its nested scales index from the weight's start
        nl.nf4_linear(x, halves[1])
    small = _q((8, 64))  # one nested block: every shard's scales are its own
    for i, part in enumerate(torch.chunk(small, 2)):
        assert torch.equal(nl.nf4_linear(x[:, :64], part), nl.nf4_linear(x[:, :64], small)[:, 4 * i:4 * i + 4])


def test_unsupported_ops_raise_clearly():
    q = _q()
    with pytest.raises(NotImplementedError, match="NF4Tensor does not support aten.add"):
        q + 1
    with pytest.raises(NotImplementedError, match="dequantize"):
        torch.sum(q)
    with pytest.raises(TypeError, match="quantize_nf4"):
        q.copy_(torch.zeros(64, 128))
    with pytest.raises(ValueError, match="whole quantization blocks"):
        torch.split(_q((64, 96)), [1, 63])
    with pytest.raises(ValueError, match="equal parts"):
        torch.split(_q((6, 128)), 4)
    with pytest.raises(ValueError, match="dim 0"):
        torch.chunk(q, 2, dim=1)
    with pytest.raises(ValueError, match="different layouts"):
        q.copy_(_q((64, 128), double_quant=False))


def test_bnb_layout_is_read_from_sizes_alone(gen):
    """read_bnb_layout (what a sharded state-dict load checks the whole weight's keys with) measures
    the codes and block scales without reading them: meta tensors of a 70B-sized layer pass, the
    same checks as a real load reject wrong sizes."""
    from nf4lora.nf4 import read_bnb_layout
    q = nl.quantize_nf4(torch.randn(256, 128, generator=gen))
    sd = q.to_bnb_state_dict("w")
    small = read_bnb_layout(sd, "w")
    assert small.shape == [256, 128] and small.double_quant and small.blocksize == 64
    assert torch.equal(small.absmax2, q.absmax2) and small.offset == q.offset
    N, K = 28672, 8192  # a 70B MLP projection: 117 MB of codes, never allocated here
    big = nl.quantize_nf4(torch.randn(16384 * 4, generator=gen).reshape(256, 256))
    meta = big.to_bnb_state_dict("w")
    import json
    info = json.loads(bytes(meta["w.quant_state.bitsandbytes__nf4"].tolist()).decode())
    info["shape"] = [N, K]
    meta["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    nb = N * K // 64
    meta["w"] = torch.empty(N * K // 2, 1, dtype=torch.uint8, device="meta")
    meta["w.absmax"] = torch.empty(nb, dtype=torch.uint8, device="meta")
    meta["w.nested_absmax"] = torch.ones(-(-nb // 256))
    assert read_bnb_layout(meta, "w").shape == [N, K]
    meta["w.absmax"] = torch.empty(nb - 1, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="absmax' must have"):
        read_bnb_layout(meta, "w")
