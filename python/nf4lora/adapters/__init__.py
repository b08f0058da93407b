"""Adapter kinds as plug-ins of QLoRALinear (base.py: the protocol and registry). Importing this
package registers every kind."""
from . import adalora, bdlora, blockdiag, dora, lokr, lora, molora, vera  # noqa: F401  (registration)
from .adalora import AdaLoraConfig
from .base import FILE_TYPES, KINDS, AdapterConfig, AdapterKind, adapter_parts, containers, kind_of, new_containers
from .bdlora import BdLoraConfig
from .blockdiag import BlockLoraConfig
from .dora import LoraMagnitude
from .lokr import LoKrConfig
from .molora import MoloraConfig
from .vera import VeraConfig, VeraProjections

__all__ = ["FILE_TYPES", "KINDS", "AdapterConfig", "AdapterKind", "AdaLoraConfig", "BdLoraConfig", "BlockLoraConfig", "LoKrConfig",
           "MoloraConfig", "VeraConfig", "LoraMagnitude", "VeraProjections", "adapter_parts", "containers",
           "kind_of", "new_containers"]
