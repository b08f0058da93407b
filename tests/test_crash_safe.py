"""Crash-safe files: save_adapter, save_bnb_checkpoint and save_training_state write a temporary
file and rename it, so a process killed at any moment leaves the previous file or the new one. A
forked child saves versions 0, 1, 2, ... of the same file in a loop; the parent SIGKILLs it at a
random moment, then checks that what is on disk is one complete version (and, for adapters, that
load_adapter takes it). Default: KILLS kills per writer; --fuzz-long: KILLS_LONG.

A resumed run (adapter + PagedAdamW state + LR scheduler + RNG, from the files) equals the
uninterrupted run bit for bit on the CPU."""
import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import nf4lora as nl
from model_utils import tiny_llama, tokens

KILLS, KILLS_LONG = 30, 300
STATS = {}  # writer -> (kills, kills that left a temporary file behind = landed inside a write)


def _n_kills(request):
    return KILLS_LONG if request.config.getoption("--fuzz-long") else KILLS


def _fill_version(model, v):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.fill_(float(v))


def _kill_loop(request, name, path, save_version, check, max_delay):
    """Fork a child that saves versions 1, 2, ... forever (version 0 is on disk first); kill it at a
    random moment; `check(path)` returns the version found, which must be a complete one."""
    save_version(0)
    rng = random.Random(hash(name) & 0xFFFF)
    kills = torn = 0
    d = os.path.dirname(path) if not os.path.isdir(path) else path
    for _ in range(_n_kills(request)):
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                v = 1
                while True:
                    save_version(v)
                    v += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        torn += any(".tmp-" in f for f in os.listdir(d))
        v = check(path)
        assert isinstance(v, int) and v >= 0, f"{name}: no complete version after a kill"
    STATS[name] = (kills, torn)
    assert kills == _n_kills(request)
    # the next successful save clears the temporary files the killed writers left
    save_version(10_000)
    assert check(path) == 10_000
    assert not any(".tmp-" in f for f in os.listdir(d)), os.listdir(d)


@pytest.fixture(scope="module")
def adapter_model():
    m = tiny_llama(layers=2, hidden=128, inter=256)
    nl.apply_qlora(m, "all-linear", r=32, lora_alpha=16)
    return m


def _version_of(tensors):
    vals = {float(t.flatten()[0]) for t in tensors}
    vals |= {float(t.flatten()[-1]) for t in tensors}
    assert len(vals) == 1, f"a file holding two versions: {sorted(vals)}"
    v = vals.pop()
    assert all(bool((t == v).all()) for t in tensors), "a torn tensor"
    return int(v)


