"""Fuzzing the loaders with hypothesis: malformed bitsandbytes state dicts (NF4Tensor.from_bnb_state_dict,
load_bnb_state_dict, load_bnb_checkpoint), adapter directories (load_adapter: adapter_config.json
and adapter_model.safetensors) and optimizer / training state (PagedAdamW.load_state_dict,
load_training_state). A valid object is written, then one thing in it is broken: a key dropped or
added, a tensor of the wrong dtype, length or shape, NaN/Inf, a huge declared size, a truncated or
corrupted file, a JSON field of the wrong type or value. Each case runs in a forked worker
(tests/fuzz_utils.py): it must load exactly what the file holds (when the change is harmless) or
raise a Python exception that names the problem."""
import copy
import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import nf4lora as nl
from fuzz_utils import check_case, fuzz_settings
from model_utils import tiny_llama, tokens

QS = "quant_state.bitsandbytes__nf4"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- bitsandbytes state dicts
JSON_BAD = {
    "blocksize": ["64", 64.5, 0, 48, -64, None, True, 2**40, [64]],
    "shape": [[], [0], [-1], "[]", [2**31, 2**31], [2**62], [2.5], None, [True], {"a": 1}],
    "dtype": ["int8", "float64", 5, None, "torch.float32", "__class__", ""],
    "quant_type": ["fp4", None, 4, "NF4"],
    "nested_offset": [float("nan"), float("inf"), "0.1", None, [0.1]],
    "nested_blocksize": [128, "256", None, 0],
    "nested_dtype": ["float16", 32, None],
}
JSON_WHOLE = [b"[]", b"null", b"{", b"\xff\xfe", b"", b'"nf4"', b'{"quant_type": "nf4"}', b"1e999", b"[" * 100_000]


def _bnb_base(draw):
    shape = draw(st.lists(st.sampled_from([1, 2, 3, 31, 64, 65, 100, 257]), min_size=1, max_size=3))
    bs = draw(st.sampled_from([32, 64, 128, 256, 4096]))
    dq = draw(st.booleans())
    w = torch.randn(*shape, generator=_gen(draw(st.integers(0, 1000))))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return nl.quantize_nf4(w.to(dtype), bs, double_quant=dq)


