"""The compiled modules: nf4lora._C (CPU, always) and nf4lora._C_cuda (only when built with CUDA).

Only the backends import this. Tensors cross into C++ as raw addresses (tensor.data_ptr()) plus
sizes; dtype codes match csrc/include/nf4lora/dtype.h.

Thread count: `_C` here is the compiled module seen through `_ThreadSynced`: every call first makes
the OpenMP thread count of the calling thread equal to torch.get_num_threads() (torch.set_num_threads,
OMP_NUM_THREADS, a DataLoader worker's 1). The hand-off is explicit because our kernels' OpenMP
runtime is not always torch's (the extension links the system libgomp; it shares torch's copy only
when torch was loaded first), and an OpenMP thread count is per thread: a new Python thread starts
with the runtime's default, not torch's setting. In a child forked from a process that may have
started OpenMP threads, our kernels run single-threaded: GNU OpenMP's thread pool does not survive
fork (a parallel region in the child waits forever for the parent's threads).
"""
import functools
import os
import threading

import torch

from . import _C as _C_module  # CPU kernels; always built

try:  # built only where nvcc was found; importing it needs no GPU
    from . import _C_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C_cuda = None

# torch dtype -> kernel ABI code (csrc/include/nf4lora/dtype.h: DType)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_DTYPES = tuple(DTYPE_CODE)

_tls = threading.local()  # .n: the count last handed to our runtime from this thread
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def kernel_threads() -> int:
    """The OpenMP thread count our CPU kernels use when called from this thread now."""
    return 1 if _forked else max(1, torch.get_num_threads())


def sync_threads():
    """Hand torch's thread count (for this thread) to our OpenMP runtime, when it changed."""
    n = kernel_threads()
    if getattr(_tls, "n", 0) != n:
        _C_module.set_num_threads(n)
        _tls.n = n


class _ThreadSynced:
    """nf4lora._C as the backends call it: each function syncs the thread count first."""

    _NO_SYNC = frozenset({"set_num_threads"})

    def __init__(self, module):
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if callable(attr) and name not in self._NO_SYNC:
            fn = attr

            @functools.wraps(fn)
            def attr(*args, **kwargs):
                sync_threads()
                return fn(*args, **kwargs)

        self.__dict__[name] = attr
        return attr

    def __repr__(self):
        return f"<thread-synced {self._module!r}>"


_C = _ThreadSynced(_C_module)


def cuda_available() -> bool:
    """The CUDA module is built and a CUDA device is visible to torch."""
    return _C_cuda is not None and torch.cuda.is_available()


def addr(t):
    """Raw address of an optional tensor (0 for None)."""
    return 0 if t is None else t.data_ptr()


def nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize):
    """The NF4 state as every binding takes it, in the op schemas' order: (packed, absmax, qabsmax,
    absmax2, code8, offset, blocksize) addresses and values; the shape (n, or N, K) follows."""
    nested = absmax2 is not None
    return (packed.data_ptr(), 0 if nested else absmax.data_ptr(),
            absmax.data_ptr() if nested else 0, addr(absmax2), addr(code8), float(offset),
            int(blocksize))
