"""Adapters in PEFT's on-disk format (PEFT 0.21), adapter_config.json + adapter_model.safetensors.

Each adapter kind maps its own file layout (adapters/<kind>.py, "PEFT file mapping": peft_type,
config fields, the tensors per layer and their shapes); this file reads, checks and writes them
once for every kind:

  LORA     <module>.lora_A.weight [r, K], .lora_B.weight [N, r], .lora_magnitude_vector [N] (DoRA);
           with use_bdlora (BD-LoRA) A [r, K/n] or B [N, r/n]
  VERA     <module>.vera_lambda_b [N], .vera_lambda_d [r]; base_model.vera_A / vera_B (shared)
  ADALORA  <module>.lora_A [k, K], .lora_B [N, k], .lora_E [k, 1]: the k ranks rank_pattern keeps
  LOKR     <module>.lokr_w1 / _w1_a / _w1_b / _w2 / _w2_a / _w2_b: those the config gives the layer
and nf4lora's own, which PEFT refuses (it has no such kinds): MOLORA (mixture of LoRA experts) and
NF4LORA_BLOCKDIAG (apply_qlora(..., lora_blocks=n)). Keys start "base_model.model." (<module> is the
layer's name in the model); the adapter name is not part of them (PEFT strips it).

load_adapter checks the whole file against the model and the config before changing anything: a
missing or unexpected key, a wrong shape or dtype, NaN / Inf, or an r in the config that disagrees
with the tensors is an error that names the key.
"""
import json
import os

import torch

from .._files import atomic_path, atomic_write_text
from ..adapters import FILE_TYPES, KINDS, kind_of
from .adalora import apply_adalora
from .lokr import apply_lokr
from . import modules_to_save as mts
from .model import _check_targets, active_adapters, adapter_configs, apply_qlora, qlora_layers, set_adapter
from .molora import apply_molora
from .targets import find_targets
from .vera import apply_vera

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# each file type's model-level apply_* (the kind's apply_kwargs gives its arguments)
_APPLY = {"LORA": apply_qlora, "NF4LORA_BLOCKDIAG": apply_qlora, "VERA": apply_vera, "ADALORA": apply_adalora,
          "MOLORA": apply_molora, "LOKR": apply_lokr}
if set(_APPLY) != set(FILE_TYPES):  # a kind registered a file type without its apply_* here
    raise RuntimeError(f"lora/io.py _APPLY {sorted(_APPLY)} != adapter file types {sorted(FILE_TYPES)}")


def save_adapter(model, save_directory, adapter_name="default"):
    """Write adapter `adapter_name` as PEFT does: adapter_config.json + adapter_model.safetensors,
    in the file type of its kind (LoRA / DoRA as LORA, VeRA as VERA, AdaLoRA as ADALORA, ...)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; the model has {sorted(configs)}")
    c = configs[adapter_name]
    file_kind = FILE_TYPES[c["peft_type"]]
    layers = {n: layer for n, layer in qlora_layers(model) if adapter_name in layer.lora_config}
    tensors = {}
    for n, layer in layers.items():
        kind = kind_of(layer.lora_config[adapter_name])  # DoRA's layers add their magnitude
        for suffix, t in kind.file_tensors(layer, adapter_name, c, n).items():
            tensors[f"{PREFIX}{n}.{suffix}"] = t
    tensors.update(file_kind.model_file_tensors(layers.values(), adapter_name, c))
    tensors.update(mts.file_tensors(model, adapter_name, PREFIX))  # the copies, under their modules' keys
    config = {**_config_header(model, c["peft_type"]), **file_kind.file_config(c),
              "modules_to_save": c.get("modules_to_save")}
    _write(save_directory, config, tensors)


def _config_header(model, peft_type):
    """The fields every adapter_config.json starts with."""
    mcfg = getattr(model, "config", None)
    return {"peft_type": peft_type, "task_type": None, "inference_mode": True,
            "base_model_name_or_path": getattr(mcfg, "_name_or_path", None) or None}


def _write(save_directory, config, tensors):
    """Each file is written crash-safe (a temporary file, then one rename: a kill leaves the old
    file or the new one). Weights go first, the config last: a run that saves the same adapter
    every N steps always leaves a loadable pair (same config, old or new weights)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    with atomic_path(os.path.join(save_directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write_text(os.path.join(save_directory, CONFIG_NAME),
                      json.dumps(config, indent=2, sort_keys=True))


def _read_config(path):
    cpath = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    with open(cpath, "rb") as f:
        try:
            cfg = json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{cpath} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cpath} must hold a JSON object")
    if cfg.get("peft_type") not in FILE_TYPES:
        raise ValueError(f"{cpath}: peft_type must be one of {sorted(FILE_TYPES)}, got "
                         f"{cfg.get('peft_type')!r}")
    kind = FILE_TYPES[cfg["peft_type"]]
    for field in kind.unsupported:
        if cfg.get(field):  # every supported value is falsy (False, None, [], {})
            raise NotImplementedError(f"{cpath}: {field}={cfg[field]!r} is not supported by nf4lora.load_adapter")
    if cfg.get("bias", "none") != "none":
        raise NotImplementedError(f"{cpath}: bias={cfg['bias']!r} is not supported (only 'none')")
    try:
        kind.check_file_config(cfg)
        mts.check_names(cfg.get("modules_to_save"))
    except ValueError as e:
        raise ValueError(f"{cpath}: {e}") from None
    if cfg.get("target_modules") is None:
        raise ValueError(f"{cpath}: target_modules is missing")
    return cfg


def _read_weights(path):
    st, bin_ = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{st} is not a readable safetensors file: {e}") from None
    if os.path.isfile(bin_):
        try:
            weights = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's unpickler and zip reader raise many types
            raise ValueError(f"{bin_} is not a readable weights-only torch file: {type(e).__name__}: {e}") from None
        if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
            raise ValueError(f"{bin_} must hold a dict of tensors keyed by name")
        return weights
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}) in {path}")


