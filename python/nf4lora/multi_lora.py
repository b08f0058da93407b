"""multi_lora_linear: many LoRA adapters over one NF4 base in one call (S-LoRA / punica style),
for serving a batch whose rows belong to different fine-tunes. DESIGN.md "Many adapters in one
batch" has the layout and the BGMV / SGMV choice.
"""
import torch

from . import _ops  # noqa: F401  (the op's schema)
from . import backends  # noqa: F401  (its kernels)
from ._checks import check_tensor
from .functional import _check_common, _state

ops = torch.ops.nf4lora


def multi_lora_linear(x, q, A_pool, B_pool, adapter_idx, scalings, bias=None, *, sgmv_min_rows=None):
    """y[m] = x[m] W^T + bias + scalings[e] * (x[m] A_pool[e]^T) B_pool[e]^T with e = adapter_idx[m];
    e = -1 leaves row m at the base x[m] W^T + bias.

    x [..., K] float32/float16/bfloat16 (float64 through the pure-torch backend); q an NF4Tensor
    [N, K]; A_pool [E, r, K] and B_pool [E, N, r] in one of float32/float16/bfloat16 (float64 for
    float64 x), contiguous, on x's device (PEFT's lora_A.weight / lora_B.weight of each adapter,
    stacked; 16-bit pools halve the bytes a batch over many adapters reads, the sums stay float32
    either way); adapter_idx integer with shape x.shape[:-1]; scalings [E] (alpha / r of each
    adapter; finite). Adapters of lower rank are zero-padded to r: rows r_e.. of A_pool[e] and
    columns r_e.. of B_pool[e] must be zero. Returns [..., N] in x's dtype.

    The base NF4 GEMM runs once for all rows (the fused linear's base path); then each row's
    low-rank term comes from its own adapter: rows grouped by adapter (SGMV) where an adapter has
    at least `sgmv_min_rows` rows in the batch, one by one (BGMV) otherwise (None: the backend's
    default; 1 forces SGMV, a value above the row count forces BGMV). In 16-bit dtypes the base is
    rounded to the dtype before the LoRA term is added (two roundings; the fused qlora_linear
    rounds once).

    Inference only: there is no backward. With autograd enabled and x, the pools or the bias
    requiring grad this raises RuntimeError (use qlora_linear per adapter to train).
    """
    N, K = _check_common(x, q, bias)
    if not isinstance(adapter_idx, torch.Tensor):
        adapter_idx = torch.as_tensor(adapter_idx, device=x.device)
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.as_tensor(scalings, dtype=torch.float32, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pool_dtypes = (torch.float64,) if acc == torch.float64 else (torch.float32, torch.float16, torch.bfloat16)
    check_tensor("A_pool", A_pool, dtypes=pool_dtypes, dim=3)
    check_tensor("B_pool", B_pool, dtypes=(A_pool.dtype,), dim=3)
    check_tensor("scalings", scalings, dim=1, contiguous=False,  # finite: checked by the op
                 dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
    check_tensor("adapter_idx", adapter_idx, contiguous=False, nonempty=False,
                 dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
    if tuple(adapter_idx.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_idx must have shape {tuple(x.shape[:-1])} (x's shape without its "
                         f"last dimension), got {tuple(adapter_idx.shape)}")
    for name, t in (("A_pool", A_pool), ("B_pool", B_pool), ("adapter_idx", adapter_idx),
                    ("scalings", scalings)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if sgmv_min_rows is None:
        sgmv_min_rows = 0
    elif isinstance(sgmv_min_rows, bool) or not isinstance(sgmv_min_rows, int) or sgmv_min_rows < 1:
        raise ValueError(f"sgmv_min_rows must be None or an int >= 1, got {sgmv_min_rows!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A_pool, B_pool, bias)):
        raise RuntimeError("multi_lora_linear is an inference (serving) op without a backward; call it "
                           "under torch.no_grad() / torch.inference_mode(), or train each adapter with "
                           "qlora_linear")
    x2 = x.reshape(-1, K).contiguous()
    y = ops.multi_lora_linear(x2, *_state(q), N, A_pool, B_pool,
                              adapter_idx.reshape(-1).to(torch.int64).contiguous(),
                              scalings.to(acc).contiguous(), None if bias is None else bias.to(acc),
                              sgmv_min_rows)
    return y.reshape(*x.shape[:-1], N)


def multi_lora_plan(adapter_idx, sgmv_min_rows=None):
    """How the CPU kernel groups these rows: {"sgmv_groups", "sgmv_rows", "bgmv_rows", "isa"}
    (tests and benchmarks; the same grouping function the kernel runs)."""
    from ._native import _C
    idx = torch.as_tensor(adapter_idx).reshape(-1).to(torch.int64).contiguous().cpu()
    E = int(idx.max()) + 1 if idx.numel() else 1
    return _C.multi_lora_plan(idx.data_ptr(), idx.numel(), max(E, 1), sgmv_min_rows or 0)


def _backward(ctx, dy):
    raise RuntimeError("multi_lora_linear has no backward (an inference op); train adapters with "
                       "qlora_linear")


def _setup(ctx, inputs, output):
    pass


torch.library.register_autograd("nf4lora::multi_lora_linear", _backward, setup_context=_setup)
