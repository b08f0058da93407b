"""nl.AdapterPool (many PEFT adapters in pool tensors, one multi_lora_linear per layer) against
PEFT's `adapter_names` forward and single-adapter runs; LRU eviction under a byte budget; bad
names and paths. Also: mixed_batch runs the multi-adapter kernel and keeps its stacked pool until
an adapter's weights change."""
import copy

import pytest
import torch

import nf4lora as nl
from model_utils import peft_three_adapters, rel, single_adapter_logits, three_adapters, tiny_llama, tokens

NAMES = ["b", "default", "__base__", "c", "default", "b"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _three(base, dora=False):
    return three_adapters(base, dora, spread_magnitudes=True)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """(model with the three adapters, {name: directory}) for LoRA and DoRA."""
    out = {}
    for dora in (False, True):
        m = _three(base, dora)
        dirs = {}
        for a in ("default", "b", "c"):
            dirs[a] = tmp_path_factory.mktemp(f"{a}{int(dora)}")
            nl.save_adapter(m, dirs[a], adapter_name=a)
        out[dora] = (m, dirs)
    return out


def _pool(base, dirs, **kw):
    pool = nl.AdapterPool(nl.quantize_model(copy.deepcopy(base)).eval(), **kw)
    for a, d in dirs.items():
        pool.load(a, d)
    return pool


def test_pool_matches_peft_adapter_names(base, saved):
    pytest.importorskip("peft")
    m, dirs = saved[False]
    pm = peft_three_adapters(m, base)
    pool = _pool(base, dirs)
    x = tokens(batch=len(NAMES), seq=7)
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=NAMES).logits
        with pool.batch(NAMES) as model:
            got = model(x).logits
    assert rel(got, want) < 1e-5
    # outside the context the model is the plain base again
    assert all(layer.serving is None for _, layer in nl.lora.model.qlora_layers(pool.model))


def test_dora_rows_equal_single_adapter_runs(base, saved):
    m, dirs = saved[True]
    pool = _pool(base, dirs)
    x = tokens(batch=len(NAMES), seq=5)
    with torch.no_grad(), pool.batch(NAMES) as model:
        got = model(x).logits
    for i, alone in enumerate(single_adapter_logits(m, x, NAMES)):
        assert rel(got[i:i + 1], alone) < 1e-5, (i, NAMES[i])


def test_add_model_adapter_equals_mixed_batch(base, saved):
    m, _ = saved[True]
    pool = nl.AdapterPool(m)
    for a in ("default", "b", "c"):
        pool.add_model_adapter("p_" + a, a)
    x = tokens(batch=len(NAMES), seq=5)
    with torch.no_grad():
        with nl.mixed_batch(m, NAMES):
            want = m(x).logits
        with pool.batch(["p_" + n if n != "__base__" else n for n in NAMES]):
            got = m(x).logits
    assert rel(got, want) < 1e-5


def test_lru_eviction_under_budget(base, saved):
    m, dirs = saved[False]
    sizes = {a: _pool(base, {a: d}).nbytes for a, d in dirs.items()}
    budget = sizes["c"] + max(sizes["default"], sizes["b"])  # any two fit, never all three
    pool = _pool(base, {"default": dirs["default"], "b": dirs["b"]}, max_bytes=budget)
    pool.load("c", dirs["c"])  # evicts "default", the least recently used
    assert pool.resident() == ["b", "c"] and pool.names() == ["b", "c", "default"]
    assert pool.nbytes <= budget
    x = tokens(batch=3, seq=5)
    alone = {a: single_adapter_logits(m, x, [a] * 3) for a in ("default", "b", "c")}
    with torch.no_grad():
        for rows in (["default", "b", "__base__"], ["c", "default", "c"], ["b", "b", "c"]):
            with pool.batch(rows) as model:
                got = model(x).logits
            assert set(pool.resident()) >= set(rows) - {"__base__"} and pool.nbytes <= budget
            for i, a in enumerate(rows):
                if a != "__base__":
                    assert rel(got[i:i + 1], alone[a][i]) < 1e-5, (rows, i)
        with pytest.raises(ValueError, match="does not fit"):
            with pool.batch(["default", "b", "c"]):
                pass
    pool.evict("b")
    assert "b" not in pool.resident() and "b" in pool
    pool.remove("b")
    assert "b" not in pool


def test_errors(base, saved, tmp_path):
    _, dirs = saved[False]
    pool = _pool(base, {"default": dirs["default"]})
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        with pool.batch(["default", "nope"]):
            pass
    with pytest.raises(TypeError, match="one adapter name per batch row"):
        with pool.batch("default"):
            pass
    with pytest.raises(TypeError, match="must be str"):
        with pool.batch(["default", 3]):
            pass
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        pool.load("x", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pool.load("x", tmp_path)
    with pytest.raises(ValueError, match="already in the pool"):
        pool.load("default", dirs["default"])
    with pytest.raises(ValueError, match="reserved"):
        pool.load("__base__", dirs["b"])
    with pytest.raises(ValueError, match="more than max_bytes"):
        _pool(base, {"c": dirs["c"]}, max_bytes=16)
    with pytest.raises(ValueError, match="no QLoRALinear"):
        nl.AdapterPool(copy.deepcopy(base))
    with pytest.raises(ValueError, match="2 adapters but the batch has 3"):
        with torch.no_grad(), pool.batch(["default", "default"]) as model:
            model(tokens(batch=3))
    with pytest.raises(ValueError, match="scaling"):
        pool.add("t", {"model.layers.0.self_attn.q_proj": {"A": torch.zeros(2, 64), "B": torch.zeros(64, 2),
                                                            "scaling": float("nan")}})


def test_mixed_batch_runs_the_kernel_and_keeps_its_pool(base, monkeypatch):
    import nf4lora.per_example as per_example
    m = _three(base)
    x = tokens(batch=len(NAMES), seq=4)
    calls = []
    real = per_example.multi_lora_linear
    monkeypatch.setattr(per_example, "multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), nl.mixed_batch(m, NAMES):
        first = m(x).logits
        layer = m.get_submodule("model.layers.0.self_attn.q_proj")
        kept = layer.__dict__["_stacked_pool_kept"]
        m(x)
        assert layer.__dict__["_stacked_pool_kept"] is kept  # unchanged adapters: the pool is reused
        layer.lora_B["b"].weight.mul_(2.0)                      # a weight changes: rebuilt
        changed = m(x).logits
        assert layer.__dict__["_stacked_pool_kept"] is not kept
    n_layers = len(nl.lora.model.qlora_layers(m))
    assert len(calls) == 3 * n_layers  # one kernel call per layer per forward
    assert rel(changed[0:1], first[0:1]) > 1e-4  # row 0 ("b") sees the new weight
    want = single_adapter_logits(m, x, NAMES)
    assert all(rel(changed[i:i + 1], want[i]) < 1e-5 for i in range(len(NAMES)))