def _module_of(key):
    """(module, suffix) of a file key by the suffixes of every registered kind, or (None, None)."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for kind in KINDS.values():
        for part in kind.parts:
            suffix = kind.suffix(part)
            if body.endswith("." + suffix):
                return body[: -len(suffix) - 1], suffix
    return None, None


def _unexpected(key, layers, peft_type):
    module, suffix = _module_of(key)
    if module is not None and module not in layers:
        return ValueError(f"adapter file key '{key}': module '{module}' is not one that "
                          "adapter_config.json's target_modules select in this model")
    what = ("DoRA magnitude (adapter_config.json has no use_dora) " if "lora_magnitude_vector" in key else
            "embedding LoRA " if "lora_embedding" in key else "")
    return ValueError(f"adapter file has an unexpected {what}key '{key}' for this {peft_type} config and model")


def check_file(cfg, layers, weights, extra=None):
    """Check a read file against the layers it targets ({module: QLoRALinear or nn.Linear}): exactly
    the keys the kind's file mapping gives them (and `extra`, {key: shape}: the modules_to_save
    copies), finite floating tensors of the shapes it gives. Returns {module: {suffix: tensor}} and
    the other tensors {key: tensor}. Changes nothing."""
    kind = FILE_TYPES[cfg["peft_type"]]
    want = {}  # key -> (module, suffix, shape)
    for n, layer in layers.items():
        for suffix, shape in kind.file_shapes(cfg, n, layer.out_features, layer.in_features).items():
            want[f"{PREFIX}{n}.{suffix}"] = (n, suffix, shape)
    dims = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    shared = {**kind.model_file_shapes(cfg, dims, set(weights)), **(extra or {})}
    for key in weights:
        if key not in want and key not in shared:
            raise _unexpected(key, layers, cfg["peft_type"])
    per_layer = {n: {} for n in layers}
    for key, (n, suffix, shape) in list(want.items()) + [(k, (None, None, s)) for k, s in shared.items()]:
        whole = (f" (the state of a module adapter_config.json's modules_to_save={cfg.get('modules_to_save')!r} "
                 "names)") if key in (extra or {}) else ""
        if key not in weights:
            raise KeyError(f"adapter file is missing '{key}'{whole}")
        t = weights[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            got = tuple(getattr(t, "shape", ()))
            hint = kind.shape_hint(cfg, n, suffix, got, shape) if n is not None else whole
            raise ValueError(f"adapter file key '{key}' must be a floating tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t))} {got}{hint}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"adapter file key '{key}' contains NaN or Inf")
        if n is not None:
            per_layer[n][suffix] = t
    return per_layer, {k: weights[k] for k in shared}


def file_targets(model, cfg):
    """The module names an adapter_config.json's target fields select in `model` (PEFT's matching
    rules), checked to be linears the model has."""
    tm = cfg["target_modules"]
    names = find_targets(model, tm, cfg.get("layers_to_transform"), cfg.get("layers_pattern"),
                         cfg.get("exclude_modules"))
    _check_targets(model, names, f"adapter_config.json target_modules={tm!r}")
    return names


def load_adapter(model, path, adapter_name="default", is_trainable=False, blocksize=64,
                 double_quant=True):
    """Load an adapter that PEFT (or save_adapter) wrote into `model` as adapter `adapter_name`.

    The targets come from adapter_config.json with PEFT's matching rules; plain nn.Linear targets are
    quantized to NF4 (blocksize, double_quant) on the way, QLoRALinear ones get the adapter added.
    The first adapter of a model becomes active; is_trainable=False (PEFT's default) freezes it.

    Into an adapter name the model already has (PEFT's way to resume training), the file's weights
    are copied into it after its config is checked against the adapter's (kind, targets, each
    layer's config but its dropout): the adapter keeps its parameters (an optimizer holding them
    sees the loaded values), its active and trainable state."""
    cfg = _read_config(path)
    weights = _read_weights(path)
    kind = FILE_TYPES[cfg["peft_type"]]
    names = file_targets(model, cfg)
    layers = {n: model.get_submodule(n) for n in names}
    whole = mts.resolve(model, cfg.get("modules_to_save") or [])  # modules trained whole (a head)
    if set(whole) & set(names):
        raise ValueError(f"adapter_config.json modules_to_save selects adapter targets {sorted(set(whole) & set(names))}")
    per_layer, shared = check_file(cfg, layers, weights, mts.file_shapes(model, whole, PREFIX))
    if adapter_name in adapter_configs(model):
        _check_existing(model, kind, cfg, names, adapter_name, shared, whole)
    else:
        first = not active_adapters(model)
        _APPLY[cfg["peft_type"]](model, cfg["target_modules"], **kind.apply_kwargs(cfg, is_trainable),
                                 blocksize=blocksize, double_quant=double_quant, adapter_name=adapter_name)
        mts.add_copies(model, whole, adapter_name)
        adapter_configs(model)[adapter_name]["modules_to_save"] = cfg.get("modules_to_save")
        if first:
            set_adapter(model, adapter_name, inference_mode=not is_trainable)
    mts.load_tensors(model, whole, adapter_name, shared, PREFIX)
    layers = {n: model.get_submodule(n) for n in names}  # QLoRALinear now
    for n, layer in layers.items():
        kind_of(layer.lora_config[adapter_name]).load_file_tensors(layer, adapter_name, per_layer[n], cfg, n)
        if layer.merged_adapters:
            layer._remerge()
    kind.load_model_file_tensors(layers.values(), adapter_name, shared)
    adapter_configs(model)[adapter_name].update({f: cfg.get(f, d) for f, d in kind.restored_fields.items()})
    return model


def _check_existing(model, kind, cfg, names, adapter_name, shared, whole):
    """load_adapter into an adapter the model has: its kind, targets, each layer's config (dropout
    aside) and the kind's model-level fields must be the file's; a mismatch is refused before
    anything changes."""
    have = adapter_configs(model)[adapter_name]
    have_type = have["peft_type"]
    if have_type != cfg["peft_type"]:
        raise ValueError(f"adapter {adapter_name!r} is a {have_type} adapter; the file holds {cfg['peft_type']}")
    on = [n for n, layer in qlora_layers(model) if adapter_name in layer.lora_config]
    if sorted(names) != sorted(on):
        raise ValueError(f"adapter {adapter_name!r} exists on modules {sorted(on)} but the file's "
                         f"config targets {sorted(names)}")
    copies = sorted(n for n, w in mts.wrappers(model) if adapter_name in w.modules_to_save)
    if copies != sorted(whole):
        raise ValueError(f"adapter {adapter_name!r} has modules_to_save copies of {copies} but the file's "
                         f"adapter_config.json gives {sorted(whole)}")
    diffs = [kind.model_mismatch(cfg, have, shared)]
    diffs += [model.get_submodule(n).lora_config[adapter_name].mismatch(kind.layer_config(cfg, n))
              for n in names]
    for n, diff in zip([None, *names], diffs):
        if diff is not None:
            field, mine, theirs = diff
            where = "" if n is None else f" on '{n}'"
            raise ValueError(f"adapter {adapter_name!r}{where} has {field}={mine!r} but the file's "
                             f"adapter_config.json gives {theirs!r}")
