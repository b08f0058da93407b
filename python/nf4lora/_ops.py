"""Schemas of the nf4lora torch ops, defined once, with their fake (meta) implementations.

Kernels are registered per device in backends/: default.py (pure torch, any device), cpu.py
(nf4lora._C), cuda.py (nf4lora._C_cuda). The fakes give shapes and dtypes so torch.compile and
torch.library.opcheck see through the ops.

NF4 state tensors (DESIGN.md "NF4 format"), for n = prod(shape) elements and nb = ceil(n/blocksize):
  packed  uint8 [(n+1)//2]      two codes per byte, element 2i in the high nibble
  absmax  float32 [nb]          or, double-quantized, uint8 [nb] codes into code8
  absmax2 float32 [ceil(nb/256)] second-level scales (None unless double-quantized)
  code8   float32 [256]          the signed dynamic code (None unless double-quantized)
  offset  float                  mean of the original absmax (0.0 unless double-quantized)
"""
import torch

LIB = "nf4lora"

_SCHEMAS = {
    # w [any shape] fp32/fp16/bf16 -> (packed uint8 [(n+1)//2], absmax float32 [nb])
    "quantize_nf4": "(Tensor w, int blocksize) -> (Tensor, Tensor)",
    # absmax float32 [nb] -> (qabsmax uint8 [nb], absmax2 float32 [ceil(nb/256)]); offset = mean
    "quantize_absmax": "(Tensor absmax, float offset, Tensor code8) -> (Tensor, Tensor)",
    # (qabsmax, absmax2, code8, offset) -> absmax float32 [nb]
    "dequantize_absmax": "(Tensor qabsmax, Tensor absmax2, Tensor code8, float offset) -> Tensor",
    # NF4 state -> dense tensor of `shape` in `dtype`
    "dequantize_nf4": (
        "(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, float offset, int blocksize, "
        "SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{LIB}::{_name}", _schema)


def _n_blocks(n, blocksize):
    return -(-n // blocksize)


@torch.library.register_fake(f"{LIB}::quantize_nf4")
def _quantize_nf4_fake(w, blocksize):
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = w.new_empty((_n_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{LIB}::quantize_absmax")
def _quantize_absmax_fake(absmax, offset, code8):
    nb = absmax.numel()
    return absmax.new_empty((nb,), dtype=torch.uint8), absmax.new_empty((_n_blocks(nb, 256),))


@torch.library.register_fake(f"{LIB}::dequantize_absmax")
def _dequantize_absmax_fake(qabsmax, absmax2, code8, offset):
    return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)


@torch.library.register_fake(f"{LIB}::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Linear-layer ops. W = the NF4 state (packed, absmax, absmax2, code8, offset, blocksize) of a
# weight [N = out_features, K = in_features]. x, dy, y, dx are 2-D [M, *] in one activation dtype
# (fp32/fp16/bf16; fp64 through the default backend); lora_A [r, K], lora_B [N, r], bias [N],
# g [M, r] and u [M, r] are float32 (float64 when the activations are). Dropout (on the LoRA input only) is a mask regenerated from
# `seed` (an int64 CPU scalar tensor, None when dropout_p == 0): see backends/default.dropout_mask.
_W = "Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, float offset, int blocksize"
_LINEAR_SCHEMAS = {
    # y = x W^T + bias
    "nf4_linear": f"(Tensor x, {_W}, int out_features, Tensor? bias) -> Tensor",
    # dx = dy W
    "nf4_linear_t": f"(Tensor dy, {_W}, int in_features) -> Tensor",
    # (y, u): u = D(x) A^T, y = x W^T + bias + scaling * u B^T
    "qlora_fwd": (f"(Tensor x, {_W}, int out_features, Tensor lora_A, Tensor lora_B, float scaling, "
                  "Tensor? bias, float dropout_p, Tensor? seed) -> (Tensor, Tensor)"),
    # dx = dy W + scaling * D(g A)
    "qlora_bwd_dx": (f"(Tensor dy, {_W}, int in_features, Tensor g, Tensor lora_A, float scaling, "
                     "float dropout_p, Tensor? seed) -> Tensor"),
    # dA = scaling * g^T D(x)   [r, K] float32
    "lora_grad_a": "(Tensor g, Tensor x, float scaling, float dropout_p, Tensor? seed) -> Tensor",
}
def _acc(dtype):
    """Accumulation / LoRA-side dtype for activations of `dtype`: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


for _name, _schema in _LINEAR_SCHEMAS.items():
    torch.library.define(f"{LIB}::{_name}", _schema)


@torch.library.register_fake(f"{LIB}::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake(f"{LIB}::nf4_linear_t")
def _nf4_linear_t_fake(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features):
    return dy.new_empty((dy.shape[0], in_features))


@torch.library.register_fake(f"{LIB}::qlora_fwd")
def _qlora_fwd_fake(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, lora_A,
                    lora_B, scaling, bias, dropout_p, seed):
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_acc(x.dtype)))


@torch.library.register_fake(f"{LIB}::qlora_bwd_dx")
def _qlora_bwd_dx_fake(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g,
                       lora_A, scaling, dropout_p, seed):
    return dy.new_empty((dy.shape[0], in_features))


@torch.library.register_fake(f"{LIB}::lora_grad_a")
def _lora_grad_a_fake(g, x, scaling, dropout_p, seed):
    return g.new_empty((g.shape[1], x.shape[1]), dtype=_acc(x.dtype))


# ---------------------------------------------------------------------------------------------
# Multi-adapter serving op (S-LoRA / punica style; DESIGN.md "Many adapters in one batch"):
# y [M, N] = x W^T + bias + scalings[e] * (x[m] A_pool[e]^T) B_pool[e]^T per row, e = adapter_idx[m]
# (-1: base only). A_pool [E, r, K], B_pool [E, N, r], scalings [E] float32 (float64 for float64 x),
# adapter_idx int64 [M]. sgmv_min_rows: the BGMV / SGMV switch (0: the backend's default).
# Inference only: no autograd formula (backward raises, see multi_lora.py).
torch.library.define(
    f"{LIB}::multi_lora_linear",
    f"(Tensor x, {_W}, int out_features, Tensor A_pool, Tensor B_pool, Tensor adapter_idx, "
    "Tensor scalings, Tensor? bias, int sgmv_min_rows) -> Tensor")


@torch.library.register_fake(f"{LIB}::multi_lora_linear")
def _multi_lora_linear_fake(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                            A_pool, B_pool, adapter_idx, scalings, bias, sgmv_min_rows):
    return x.new_empty((x.shape[0], out_features))
