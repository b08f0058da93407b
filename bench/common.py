"""The bench/ scripts' helpers now live in the package (nf4lora.benchmarks.common), so the
`nf4lora bench` command and these scripts share one copy; this module re-exports them."""
from nf4lora.benchmarks.common import *  # noqa: F401,F403
from nf4lora.benchmarks.common import _sync  # noqa: F401