def test_save_adapter_survives_kills(request, tmp_path, adapter_model):
    path = str(tmp_path / "adapter")

    def save(v):
        _fill_version(adapter_model, v)
        nl.save_adapter(adapter_model, path)

    def check(p):
        with open(os.path.join(p, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 32
        return _version_of(list(load_file(os.path.join(p, "adapter_model.safetensors")).values()))

    _kill_loop(request, "save_adapter", path, save, check, 0.08)
    fresh = tiny_llama(layers=2, hidden=128, inter=256)
    nl.load_adapter(fresh, path)  # the surviving pair loads
    assert all(bool((p == 10_000).all()) for n, p in fresh.named_parameters() if "lora_" in n)


def test_save_bnb_checkpoint_survives_kills(request, tmp_path):
    m = tiny_llama(layers=2, hidden=128, inter=256)
    nl.quantize_model(m)
    path = str(tmp_path / "model.safetensors")
    norm = m.model.norm.weight

    def save(v):
        with torch.no_grad():
            norm.fill_(float(v))
        nl.save_bnb_checkpoint(m, path)

    def check(p):
        sd = load_file(p)
        assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in sd)
        return _version_of([sd["model.norm.weight"]])

    _kill_loop(request, "save_bnb_checkpoint", path, save, check, 0.02)
    fresh = tiny_llama(layers=2, hidden=128, inter=256)
    nl.load_bnb_checkpoint(fresh, path)
    assert bool((fresh.model.norm.weight == 10_000).all())
    x = tokens()
    with torch.no_grad():
        norm.fill_(10_000.0)
        assert torch.equal(fresh(x).logits, m(x).logits)


def test_save_training_state_survives_kills(request, tmp_path):
    params = [torch.nn.Parameter(torch.zeros(200_000)), torch.nn.Parameter(torch.zeros(3000))]
    opt = nl.PagedAdamW(params, lr=1e-3, optim_bits=8)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    path = str(tmp_path / "state.pt")

    def save(v):
        nl.save_training_state(path, opt, step=v)

    def check(p):
        opt2 = nl.PagedAdamW([torch.nn.Parameter(torch.zeros_like(q)) for q in params], lr=1e-3,
                             optim_bits=8)
        info = nl.load_training_state(p, opt2, restore_rng=False)
        assert len(opt2.state) == 2
        return info["step"]

    _kill_loop(request, "save_training_state", path, save, check, 0.05)


def test_kill_stats_are_recorded():
    """(Runs after the kill tests: they really killed writers, and some kills landed inside a write.)"""
    if len(STATS) < 3:
        pytest.skip("the kill tests did not all run")
    total = sum(k for k, _ in STATS.values())
    inside = sum(t for _, t in STATS.values())
    print(f"\ncrash-safe: {total} kills survived, {inside} inside a write: {STATS}")
    assert inside > 0, "no kill landed inside a write: the test would not see a torn file"


def test_write_error_keeps_old_file(tmp_path, adapter_model, monkeypatch):
    path = str(tmp_path / "a")
    _fill_version(adapter_model, 1)
    nl.save_adapter(adapter_model, path)
    _fill_version(adapter_model, 2)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        nl.save_adapter(adapter_model, path)
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _version_of(list(load_file(os.path.join(path, "adapter_model.safetensors")).values())) == 1


# ----------------------------------------------------------------------------- resume
STEPS, CUT = 6, 3


def _batch():
    return torch.randint(0, 96, (2, 8))  # from the default generator: the RNG state matters


def _run(model, opt, sched, steps):
    model.train()
    for _ in range(steps):
        x = _batch()
        loss = model(input_ids=x, labels=x).loss  # lora_dropout draws its seeds from torch's RNG
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _setup(bits):
    m = tiny_llama(layers=2, hidden=64, inter=128)
    nl.apply_qlora(m, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    opt = nl.PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=5e-3, optim_bits=bits,
                        min_8bit_size=256, page_size=256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
    return m, opt, sched


@pytest.mark.parametrize("bits", [32, 8])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, bits):
    torch.manual_seed(7)
    m, opt, sched = _setup(bits)
    _run(m, opt, sched, STEPS)
    want = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    want_opt = opt.state_dict()

    torch.manual_seed(7)
    m, opt, sched = _setup(bits)
    _run(m, opt, sched, CUT)
    nl.save_adapter(m, str(tmp_path / "ckpt"))
    nl.save_training_state(str(tmp_path / "ckpt" / "state.pt"), opt, sched, step=CUT)
    del m, opt, sched  # the "crash"

    torch.manual_seed(12345)  # a new process: nothing carries over but the files
    m2 = tiny_llama(layers=2, hidden=64, inter=128)
    nl.load_adapter(m2, str(tmp_path / "ckpt"), is_trainable=True)
    opt2 = nl.PagedAdamW([p for p in m2.parameters() if p.requires_grad], lr=5e-3, optim_bits=bits,
                         min_8bit_size=256, page_size=256)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1e-2, total_steps=STEPS)
    info = nl.load_training_state(str(tmp_path / "ckpt" / "state.pt"), opt2, sched2)
    assert info["step"] == CUT
    _run(m2, opt2, sched2, STEPS - CUT)
    got = {n: p.detach() for n, p in m2.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(want) > 0
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n} differs after resuming"
    got_opt = opt2.state_dict()
    assert len(want_opt["state"]) == len(got_opt["state"]) > 0
    for k, st in want_opt["state"].items():
        for name, t in st.items():
            assert (torch.equal(t, got_opt["state"][k][name]) if isinstance(t, torch.Tensor)
                    else t == got_opt["state"][k][name]), (k, name)


def test_load_training_state_rejects_bad_files(tmp_path):
    opt = nl.PagedAdamW([torch.nn.Parameter(torch.zeros(10))])
    p = tmp_path / "s.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable nf4lora training state"):
        nl.load_training_state(str(p), opt)
    torch.save({"format": "something else"}, str(p))
    with pytest.raises(ValueError, match="not an nf4lora training state"):
        nl.load_training_state(str(p), opt)
    nl.save_training_state(str(p), opt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=str(p).replace(".", r"\.")):
        nl.load_training_state(str(p), opt)
    with pytest.raises(FileNotFoundError):
        nl.load_training_state(str(tmp_path / "missing.pt"), opt)
