"""Which CPU kernel path runs, and a way to pick a slower one (tests, benchmarks).

    nl.info()                      # dict: CPU model and features, AMX permission, ISA cap, threads,
                                   # the path each linear op takes per activation dtype, CUDA state
    with nl.max_cpu_isa("avx2"):   # cap the CPU kernels at a tier for the block (restored after);
        ...                        # env NF4LORA_MAX_ISA does the same for a whole process

Tiers, slowest first: "scalar" (csrc/ref), "avx2", "avx512", "avx512_bf16" (VDPBF16PS tiles for
bf16 activations), "amx" (AMX-BF16 tiles; the default: no cap). A cap never enables what the CPU
lacks. The decision itself lives in csrc/cpu/linear.cpp (forward_path / backward_path).
"""
import contextlib
import threading

import torch

from ._native import DTYPE_CODE, _C, _C_cuda

TIERS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
# Shapes at which info() reports the paths: a decode step, a small batch, a training batch.
_REPORT_M = {"M=1": 1, "M=16": 16, "M=512": 512}
_REPORT_NK = (4096, 4096)
_cap_lock = threading.Lock()


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cpu_paths():
    """{dtype name: {"forward M=1": path, ..., "backward M=512": path}} for a 4096 x 4096 layer under
    the current cap: what qlora_linear / nf4_linear run on this CPU."""
    N, K = _REPORT_NK
    out = {}
    for dtype, code in DTYPE_CODE.items():
        name = str(dtype).replace("torch.", "")
        row = {f"forward {k}": _C.forward_path(m, N, K, code) for k, m in _REPORT_M.items()}
        row.update({f"backward {k}": _C.backward_path(m, N, K, code) for k, m in _REPORT_M.items()})
        out[name] = row
    return out


def info():
    """The dispatcher's report as a plain dict (JSON-serialisable)."""
    from . import __version__
    gpu = None
    if _C_cuda is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "version": __version__,
        "cpu": {
            "model": _cpu_model(),
            "features": {
                "avx2": bool(_C.has_avx2()),
                "avx512": bool(_C.has_avx512()),
                "avx512_vbmi": bool(_C.has_avx512vbmi()),
                "avx512_bf16": bool(_C.has_avx512bf16()),
                "amx_bf16": bool(_C.has_amx_bf16()),
            },
            "amx": _C.amx_status(),
        },
        "max_isa": _C.max_isa(),
        "threads": int(_C.num_threads()),
        "paths": cpu_paths(),
        "cuda": {"module_built": _C_cuda is not None, "gpu": gpu},
    }


@contextlib.contextmanager
def max_cpu_isa(tier):
    """Cap the CPU kernels at `tier` (one of TIERS) inside the block; the previous cap comes back
    after it, also on error. Process-wide: meant for tests and benchmarks, not concurrent use."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    with _cap_lock:
        previous = _C.max_isa()
        _C.set_max_isa(tier)
    try:
        yield
    finally:
        with _cap_lock:
            _C.set_max_isa(previous)
