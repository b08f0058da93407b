"""PEFT's modules_to_save: whole modules (a classification head, say) trained and saved with an
adapter, next to its low-rank layers.

A module named in modules_to_save becomes a ModulesToSave wrapper: the frozen original plus one
trainable copy per adapter, under PEFT's names (`<name>.original_module.*`,
`<name>.modules_to_save.<adapter>.*`), so optimizers, LoRA+ grouping and state dicts see what
PEFT's ModulesToSaveWrapper gives them. The wrapper runs the active adapter's copy (one at a time,
as PEFT), the original inside disable_adapter or for an adapter without a copy, and per example
inside mixed_batch. Adapter files hold the copy's state under the original module's keys
(`base_model.model.<name>.weight`), as PEFT writes them.
"""
import copy

import torch
from torch import nn

BASE = "__base__"  # mixed_batch's name for "no adapter"


class ModulesToSave(nn.Module):
    """The original module plus a trainable copy of it per adapter (PEFT's ModulesToSaveWrapper)."""

    def __init__(self, original):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = None
        self.adapters_enabled = True     # False inside disable_adapter(): the original
        self.batch_adapter_names = None  # per-example adapters (mixed_batch)
        # a bitsandbytes state dict names the original's tensors without "original_module."
        self.register_load_state_dict_pre_hook(_plain_keys_to_original)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what code reads off the wrapped module (out_features, weight, ...)
            return getattr(super().__getattr__("original_module"), name)

    def add(self, adapter_name):
        """A frozen copy of the original for `adapter_name` (set_adapter makes it trainable)."""
        new = copy.deepcopy(self.original_module)
        new.requires_grad_(False)
        self.modules_to_save[adapter_name] = new

    def delete(self, adapter_name):
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, names, requires_grad=True):
        """The first of `names` with a copy runs (trainable unless requires_grad=False); PEFT allows
        one active copy per wrapper, so two of `names` with copies is an error."""
        have = [n for n in names if n in self.modules_to_save]
        if len(have) > 1:
            raise ValueError(f"adapters {have} each train their own copy of this module (modules_to_save); "
                             "only one of them can be active at a time")
        for m in self.modules_to_save.values():
            m.requires_grad_(False)
        self.active_adapter = have[0] if have else None
        if have:
            self.modules_to_save[have[0]].requires_grad_(requires_grad)

    def module_for(self, adapter_name):
        if not self.adapters_enabled or adapter_name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[adapter_name]

    def forward(self, x, *args, **kwargs):
        names = self.batch_adapter_names
        if names is None or not self.adapters_enabled:
            return self.module_for(self.active_adapter)(x, *args, **kwargs)
        if len(names) != x.shape[0]:
            raise ValueError(f"mixed_batch names {len(names)} adapters but this input has {x.shape[0]} rows")
        out = None
        for name in dict.fromkeys(names):  # each adapter's rows through its copy, in first-seen order
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            y = self.module_for(None if name == BASE else name)(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out


def _plain_keys_to_original(module, state_dict, prefix, *args):
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if not rest.startswith(("original_module.", "modules_to_save.")):
            state_dict[prefix + "original_module." + rest] = state_dict.pop(k)


def wrappers(model):
    """(name, ModulesToSave) for every wrapped module of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def check_names(names, what="modules_to_save"):
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be null or a list of module names, got {names!r}")
    return list(names)


def resolve(model, names, what="modules_to_save"):
    """The module names `names` select (PEFT's rule: the name, or a name ending in "." + it; the
    inside of a wrapper is its module), each checked: every entry selects one, and no selected module
    is or holds an NF4 layer (those take low-rank adapters). Changes nothing."""
    from ..nn import QLoRALinear
    inner = (".original_module", ".modules_to_save")
    found = []
    for entry in names:
        hits = [n for n, m in model.named_modules()
                if n and not any(s in n for s in inner) and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise ValueError(f"{what} entry {entry!r} matches no module of {type(model).__name__}")
        for n in hits:
            m = model.get_submodule(n)
            m = m.original_module if isinstance(m, ModulesToSave) else m
            if isinstance(m, QLoRALinear) or any(isinstance(c, QLoRALinear) for c in m.modules()):
                raise ValueError(f"{what} entry {entry!r} selects '{n}', which is (or holds) an NF4 layer; "
                                 "modules_to_save are modules trained whole (a head), not adapter targets")
            if n not in found:
                found.append(n)
    return found


def add_copies(model, modules, adapter_name):
    """Wrap `modules` (resolve()'s names) where not yet wrapped and give each a copy for the adapter."""
    from .model import _set_child
    for n in modules:
        m = model.get_submodule(n)
        if not isinstance(m, ModulesToSave):
            m = ModulesToSave(m)
            _set_child(model, n, m)
        m.add(adapter_name)


def file_shapes(model, modules, prefix):
    """{file key: shape} of the copies' state (the original module's state-dict entries)."""
    out = {}
    for n in modules:
        m = model.get_submodule(n)
        m = m.original_module if isinstance(m, ModulesToSave) else m
        out.update({f"{prefix}{n}.{k}": tuple(v.shape) for k, v in m.state_dict().items()})
    return out


def file_tensors(model, adapter_name, prefix):
    return {f"{prefix}{n}.{k}": v.detach().cpu().contiguous().clone()
            for n, w in wrappers(model) if adapter_name in w.modules_to_save
            for k, v in w.modules_to_save[adapter_name].state_dict().items()}


def load_tensors(model, modules, adapter_name, tensors, prefix):
    """A checked file's tensors into the adapter's copies, in place."""
    for n in modules:
        copy_ = model.get_submodule(n).modules_to_save[adapter_name]
        state = {k: tensors[f"{prefix}{n}.{k}"] for k in copy_.state_dict()}
        with torch.no_grad():
            copy_.load_state_dict(state, strict=True)
