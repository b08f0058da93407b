"""PagedAdamW on CUDA: the resident and paged (pinned host state streamed through the GPU) kernels
against the CPU scalar reference, bit for bit; device memory bounded by the staging slots;
state dicts across devices. Skipped without CUDA."""
import io

import pytest
import torch

import nf4lora as nl
from nf4lora import _native
from nf4lora._optim_ops import n_blocks
from nf4lora.backends import optim_cpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or _native._C_cuda is None,
                                reason="needs CUDA and the nf4lora CUDA module")

DEV = "cuda"
HP = (1e-2, 0.9, 0.999, 1e-8, 0.05)


def _state(bits, n, device, pinned=False):
    if bits == 8:
        st = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
              torch.zeros(n_blocks(n)), torch.zeros(n_blocks(n))]
    else:
        st = [torch.zeros(n), torch.zeros(n)]
    if pinned:
        return [t.pin_memory() for t in st]
    return [t.to(device) for t in st]


def _steps(bits, dtype, n, where, page_size, steps=4):
    """where: 'ref' (CPU scalar), 'resident' (CUDA state), 'paged' (pinned host state)."""
    g = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=g).to(dtype)
    grads = [(torch.randn(n, generator=g) * 0.1 * (t + 1)).to(dtype) for t in range(steps)]
    dev = "cpu" if where == "ref" else DEV
    p = p.to(dev)
    st = _state(bits, n, dev, pinned=(where == "paged"))
    for t in range(1, steps + 1):
        args = (*HP, t, page_size)
        grad = grads[t - 1].to(dev)
        if where == "ref":
            fn = optim_cpu.adamw8bit_step if bits == 8 else optim_cpu.adamw_step
            fn(p, grad, *st, *args, impl="ref")
        else:
            op = torch.ops.nf4lora.adamw8bit_step if bits == 8 else torch.ops.nf4lora.adamw_step
            op(p, grad, *st, *args)
    torch.cuda.synchronize()
    return [p.cpu()] + [s.cpu() for s in st]


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 255, 257, 4095, 70_013])
def test_cuda_resident_and_paged_match_cpu_ref(bits, dtype, n):
    ref = _steps(bits, dtype, n, "ref", 1024)
    for where, page in (("resident", 1024), ("paged", 1024), ("paged", 256), ("paged", 1 << 20)):
        out = _steps(bits, dtype, n, where, page)
        for i, (a, b) in enumerate(zip(out, ref)):
            assert torch.equal(a, b), f"{where} page {page}: tensor {i} differs"


def test_paged_optimizer_keeps_state_on_host_and_bounds_device_memory():
    n = 1 << 23  # 8M params: 64 MiB of fp32 m+v
    p = torch.nn.Parameter(torch.randn(n, device=DEV))
    p.grad = torch.randn(n, device=DEV)
    opt = nl.PagedAdamW([p], optim_bits=32, paged=True, page_size=1 << 18)  # 2 MiB pages
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    st = opt.state[p]
    assert st["exp_avg"].device.type == "cpu" and st["exp_avg"].is_pinned()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 3 * (1 << 18) * 8 + (1 << 20), extra  # three staging slots, not 64 MiB


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_optimizer_matches_cpu_optimizer(bits):
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 50), (4096,), (17,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    cpu = [torch.nn.Parameter(t.clone()) for t in init]
    gpu_paged = [torch.nn.Parameter(t.clone().to(DEV)) for t in init]
    gpu_res = [torch.nn.Parameter(t.clone().to(DEV)) for t in init]
    opts = [nl.PagedAdamW(ps, lr=3e-3, optim_bits=bits, paged=pg, page_size=2048)
            for ps, pg in ((cpu, True), (gpu_paged, True), (gpu_res, False))]
    for _ in range(10):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps in (cpu, gpu_paged, gpu_res):
            for p, gr in zip(ps, grads):
                p.grad = gr.to(p.device)
        for o in opts:
            o.step()
    for a, b, c in zip(cpu, gpu_paged, gpu_res):
        assert torch.equal(a.detach(), b.detach().cpu())
        assert torch.equal(a.detach(), c.detach().cpu())
    assert opts[2].state[gpu_res[0]]["exp_avg"].device.type == "cuda"


@pytest.mark.parametrize("src,dst", [("cuda-paged", "cpu"), ("cpu", "cuda-paged"),
                                     ("cuda-resident", "cuda-paged")])
def test_state_dict_across_devices_resumes_bit_identical(src, dst):
    g = torch.Generator().manual_seed(5)
    shapes = [(64, 80), (80,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(8)]

    def make(kind):
        dev = "cpu" if kind == "cpu" else DEV
        ps = [torch.nn.Parameter(t.clone().to(dev)) for t in init]
        return ps, nl.PagedAdamW(ps, lr=1e-2, optim_bits=8, min_8bit_size=1024, page_size=1024,
                                 paged=kind != "cuda-resident")

    def run(ps, o, gs):
        for step_grads in gs:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.to(p.device)
            o.step()

    ref_ps, ref_o = make("cpu")
    run(ref_ps, ref_o, grads)
    ps1, o1 = make(src)
    run(ps1, o1, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().cpu() for p in ps1], "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    ps2, o2 = make(dst)
    with torch.no_grad():
        for p, t in zip(ps2, ck["params"]):
            p.copy_(t)
    o2.load_state_dict(ck["opt"])
    if dst == "cuda-paged":
        assert all(st["exp_avg"].is_pinned() for st in o2.state.values())
    run(ps2, o2, grads[3:])
    for a, b in zip(ps2, ref_ps):
        assert torch.equal(a.detach().cpu(), b.detach())
