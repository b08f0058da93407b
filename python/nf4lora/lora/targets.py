"""Which modules an adapter wraps, and with which rank and alpha: PEFT's rules (0.21), re-implemented.

- `target_modules` as a list (or set): a module matches when its full name is in the list or ends
  with "." + an entry. As a str: `re.fullmatch` on the full name. "all-linear": every Linear (or
  QLoRALinear) except the model's output head (`get_output_embeddings()`), never the lora_A/lora_B
  Linears inside an adapted layer.
- `exclude_modules`: the same rules, checked first.
- `layers_to_transform` (int or list) filters list-matched names by layer index: the first number
  after `layers_pattern` (str or list, tried in order) or, without a pattern, the first
  `.<segment>.<digits>.` in the name. A name listed in full in `target_modules` skips this filter.
- `rank_pattern` / `alpha_pattern`: keys are regexes tested as `re.match(rf"(.*\\.)?({key})$", name)`
  in dict order; the first hit gives the value.
"""
import re

from torch import nn

from ..nn import QLoRALinear

ALL_LINEAR = "all-linear"


def _layer_index(name, layers_pattern):
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def _listed(name, names):
    return name in names or any(name.endswith("." + t) for t in names)


def is_excluded(name, exclude_modules):
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return _listed(name, exclude_modules)


def is_target(name, target_modules, layers_to_transform=None, layers_pattern=None):
    """PEFT's check_target_module_exists for one module name (exclusion checked separately)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    found = any(name.endswith("." + t) for t in target_modules)
    return found and in_layers(name, layers_to_transform, layers_pattern)


def in_layers(name, layers_to_transform, layers_pattern=None):
    """The layers_to_transform filter (True when it is unset or empty)."""
    if layers_to_transform is None or (
            isinstance(layers_to_transform, (list, tuple)) and len(layers_to_transform) == 0):
        return True
    idx = _layer_index(name, layers_pattern)
    if idx is None:
        return False
    if isinstance(layers_to_transform, int):
        return idx == layers_to_transform
    return idx in layers_to_transform


def pattern_value(patterns, name, default):
    """rank_pattern / alpha_pattern lookup: the first key whose regex matches a "."-suffix of name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_target_config(target_modules, layers_to_transform, layers_pattern):
    """The argument combinations PEFT's LoraConfig rejects."""
    if target_modules is None:
        raise ValueError("target_modules must be given (a list of names, a regex str, or 'all-linear')")
    if isinstance(target_modules, str):  # a regex or "all-linear"
        if layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (regex)")
        if layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a str (regex)")
    else:
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern needs layers_to_transform")


def _linear_names(model, linear_types):
    inner = set()
    names = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inner):
            continue
        if isinstance(mod, QLoRALinear):
            inner.add(name + ".")
        if isinstance(mod, linear_types) and name:
            names.append(name)
    return names


def _output_head_name(model):
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except (NotImplementedError, AttributeError):
        return None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_targets(model, target_modules, layers_to_transform=None, layers_pattern=None,
                 exclude_modules=None, linear_types=(nn.Linear, QLoRALinear)):
    """Names of the modules an adapter with this configuration wraps, in model order. Modules inside
    an adapted layer (its lora_A / lora_B) are never candidates."""
    check_target_config(target_modules, layers_to_transform, layers_pattern)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        head = _output_head_name(model)
        linear = {n for n in _linear_names(model, linear_types) if n != head}
    inner, out = [], []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        if isinstance(mod, QLoRALinear):
            inner.append(name + ".")
        if is_excluded(name, exclude_modules):
            continue
        if all_linear:
            hit = name in linear
        else:
            hit = is_target(name, target_modules, layers_to_transform, layers_pattern)
        if hit:
            out.append(name)
    return out
