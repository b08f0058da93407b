"""Adapter initialisations as PEFT 0.21 names them in `init_lora_weights`, on an NF4 base.

One pure entry point, `init_adapter(method, q, r, scaling, ...) -> InitResult`: it reads the NF4
base `q` [N, K] (and, where given, the full-precision weight it came from), returns the adapter
A [r, K] / B [N, r] (float32, q's device), the new NF4 base when the method changes the base, and
the reconstruction error ||W - (Q + s B A)||_F before and after. It touches no module; a layer
wires it in by building its lora_A / lora_B from the result and swapping its weight for `base`.

Methods (PEFT's semantics; W = `weight` when given, else q dequantized to float32):
  True        A kaiming-uniform(a=sqrt(5)), B = 0              base unchanged
  False       A and B kaiming-uniform (nn.Linear's init)        base unchanged
  "gaussian"  A ~ N(0, 1/r), B = 0                              base unchanged
  "pissa"     W = U S V^T (full SVD); B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_r^T
              base = NF4(W - s B A): the principal part moves into the adapter
  "pissa_niter_N"  the same from torch.svd_lowrank(W, r, niter=N) (random: torch's RNG)
  "olora"     W = Q R (QR); B = Q[:, :r], A = R[:r]; base = NF4(W - s B A)
  "loftq"     PEFT's loftq_init: Q_1 = q (PEFT quantizes W first: the same bytes when q was
              quantized from W in q's format), then loftq_iter times: L R = the rank-r SVD split
              of W - Q_i, and, before the next round, Q_{i+1} = NF4(W - L R); A = R, B = L,
              base = the last Q (unchanged when loftq_iter == 1). Needs `weight` (on an already
              quantized base W - Q is zero and there is nothing to recover). Like PEFT, A and B are
              not divided by the scaling (peft issue 1982), so s B A = s L R; loftq_scaled=True
              divides both by sqrt(s) so that s B A = L R.

RNG: under the same seed, a call draws exactly what PEFT's LoraLayer.update_layer draws for one
layer, in the same order: the kaiming-uniform of the nn.Linear(K, r) and nn.Linear(r, N) it builds
(on the CPU, float32), then the method's own draws (True: A again; "gaussian": A; pissa_niter:
svd_lowrank's normal sample). So a seeded model gets PEFT's adapters layer for layer, provided the
caller builds its lora_A / lora_B without drawing again (`nn.Linear(..., device="meta")`, then
`lora_A.weight = nn.Parameter(result.A.to(dtype))`). With `generator`, every draw comes from it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, check_tensor
from ..nf4 import NF4Tensor, quantize_nf4

_PEFT_ONLY = ("eva", "corda", "orthogonal", "mica", "lora_ga")
_COMMON_OPTIONS = ("weight", "compute_error")
_METHOD_OPTIONS = {"loftq": ("loftq_iter", "loftq_bits", "loftq_scaled")}
METHODS = ("True", "False", "'gaussian'", "'pissa'", "'pissa_niter_<N>'", "'olora'", "'loftq'")


@dataclass
class InitResult:
    """What `init_adapter` computed for one layer.

    A: float32 [r, K]; B: float32 [N, r] (PEFT's lora_A.weight / lora_B.weight).
    base: the new NF4 base (q's blocksize, double_quant and dtype) when the method moves part of
      the weight into the adapter (pissa, olora, loftq with loftq_iter > 1), else None (keep q).
    error_before: ||W - Q_q||_F, the original base with B = 0.
    error_after: ||W - (Q + s B A)||_F with Q = base (or q) and s = scaling.
    (None for both when compute_error=False.)
    """
    method: str
    A: torch.Tensor
    B: torch.Tensor
    base: Optional[NF4Tensor]
    error_before: Optional[float]
    error_after: Optional[float]

    @property
    def changes_base(self) -> bool:
        return self.base is not None


def parse_method(method):
    """PEFT's init_lora_weights value -> (kind, niter): kind in {True, False, "gaussian", "pissa",
    "olora", "loftq"}; niter is pissa_niter's N (None for a full SVD). Raises ValueError otherwise."""
    if isinstance(method, bool):
        return method, None
    if not isinstance(method, str):
        raise ValueError(f"method (init_lora_weights) must be one of {', '.join(METHODS)}, got "
                         f"{method!r} ({type(method).__name__})")
    if method.lower() in ("gaussian", "olora"):  # PEFT compares these two case-insensitively
        return method.lower(), None
    if method in ("pissa", "loftq"):
        return method, None
    m = re.fullmatch(r"pissa_niter_(\d+)", method)
    if m is not None:
        return "pissa", int(m.group(1))
    if method.startswith("pissa"):
        raise ValueError(f"method (init_lora_weights) must be 'pissa' or 'pissa_niter_<N>' with N a "
                         f"non-negative integer, got {method!r}")
    if method.lower() in _PEFT_ONLY:
        raise ValueError(f"method (init_lora_weights) {method!r} is a PEFT initialisation nf4lora does "
                         f"not implement; supported: {', '.join(METHODS)}")
    raise ValueError(f"method (init_lora_weights) must be one of {', '.join(METHODS)}, got {method!r}")


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_bool(name, v):
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")
    return v


def _check_options(kind, q, r, scaling, generator, options):
    if not isinstance(q, NF4Tensor):
        raise ValueError(f"q must be an NF4Tensor, got {type(q).__name__}")
    if q.dim() != 2:
        raise ValueError(f"q must be a 2-D weight [out_features, in_features], got shape {tuple(q.shape)}")
    _check_int("r", r, 1)
    if kind in ("pissa", "olora", "loftq") and r > min(q.shape):
        raise ValueError(f"r must be <= min(out_features, in_features) = {min(q.shape)} for "
                         f"{kind!r}, got {r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
            or scaling <= 0:
        raise ValueError(f"scaling must be a positive finite number, got {scaling!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    allowed = _COMMON_OPTIONS + _METHOD_OPTIONS.get(kind, ())
    for key in options:
        if key not in allowed:
            owners = [m for m, opts in _METHOD_OPTIONS.items() if key in opts]
            why = f"it is an option of {owners[0]!r} only" if owners else "unknown option"
            raise ValueError(f"option {key}= is not accepted with method {kind!r}: {why} "
                             f"(accepted: {', '.join(allowed)})")
    weight = options.get("weight")
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES + (torch.float64,), dim=2, contiguous=False,
                     finite=True)
        if tuple(weight.shape) != tuple(q.shape):
            raise ValueError(f"weight must have q's shape {tuple(q.shape)}, got {tuple(weight.shape)}")
    elif kind == "loftq":
        raise ValueError("method 'loftq' needs the full-precision weight (weight=...): on an already "
                         "quantized base the residual W - Q is zero and there is nothing to recover")
    _check_bool("compute_error", options.get("compute_error", True))
    if kind == "loftq":
        _check_int("loftq_iter", options.get("loftq_iter", 1), 1)
        bits = options.get("loftq_bits", 4)
        if isinstance(bits, bool) or bits != 4:
            raise ValueError(f"loftq_bits must be 4 (the base is NF4), got {bits!r}")
        _check_bool("loftq_scaled", options.get("loftq_scaled", False))


def _linear_draws(r, N, K, generator):
    """The kaiming-uniform(a=sqrt(5)) init of nn.Linear(K, r) and nn.Linear(r, N), as PEFT's
    update_layer builds them: CPU, float32, A first."""
    A = nn.init.kaiming_uniform_(torch.empty(r, K), a=math.sqrt(5), generator=generator)
    B = nn.init.kaiming_uniform_(torch.empty(N, r), a=math.sqrt(5), generator=generator)
    return A, B


def _requantize(w, q):
    """NF4 of the float32 `w` in q's format (blocksize, double_quant), carrying q's dtype."""
    n = quantize_nf4(w.contiguous(), q.blocksize, q.double_quant)
    return NF4Tensor._wrap(n.packed, n.absmax, q.shape, q.dtype, q.blocksize, n.absmax2, n.code8,
                           n.offset)


def _svd_lowrank(W, r, niter, generator):
    """torch.svd_lowrank(W, r, niter) (PEFT's pissa_niter call) on torch's RNG, or on a seed drawn
    from `generator` with the global RNG state saved and restored."""
    if generator is None:
        return torch.svd_lowrank(W, q=r, niter=niter)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return torch.svd_lowrank(W, q=r, niter=niter)


def _pissa(W, r, s, niter, generator):
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = _svd_lowrank(W, r, niter, generator)
        Vh = V.t()
    root = torch.sqrt(S / s)
    return root[:, None] * Vh, U * root[None, :]  # A = sqrt(S/s) V^T, B = U sqrt(S/s)


def _olora(W, r):
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _rank_split(res, r):
    """L [N, r], R [r, K] with L R the best rank-r approximation of res: U sqrt(S), sqrt(S) V^T."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root[None, :], root[:, None] * Vh[:r]


def _loftq(W, q, r, iters):
    Q = q.dequantize(torch.float32)
    base = None
    for i in range(iters):
        if i > 0:
            base = _requantize(W - L @ R, q)
            Q = base.dequantize(torch.float32)
        L, R = _rank_split(W - Q, r)
    return R, L, base


def _frobenius(W, Q, s=None, B=None, A=None):
    d = W - Q if B is None else W - (Q + (s * B) @ A)
    return float(torch.linalg.vector_norm(d))


def init_adapter(method, q: NF4Tensor, r: int, scaling: float, *, generator=None, **options) -> InitResult:
    """Initialise one LoRA adapter of rank `r` and scaling `s` on the NF4 base `q` [N, K] the way
    PEFT 0.21's `init_lora_weights=method` does (the module docstring lists the methods).

    options (each rejected with a ValueError where the method does not take it):
      weight=None          the dense weight the method starts from (float, [N, K]); default q
                           dequantized to float32. Required by "loftq"; for pissa / olora it is the
                           QPiSSA flow (decompose the full-precision weight, quantize the residual).
      compute_error=True   False skips the two error norms (one dense pass each).
      loftq_iter=1         "loftq": alternating rounds (PEFT's LoftQConfig.loftq_iter).
      loftq_bits=4         "loftq": only 4 (the base is NF4).
      loftq_scaled=False   "loftq": divide A and B by sqrt(s) so that s B A = L R.
    """
    kind, niter = parse_method(method)
    _check_options(kind, q, r, scaling, generator, options)
    scaling = float(scaling)
    N, K = q.shape
    dev = q.device
    Q0 = q.dequantize(torch.float32)
    weight = options.get("weight")
    W = Q0 if weight is None else weight.detach().to(dev, torch.float32)
    A, B = _linear_draws(r, N, K, generator)  # PEFT's nn.Linear pair: always drawn first
    base = None
    with torch.no_grad():
        if kind is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B.zero_()
        elif kind == "gaussian":
            nn.init.normal_(A, std=1.0 / r, generator=generator)
            B.zero_()
        elif kind in ("pissa", "olora"):
            A, B = _pissa(W, r, scaling, niter, generator) if kind == "pissa" else _olora(W, r)
            base = _requantize(W - (scaling * B) @ A, q)
        elif kind == "loftq":
            A, B, base = _loftq(W, q, r, options.get("loftq_iter", 1))
            if options.get("loftq_scaled", False):
                A, B = A / math.sqrt(scaling), B / math.sqrt(scaling)
        A, B = A.to(dev).contiguous(), B.to(dev).contiguous()
        before = after = None
        if options.get("compute_error", True):
            before = _frobenius(W, Q0)
            Q = Q0 if base is None else base.dequantize(torch.float32)
            after = _frobenius(W, Q, scaling, B, A)
    name = method if isinstance(method, bool) else (kind if niter is None else f"pissa_niter_{niter}")
    return InitResult(name, A, B, base, before, after)
