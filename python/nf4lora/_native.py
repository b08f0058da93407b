"""The compiled modules: nf4lora._C (CPU, always) and nf4lora._C_cuda (only when built with CUDA).

Only the backends import this. Tensors cross into C++ as raw addresses (tensor.data_ptr()) plus
sizes; dtype codes match csrc/include/nf4lora/dtype.h.
"""
import torch

from . import _C  # noqa: F401  (CPU kernels; always built)

try:  # built only where nvcc was found; importing it needs no GPU
    from . import _C_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C_cuda = None

# torch dtype -> kernel ABI code (csrc/include/nf4lora/dtype.h: DType)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_DTYPES = tuple(DTYPE_CODE)


def cuda_available() -> bool:
    """The CUDA module is built and a CUDA device is visible to torch."""
    return _C_cuda is not None and torch.cuda.is_available()


def addr(t):
    """Raw address of an optional tensor (0 for None)."""
    return 0 if t is None else t.data_ptr()
