"""Model-level QLoRA: surgery (apply_qlora, quantize_model), adapters in PEFT's format, merging,
bitsandbytes checkpoints."""
from .depth import depth_rank_pattern
from .bnb import bnb_state_dict, load_bnb_checkpoint, load_bnb_state_dict, save_bnb_checkpoint
from .io import load_adapter, save_adapter
from .merge import add_weighted_adapter, merge_adapter, merge_and_unload, unmerge_adapter
from .model import (apply_qlora, delete_adapter, disable_adapter, mixed_batch, prepare_for_training,
                    quantize_model, set_adapter, trainable_parameters)
from .targets import find_targets
from .vera import apply_vera
from .adalora import apply_adalora, update_and_allocate
from .molora import apply_molora, router_aux_loss
from .lokr import apply_lokr

__all__ = ["apply_qlora", "quantize_model", "prepare_for_training", "set_adapter", "disable_adapter",
           "delete_adapter", "merge_adapter", "unmerge_adapter", "merge_and_unload", "save_adapter",
           "load_adapter", "load_bnb_state_dict", "bnb_state_dict", "save_bnb_checkpoint", "load_bnb_checkpoint", "find_targets",
           "trainable_parameters", "mixed_batch", "apply_vera", "apply_adalora",
           "update_and_allocate", "add_weighted_adapter", "apply_molora", "router_aux_loss",
           "depth_rank_pattern"]
__all__ += ["apply_lokr"]
