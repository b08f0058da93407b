"""nf4lora: NF4 (QLoRA) kernels for PyTorch.

Bit-exact bitsandbytes NF4 quantization with double-quantized scales, a fused dequant + GEMM +
LoRA linear (forward and backward), and paged optimizer state; C++ (AVX2/AVX-512/AMX + OpenMP) and CUDA kernels
registered as torch custom ops. See DESIGN.md for the architecture.
"""
from .functional import nf4_linear, qlora_linear
from .multi_lora import multi_lora_linear
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .nn import QLoRALinear
from .lora import (add_weighted_adapter, apply_adalora, apply_molora, apply_qlora, apply_vera, bnb_state_dict,
                   delete_adapter, depth_rank_pattern, router_aux_loss,
                   disable_adapter, load_adapter, load_bnb_checkpoint, load_bnb_state_dict, merge_adapter,
                   merge_and_unload, mixed_batch, prepare_for_training, quantize_model, save_adapter,
                   save_bnb_checkpoint, set_adapter, unmerge_adapter, update_and_allocate)
from .lora import apply_lokr
from .optim import PagedAdamW
from .serving import AdapterPool
from .checkpoint import load_training_state, save_training_state
from .dispatch import info, max_cpu_isa

__version__ = "0.1.0"

__all__ = ["NF4Tensor", "quantize_nf4", "dequantize_nf4", "nf4_linear", "qlora_linear", "multi_lora_linear",
           "QLoRALinear", "apply_qlora", "quantize_model", "prepare_for_training", "save_adapter",
           "load_adapter", "set_adapter", "disable_adapter", "delete_adapter", "merge_adapter",
           "unmerge_adapter", "merge_and_unload", "load_bnb_state_dict", "bnb_state_dict",
           "mixed_batch", "apply_vera", "apply_adalora", "update_and_allocate", "add_weighted_adapter", "apply_molora", "router_aux_loss",
           "depth_rank_pattern", "PagedAdamW",
           "save_bnb_checkpoint", "load_bnb_checkpoint", "save_training_state", "load_training_state",
           "info", "max_cpu_isa", "AdapterPool"]
__all__ += ["apply_lokr"]
