"""The one relative-error helper of the test suite (imported by the test files and tests/gpu).

rel_err(a, b):           ||a - b||_F / ||b||_F in float64 on the CPU (b is the reference)
rel_err(a, b, "max"):    max |a - b| / max |b| (the optimizer tests' elementwise bound;
                         also max_rel_err(a, b))

A zero reference with a non-zero difference gives a huge value, never NaN, so an assertion
`rel_err(...) < tol` cannot pass on an all-zero or empty output by accident: an empty pair is an
error here, not a zero.
"""
import torch


def rel_err(a, b, norm="fro"):
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"rel_err: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.numel() == 0:
        raise AssertionError("rel_err of empty tensors: nothing would be compared")
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    if norm == "fro":
        return float((a - b).norm() / b.norm().clamp_min(1e-300))
    if norm == "max":
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    raise ValueError(f"norm must be 'fro' or 'max', got {norm!r}")


def max_rel_err(a, b):
    return rel_err(a, b, "max")
