"""Threads: every nf4lora op called from 4 Python threads at once equals the serial call bit for
bit; the OpenMP thread count of our kernels follows torch.set_num_threads / OMP_NUM_THREADS (in new
threads too); a forked DataLoader worker (and a plain os.fork child) does not hang on OpenMP state
left by the parent.

Shapes are large enough that the kernels open OpenMP parallel regions (GEMM and GEMV paths, 8-bit
and 32-bit AdamW over several pages), so four threads run four OpenMP teams at once."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import nf4lora as nl
from nf4lora import _native
from nf4lora.nf4_format import DYNAMIC_SIGNED

ops = torch.ops.nf4lora
N_THREADS = 4
REPEATS = 3


def _nf4(N, K, bs=64, dq=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nl.quantize_nf4(torch.randn(N, K, generator=g), bs, double_quant=dq)


def _w(q):
    return (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)


def _rand(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _adamw(multi, bits):
    """An optimizer op on fresh state: returns the updated param and state (it mutates them)."""
    def run():
        n = 3 * 4096 + 77  # several 8-bit blocks and pages of 4096
        p, g = _rand(n, seed=2), _rand(n, seed=3)
        if bits == 32:
            st = [torch.zeros(n), torch.zeros(n)]
        else:
            st = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                  torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))]
        hp = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 4096)
        for step in (1, 2):
            hp = hp[:5] + (step,) + hp[6:]
            if multi:
                op = ops.adamw_step_multi if bits == 32 else ops.adamw8bit_step_multi
                op([p], [g], *[[s] for s in st], *hp)
            else:
                op = ops.adamw_step if bits == 32 else ops.adamw8bit_step
                op(p, g, *st, *hp)
        return (p, *st)
    return run


def _cases():
    q = _nf4(320, 512)            # W [N=320, K=512], double-quantized
    qp = _nf4(96, 200, 32, False)  # plain absmax, K not a multiple of 32
    x64, x4 = _rand(64, 512, seed=4), _rand(4, 512, seed=5, dtype=torch.bfloat16)
    dy = _rand(64, 320, seed=6)
    A, B = _rand(8, 512, seed=7) * 0.1, _rand(320, 8, seed=8) * 0.1
    g = _rand(64, 8, seed=9)
    seed = torch.tensor(1234)
    absmax = torch.rand(5000, generator=torch.Generator().manual_seed(10)) + 0.01
    qa, a2 = ops.quantize_absmax(absmax, float(absmax.mean()), DYNAMIC_SIGNED)
    return {
        "quantize_nf4": lambda: ops.quantize_nf4(_rand(300, 777, seed=11, dtype=torch.bfloat16), 64),
        "quantize_absmax": lambda: ops.quantize_absmax(absmax, float(absmax.mean()), DYNAMIC_SIGNED),
        "dequantize_absmax": lambda: ops.dequantize_absmax(qa, a2, DYNAMIC_SIGNED, float(absmax.mean())),
        "dequantize_nf4": lambda: (ops.dequantize_nf4(*_w(q), [320, 512], torch.float16),
                                   ops.dequantize_nf4(*_w(qp), [96, 200], torch.float32)),
        "nf4_linear": lambda: (ops.nf4_linear(x64, *_w(q), 320, None),
                               ops.nf4_linear(x4, *_w(q), 320, _rand(320, seed=12)),
                               ops.nf4_linear(_rand(7, 200, seed=13), *_w(qp), 96, None)),
        "nf4_linear_t": lambda: ops.nf4_linear_t(dy, *_w(q), 512),
        "qlora_fwd": lambda: ops.qlora_fwd(x64, *_w(q), 320, A, B, 0.5, None, 0.1, seed),
        "qlora_bwd_dx": lambda: ops.qlora_bwd_dx(dy, *_w(q), 512, g, A, 0.5, 0.1, seed),
        "lora_grad_a": lambda: ops.lora_grad_a(g, x64, 0.5, 0.1, seed),
        "multi_lora_linear": lambda: ops.multi_lora_linear(
            x64, *_w(q), 320, _rand(6, 16, 512, seed=14) * 0.1, _rand(6, 320, 16, seed=15) * 0.1,
            torch.arange(64) % 7 - 1, _rand(6, seed=16), None, 0),
        "adamw_step": _adamw(False, 32),
        "adamw8bit_step": _adamw(False, 8),
        "adamw_step_multi": _adamw(True, 32),
        "adamw8bit_step_multi": _adamw(True, 8),
    }


def registry_ops():
    """Every op nf4lora registered with the dispatcher (not a list kept by hand)."""
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("nf4lora::"))
    assert len(names) >= 13, f"the nf4lora op registry looks empty: {names}"
    return names


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_cases_cover_every_registered_op():
    assert set(_cases()) == set(registry_ops())


def test_every_op_from_4_threads_equals_serial():
    cases = _cases()
    serial = {name: [t.clone() for t in _flat(fn())] for name, fn in cases.items()}
    results, errors = {}, []
    barrier = threading.Barrier(N_THREADS)

    def worker(tid):
        try:
            barrier.wait()
            for rep in range(REPEATS):
                names = list(cases)[tid::1] if rep % 2 == 0 else list(cases)[::-1]
                for name in names:
                    results[(tid, rep, name)] = _flat(cases[name]())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    assert len(results) >= N_THREADS * len(cases)
    for (tid, rep, name), outs in results.items():
        ref = serial[name]
        assert len(outs) == len(ref)
        for a, b in zip(outs, ref):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name}: thread {tid} repeat {rep} differs from the serial call"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_thread_count_follows_torch_set_num_threads(restore_threads):
    for n in (1, 3, 2):
        torch.set_num_threads(n)
        assert _native._C.num_threads() == n  # the count our kernels' parallel regions get
    torch.set_num_threads(1)
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("n", _native._C.num_threads()))
    t.start()
    t.join()
    assert seen["n"] == 1, "a new Python thread must get torch's count, not the runtime default"
    # and the results do not depend on it
    q, x = _nf4(128, 256), _rand(33, 256, seed=3)
    y1 = nl.nf4_linear(x, q)
    torch.set_num_threads(2)
    assert torch.equal(nl.nf4_linear(x, q), y1)


@pytest.mark.parametrize("env", ["1", "2"])
def test_thread_count_follows_OMP_NUM_THREADS(env):
    """(torch caps the count at what MKL reports, the physical cores: ours follows torch's.)"""
    code = ("import torch, nf4lora as nl; from nf4lora import _native; "
            "q = nl.quantize_nf4(torch.randn(64, 64)); "
            "print(torch.get_num_threads(), _native._C.num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch_n, ours = out.stdout.split()
    assert ours == torch_n
    if env == "1":
        assert ours == "1"


class _KernelDataset(torch.utils.data.Dataset):
    def __init__(self, q, x):
        self.q, self.x = q, x

    def __len__(self):
        return 6

    def __getitem__(self, i):
        y = nl.nf4_linear(self.x[i:i + 1].expand(40, -1).contiguous(), self.q)  # GEMM path
        w = nl.dequantize_nf4(nl.quantize_nf4(self.x[i].reshape(16, -1).repeat(64, 1), 64))
        return y.sum(0), w.sum(), _native._C.num_threads()


def test_forked_dataloader_worker_does_not_hang():
    q, x = _nf4(256, 512), _rand(6, 512, seed=5)
    ds = _KernelDataset(q, x)
    ref = [ds[i] for i in range(len(ds))]  # the parent has run multi-threaded OpenMP regions
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert len(got) == len(ref)
    for (y, w, n), (yr, wr, _) in zip(got, ref):
        assert torch.equal(y, yr) and torch.equal(w, wr)
        assert n == 1  # DataLoader workers run torch (and so our kernels) single-threaded


def test_plain_fork_child_runs_kernels():
    """A child forked after the parent's kernels ran (no DataLoader, no set_num_threads(1)) runs
    them single-threaded instead of waiting forever on the parent's OpenMP pool."""
    q, x = _nf4(256, 512), _rand(64, 512, seed=6)
    y = nl.nf4_linear(x, q)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            ok = torch.equal(nl.nf4_linear(x, q), y) and _native._C.num_threads() == 1
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    import select
    ready, _, _ = select.select([r], [], [], 120)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in an OpenMP region")
    msg = os.read(r, 16)
    os.waitpid(pid, 0)
    assert msg == b"ok"