@st.composite
def bnb_cases(draw):
    q = _bnb_base(draw)
    sd = q.to_bnb_state_dict("weight")
    meta = json.loads(bytes(sd[f"weight.{QS}"].tolist()).decode())
    kind = draw(st.sampled_from(["drop", "extra", "dtype", "length", "shape", "nonfinite", "json",
                                 "json_whole", "json_drop", "none"]))
    keys = sorted(sd)
    names = []
    if kind == "drop":
        k = draw(st.sampled_from(keys))
        del sd[k]
        names = [k, "nested", "missing"]
    elif kind == "extra":
        k = draw(st.sampled_from(["weight.bogus", "weight.nested_absmax", "weight.nested_quant_map",
                                  f"weight.quant_state.bitsandbytes__fp4"]))
        if k in sd:
            return q, sd, kind, [], "noop"
        sd[k] = torch.zeros(3)
        names = [k.split(".")[-1], "fp4", "nested", "double"]
    elif kind in ("dtype", "length", "shape", "nonfinite"):
        k = draw(st.sampled_from([k for k in keys if not k.endswith(QS)]))
        t = sd[k]
        if kind == "dtype":
            new = draw(st.sampled_from([torch.float16, torch.float64, torch.int32, torch.uint8, torch.float32]))
            if new == t.dtype:
                return q, sd, kind, [], "noop"
            sd[k] = t.to(new)
        elif kind == "length":
            d = draw(st.sampled_from([-1, 1, -t.numel(), 1000]))
            flat = t.reshape(-1)
            sd[k] = flat[: max(0, flat.numel() + d)] if d < 0 else torch.cat([flat, flat[:1].repeat(d)])
        elif kind == "shape":
            sd[k] = t.reshape(1, -1, 1) if t.numel() else t
            return q, sd, kind, [k.split(".")[-1], "element", "shape"], "maybe"
        else:
            if not t.is_floating_point():
                return q, sd, kind, [], "noop"
            t = t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(
                [float("nan"), float("inf"), -float("inf")]))
            sd[k] = t
        names = [k.split(".")[-1] if k != "weight" else "weight", "quant_map", "nested", "packed", "absmax"]
    elif kind == "json":
        field = draw(st.sampled_from(sorted(JSON_BAD)))
        if field.startswith("nested") and not q.double_quant:
            return q, sd, kind, [], "noop"
        meta[field] = draw(st.sampled_from(JSON_BAD[field]))
        sd[f"weight.{QS}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        names = [field, "shape", "packed bytes"]
    elif kind == "json_drop":
        field = draw(st.sampled_from(sorted(meta)))
        del meta[field]
        sd[f"weight.{QS}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        names = [field, "nested"]
    elif kind == "json_whole":
        raw = draw(st.sampled_from(JSON_WHOLE))
        sd[f"weight.{QS}"] = torch.tensor(list(raw), dtype=torch.uint8)
        names = [QS, "quant_type"]
    else:
        return q, sd, kind, [], "noop"
    return q, sd, kind, names, "bad"


def _check_bnb(q, sd, via):
    if via == "from_bnb_state_dict":
        q2 = nl.NF4Tensor.from_bnb_state_dict(sd, "weight")
        got = nl.dequantize_nf4(q2)
    else:
        if len(q.shape) != 2:
            return _check_bnb(q, sd, "from_bnb_state_dict")
        model = torch.nn.Sequential(torch.nn.Linear(q.shape[1], q.shape[0], bias=False))
        sd = {f"0.{k}": v for k, v in sd.items()}
        if via == "load_bnb_checkpoint":
            path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, path)
            nl.load_bnb_checkpoint(model, path)
        else:
            nl.load_bnb_state_dict(model, sd)
        got = nl.dequantize_nf4(model[0].nf4_weight)
    assert torch.equal(got, nl.dequantize_nf4(q)), "loaded weight differs from the one written"


def test_fuzz_bnb_state_dicts(request):
    @given(bnb_cases(), st.sampled_from(["from_bnb_state_dict", "load_bnb_state_dict", "load_bnb_checkpoint"]))
    def run(case, via):
        q, sd, kind, names, _ = case
        check_case(f"bnb state dict ({via})", lambda: _check_bnb(q, sd, via), names,
                   f"{kind}: {sorted((k, str(v.dtype), tuple(v.shape)) for k, v in sd.items())} via {via}")

    fuzz_settings(request, 90)(run)()


# ----------------------------------------------------------------------------- adapter files
CONFIG_BAD = {
    "r": ["8", 0, -1, True, 1.5, None, 10**12],
    "lora_alpha": ["x", None, True, [8]],
    "target_modules": [5, None, [], ["nonexistent_proj"], [1, 2], {"q_proj": 1}],
    "peft_type": ["X", None, 5, "LORA ", "PROMPT_TUNING"],
    "use_dora": ["yes", 1, None],
    "rank_pattern": [[], {"q_proj": "x"}, {"q_proj": 0}, {"q_proj": -1}, {"(": 2}, "q_proj"],
    "alpha_pattern": [{"q_proj": "x"}, {"q_proj": float("nan")}, [1], "x"],
    "layers_to_transform": ["a", [-1], [1.5], 10**20, {"a": 1}],
    "layers_pattern": [5, ["layers", 3]],
    "lora_dropout": ["0.1", 2.0, -1, float("nan"), [0.1]],
    "use_rslora": ["no", 1, None, [True]],
    "exclude_modules": [5, [3], {"a": 1}],
    "bias": ["all", "lora_only", 5],
    "fan_in_fan_out": [True, 1],
    "init_lora_weights": ["x", 5],
    "modules_to_save": [["lm_head"], "lm_head"],
}
CONFIG_WHOLE = [b"[]", b"null", b"{", b"\xff\xfe", b"", b'"LORA"', b'{"peft_type": "LORA"}', b"1e999",
                b"[" * 100_000]


@pytest.fixture(scope="module")
def adapter_source():
    """A tiny Llama, and a saved adapter of mixed ranks (rank_pattern), per use_dora."""
    base = tiny_llama(layers=2, hidden=32, inter=64)
    out = {"base": base, "dirs": {}}
    root = tempfile.mkdtemp()
    for dora in (False, True):
        m = copy.deepcopy(base)
        nl.apply_qlora(m, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, use_dora=dora,
                       rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6})
        g = _gen(3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        d = os.path.join(root, f"dora{int(dora)}")
        nl.save_adapter(m, d)
        out["dirs"][dora] = d
    return out


def _file_param(model, key):
    """The parameter of `model` a PEFT key loads into."""
    body = key[len("base_model.model."):]
    if body.endswith(".lora_magnitude_vector"):
        return model.get_submodule(body[: -len(".lora_magnitude_vector")]).lora_magnitude_vector["default"].weight
    mod, which = body.rsplit(".", 2)[0], body.rsplit(".", 2)[1]
    return getattr(model.get_submodule(mod), which)["default"].weight


def _check_adapter(base, d):
    m = nl.load_adapter(copy.deepcopy(base), d)
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    for k, t in tensors.items():  # accepted: the model holds exactly what the file holds
        p = _file_param(m, k)
        assert torch.equal(p.detach(), t.to(p.dtype)), f"{k} loaded differently from the file"
    with torch.no_grad():
        assert torch.isfinite(m(tokens()).logits).all()


@st.composite
def adapter_cases(draw):
    kind = draw(st.sampled_from(["config", "config_drop", "config_whole", "key_drop", "key_extra",
                                 "key_rename", "dtype", "shape", "nonfinite", "truncate", "header_len",
                                 "header_json", "huge_shape", "no_weights", "none"]))
    dora = draw(st.booleans())
    return kind, dora, draw(st.data())


def _mutate_adapter(src, dst, kind, data):
    """Copy the adapter dir src to dst and break one thing; returns the words an error must use."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    wpath = os.path.join(dst, "adapter_model.safetensors")
    cpath = os.path.join(dst, "adapter_config.json")
    raw_cfg = None
    names = []
    keys = sorted(tensors)
    if kind == "config":
        field = data.draw(st.sampled_from(sorted(CONFIG_BAD)))
        cfg[field] = data.draw(st.sampled_from(CONFIG_BAD[field]))
        names = [field, "target", "rank", "module"]
    elif kind == "config_drop":
        field = data.draw(st.sampled_from(sorted(cfg)))
        del cfg[field]
        names = [field, "rank", "shape"]
    elif kind == "config_whole":
        raw_cfg = data.draw(st.sampled_from(CONFIG_WHOLE))
        names = ["adapter_config.json"]
    elif kind == "key_drop":
        k = data.draw(st.sampled_from(keys))
        del tensors[k]
        names = [k]
    elif kind == "key_extra":
        k = data.draw(st.sampled_from(["base_model.model.lm_head.weight", "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                                       "base_model.model.model.embed_tokens.lora_embedding_A", "junk"]))
        tensors[k] = torch.zeros(2, 2)
        names = [k]
    elif kind == "key_rename":
        k = data.draw(st.sampled_from(keys))
        tensors[k.replace("layers.", "layerz.")] = tensors.pop(k)
        names = ["layerz", k]
    elif kind in ("dtype", "shape", "nonfinite"):
        k = data.draw(st.sampled_from(keys))
        t = tensors[k]
        if kind == "dtype":
            tensors[k] = t.to(data.draw(st.sampled_from([torch.int32, torch.float16, torch.float64, torch.bool])))
            names = [k]
        elif kind == "shape":
            tensors[k] = data.draw(st.sampled_from([t.t().contiguous() if t.dim() == 2 else t.reshape(1, -1),
                                                     t.reshape(-1), torch.cat([t, t])]))
            names = [k]
        else:
            t = t.clone()
            t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf")]))
            tensors[k] = t
            names = ["nan or inf"]
    if raw_cfg is None:
        raw_cfg = json.dumps(cfg).encode()
    with open(cpath, "wb") as f:
        f.write(raw_cfg)
    if kind == "no_weights":
        return ["adapter_model"]
    save_file(tensors, wpath, metadata={"format": "pt"})
    blob = open(wpath, "rb").read()
    hlen = struct.unpack("<Q", blob[:8])[0]
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        names = ["adapter_model.safetensors"]
    elif kind == "header_len":
        blob = struct.pack("<Q", data.draw(st.sampled_from([2**63, 2**40, hlen + 1, hlen - 1, 0]))) + blob[8:]
        names = ["adapter_model.safetensors"]
    elif kind == "header_json":
        i = data.draw(st.integers(8, 8 + hlen - 1))
        blob = blob[:i] + bytes([data.draw(st.sampled_from([0, 0x7B, 0x22, 0xFF]))]) + blob[i + 1:]
        names = ["adapter_model.safetensors", "key", "shape", "nan"]
    elif kind == "huge_shape":
        header = json.loads(blob[8:8 + hlen])
        k = data.draw(st.sampled_from(keys))
        header[k]["shape"] = data.draw(st.sampled_from([[2**31, 2**31], [2**62], [10**30]]))
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        blob = struct.pack("<Q", len(h)) + h + blob[8 + hlen:]
        names = ["adapter_model.safetensors"]
    with open(wpath, "wb") as f:
        f.write(blob)
    return names


def test_fuzz_adapter_files(request, adapter_source):
    base = adapter_source["base"]

    @given(adapter_cases())
    def run(case):
        kind, dora, data = case
        dst = tempfile.mkdtemp()
        names = _mutate_adapter(adapter_source["dirs"][dora], dst, kind, data)
        check_case("load_adapter", lambda: _check_adapter(base, dst), names, f"{kind} (dora={dora}) in {dst}")

    fuzz_settings(request, 110)(run)()


# ----------------------------------------------------------------------------- optimizer state
STATE_BAD = {
    "step": [-1, 1.5, "3", None, torch.tensor(float("nan")), 2**70, True],
    "exp_avg": ["dtype", "short", "long", "missing", "2d"],
    "exp_avg_sq": ["dtype", "short", "missing"],
    "exp_avg_absmax": ["dtype", "short", "missing"],
    "lr": ["x", float("nan"), -1.0, None],
    "betas": [(0.9,), (0.9, 1.5), "ab", None, (float("nan"), 0.9)],
    "eps": [-1.0, "x"],
    "weight_decay": [float("inf"), -0.1],
    "optim_bits": [16, "8", None],
    "params": ["extra_index", "fewer"],
}


def _opt_setup(bits):
    g = _gen(0)
    params = [torch.nn.Parameter(torch.randn(5000, generator=g)), torch.nn.Parameter(torch.randn(7, 3, generator=g))]
    opt = nl.PagedAdamW(params, lr=1e-3, optim_bits=bits, min_8bit_size=4096)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    opt.step()
    return params, opt


def _check_opt_state(bits, sd, via):
    params, opt = _opt_setup(bits)
    want = [p.detach().clone() for p in params]
    opt.step()  # the uninterrupted continuation
    want = [p.detach().clone() for p in params]
    params2, _ = _opt_setup(bits)
    opt2 = nl.PagedAdamW(params2, lr=1e-3, optim_bits=bits, min_8bit_size=4096)
    if via == "file":
        path = os.path.join(tempfile.mkdtemp(), "state.pt")
        torch.save({"format": "nf4lora-training-state", "version": 1, "optimizer": sd, "scheduler": None,
                    "rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate()},
                    "step": 1, "extra": None}, path)
        nl.load_training_state(path, opt2, restore_rng=False)
    else:
        opt2.load_state_dict(sd)
    opt2.step()
    for a, b in zip(params2, want):
        assert torch.equal(a.detach(), b), "resumed step differs"


def test_fuzz_optimizer_state(request):
    @given(st.sampled_from([8, 32]), st.sampled_from(sorted(STATE_BAD)), st.data(),
           st.sampled_from(["load_state_dict", "file"]))
    def run(bits, field, data, via):
        _, opt = _opt_setup(bits)
        sd = copy.deepcopy(opt.state_dict())
        bad = data.draw(st.sampled_from(STATE_BAD[field]))
        which = data.draw(st.sampled_from([0, 1]))
        st_ = sd["state"][which]
        group = sd["param_groups"][0]
        if field == "step":
            st_["step"] = bad
        elif field in ("exp_avg", "exp_avg_sq", "exp_avg_absmax"):
            if field not in st_:
                return
            t = st_[field]
            if bad == "dtype":
                st_[field] = t.to(torch.float16 if t.dtype != torch.float16 else torch.float32)
            elif bad == "short":
                st_[field] = t[:-1]
            elif bad == "long":
                st_[field] = torch.cat([t, t[:1]])
            elif bad == "missing":
                del st_[field]
            else:
                st_[field] = t.reshape(1, -1)  # same elements: harmless
        elif field == "params":
            if bad == "extra_index":
                sd["state"][7] = copy.deepcopy(st_)
            else:
                group["params"] = group["params"][:1]
        else:
            group[field] = bad
        check_case(f"optimizer state ({via})", lambda: _check_opt_state(bits, sd, via),
                   [field, "param", "state", "group", "training state", "size", "beta"],
                   f"bits={bits} {field}={bad!r} (param {which}) via {via}")

    fuzz_settings(request, 50)(run)()
