"""Adapter kinds as plug-ins of QLoRALinear (base.py: the protocol and registry). Importing this
package registers every kind."""
from . import adalora, dora, lora, molora, vera  # noqa: F401  (registration)
from .adalora import AdaLoraConfig
from .base import KINDS, AdapterConfig, AdapterKind, adapter_parts, containers, kind_of, new_containers
from .dora import LoraMagnitude
from .molora import MoloraConfig
from .vera import VeraConfig, VeraProjections

__all__ = ["KINDS", "AdapterConfig", "AdapterKind", "AdaLoraConfig", "VeraConfig", "LoraMagnitude", "MoloraConfig",
           "VeraProjections", "adapter_parts", "containers", "kind_of", "new_containers"]
