"""Kernels for the ops of _ops.py, one module per device. Importing this registers them all."""
from . import default  # noqa: F401  (pure torch; every device, and float64 on CPU)
from . import cpu  # noqa: F401
from . import cpu_linear  # noqa: F401
from . import cuda  # noqa: F401
from . import multi_lora  # noqa: F401
