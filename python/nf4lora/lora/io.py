"""Adapters in PEFT's on-disk format (PEFT 0.21), adapter_config.json + adapter_model.safetensors:

  LORA     base_model.model.<module>.lora_A.weight [r, in_features]
           base_model.model.<module>.lora_B.weight [out_features, r]
           base_model.model.<module>.lora_magnitude_vector [out_features]      (use_dora)
  VERA     base_model.model.<module>.vera_lambda_b [out_features], .vera_lambda_d [r]
           base_model.vera_A [r, in_max], base_model.vera_B [out_max, r]        (save_projection)
  ADALORA  base_model.model.<module>.lora_A [k, in], .lora_B [out, k], .lora_E [k, 1]: the k ranks
           the config's rank_pattern keeps (all init_r without one)
  LOKR     base_model.model.<module>.lokr_w1 [a, c] (or .lokr_w1_a [a, r], .lokr_w1_b [r, c]) and
           .lokr_w2 [b, d] (or .lokr_w2_a [b, r], .lokr_w2_b [r, d]): adapters/lokr.py

and one layout of nf4lora's own, which PEFT cannot load (it has no such kind; its loader refuses the
unknown peft_type rather than dropping the blocks):
  NF4LORA_BLOCKDIAG  (apply_qlora(..., lora_blocks=n)) LORA's config fields plus "lora_blocks": n;
           base_model.model.<module>.lora_block_A [n, r/n, in/n], .lora_block_B [n, out/n, r/n]

The adapter name is not part of the keys (PEFT strips it). load_adapter checks the whole file
against the model and the config before changing anything: a missing or unexpected key, a wrong
shape, or an r in the config that disagrees with the tensors is an error that names the key.
"""
import json
import math
import os
import re

import torch

from .._files import atomic_path, atomic_write_text
from ..adapters.blockdiag import BlockDiagLoRA, check_blocks
from ..adapters.lokr import PARTS as LOKR_PARTS
from ..adapters.lokr import lokr_shapes
from .adalora import apply_adalora
from .lokr import apply_lokr, check_lokr_dropout
from .model import (BLOCKDIAG_TYPE, _check_targets, active_adapters, adapter_configs, apply_qlora,
                    model_adapters, qlora_layers, set_adapter)
from .targets import find_targets, pattern_value
from .vera import apply_vera, vera_projections

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# config fields nf4lora does not implement, per peft_type (each has a falsy default)
_UNSUPPORTED = {
    "LORA": ("fan_in_fan_out", "lora_bias", "modules_to_save", "target_parameters", "layer_replication",
             "use_qalora", "trainable_token_indices", "alora_invocation_tokens"),
    "VERA": ("fan_in_fan_out", "modules_to_save"),
    "ADALORA": ("fan_in_fan_out", "modules_to_save", "use_dora"),
    "MOLORA": ("fan_in_fan_out", "modules_to_save", "use_dora"),
    "LOKR": ("modules_to_save", "use_effective_conv2d"),
    BLOCKDIAG_TYPE: ("fan_in_fan_out", "modules_to_save", "use_dora"),
}
BLOCK_PARTS = BlockDiagLoRA.parts


MAGNITUDE = "lora_magnitude_vector"
VERA_PARTS = ("vera_lambda_b", "vera_lambda_d")
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


def _key(module, which):
    # PEFT writes DoRA's magnitude without the ".weight" of the parameter it loads into
    return f"{PREFIX}{module}.{which}" + ("" if which == MAGNITUDE else ".weight")


def save_adapter(model, save_directory, adapter_name="default"):
    """Write adapter `adapter_name` as PEFT does: adapter_config.json + adapter_model.safetensors
    (a LoRA/DoRA adapter as peft_type LORA, a VeRA adapter as VERA, an AdaLoRA one as ADALORA)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; the model has {sorted(configs)}")
    c = configs[adapter_name]
    if c.get("peft_type") == "VERA":
        return _save_vera(model, save_directory, adapter_name, c)
    if c.get("peft_type") == "ADALORA":
        return _save_adalora(model, save_directory, adapter_name, c)
    if c.get("peft_type") == "MOLORA":  # nf4lora's own layout (PEFT has no mixture of LoRA experts)
        from .molora import molora_file_config, molora_tensors
        return _write(save_directory, {**_config_header(model, "MOLORA"), **molora_file_config(c)},
                      molora_tensors(model, adapter_name))
    if c.get("peft_type") == "LOKR":
        return _save_lokr(model, save_directory, adapter_name, c)
    if c.get("peft_type") == BLOCKDIAG_TYPE:
        return _write(save_directory, {**_lora_config(model, c, BLOCKDIAG_TYPE), "lora_blocks": c["lora_blocks"]},
                      _layer_tensors(model, adapter_name, BLOCK_PARTS))
    tensors = {}
    for name, layer in qlora_layers(model):
        if adapter_name in layer.lora_config:
            dora = layer.lora_config[adapter_name]["use_dora"]
            for which in ("lora_A", "lora_B") + ((MAGNITUDE,) if dora else ()):
                w = getattr(layer, which)[adapter_name].weight
                tensors[_key(name, which)] = w.detach().cpu().contiguous().clone()
    _write(save_directory, _lora_config(model, c, "LORA"), tensors)


def _lora_config(model, c, peft_type):
    """adapter_config.json of a LoRA / DoRA (or block-diagonal) adapter."""
    return {
        **_config_header(model, peft_type),
        "r": c["r"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
        "target_modules": c["target_modules"], "exclude_modules": c["exclude_modules"],
        "layers_to_transform": c["layers_to_transform"], "layers_pattern": c["layers_pattern"],
        "rank_pattern": c["rank_pattern"], "alpha_pattern": c["alpha_pattern"],
        "use_rslora": c["use_rslora"], "bias": "none", "fan_in_fan_out": False,
        "use_dora": c.get("use_dora", False),
        "modules_to_save": None, "init_lora_weights": c["init_lora_weights"],
    }


def _layer_tensors(model, adapter_name, parts):
    """{base_model.model.<module>.<part>: tensor} for every part (a ParameterDict container) the
    adapter has in each layer."""
    tensors = {}
    for name, layer in qlora_layers(model):
        for which in parts:
            box = getattr(layer, which)
            if adapter_name in box:
                tensors[f"{PREFIX}{name}.{which}"] = box[adapter_name].detach().cpu().contiguous().clone()
    return tensors


def _copy_parts(model, names, adapter_name, weights, parts):
    """The file's tensors into the adapter's parts (ParameterDicts) of the layers `names`."""
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            for which in parts:
                box = getattr(layer, which)
                if adapter_name in box:
                    box[adapter_name].copy_(weights[f"{PREFIX}{n}.{which}"])


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


ADALORA_PARTS = ("lora_A", "lora_B", "lora_E")


def _save_adalora(model, save_directory, adapter_name, c):
    """PEFT's ADALORA files: <module>.lora_A [k, K], .lora_B [N, k], .lora_E [k, 1] holding only the
    k ranks the rank_pattern keeps (all init_r before the first allocation)."""
    tensors = {}
    pattern = c.get("rank_pattern")
    for name, layer in qlora_layers(model):
        if adapter_name in layer.lora_E:
            keep = torch.tensor(pattern[f"{name}.lora_E"]) if pattern else \
                torch.ones(layer.lora_config[adapter_name]["r"], dtype=torch.bool)
            A, B = layer.lora_A[adapter_name].weight.detach().cpu(), layer.lora_B[adapter_name].weight.detach().cpu()
            E = layer.lora_E[adapter_name].detach().cpu()
            for which, t in (("lora_A", A[keep]), ("lora_B", B[:, keep]), ("lora_E", E[keep])):
                tensors[f"{PREFIX}{name}.{which}"] = t.contiguous().clone()
    config = {
        **_config_header(model, "ADALORA"),
        "r": 8, "init_r": c["init_r"], "target_r": c["target_r"], "lora_alpha": c["lora_alpha"],
        "lora_dropout": c["lora_dropout"], "tinit": c["tinit"], "tfinal": c["tfinal"],
        "deltaT": c["deltaT"], "beta1": c["beta1"], "beta2": c["beta2"],
        "orth_reg_weight": c["orth_reg_weight"], "total_step": c["total_step"], "rank_pattern": pattern,
        "target_modules": c["target_modules"], "exclude_modules": c["exclude_modules"],
        "layers_to_transform": c["layers_to_transform"], "layers_pattern": c["layers_pattern"],
        "init_lora_weights": c["init_lora_weights"], "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "use_rslora": False, "modules_to_save": None,
    }
    _write(save_directory, config, tensors)


def _save_vera(model, save_directory, adapter_name, c):
    """PEFT's VERA files: <module>.vera_lambda_b / .vera_lambda_d, and with save_projection the
    shared base_model.vera_A / base_model.vera_B."""
    tensors = _layer_tensors(model, adapter_name, VERA_PARTS)
    if c["save_projection"]:
        A, B = vera_projections(model, adapter_name)
        tensors[VERA_A], tensors[VERA_B] = A.cpu().contiguous().clone(), B.cpu().contiguous().clone()
    config = {
        **_config_header(model, "VERA"),
        "r": c["r"], "target_modules": c["target_modules"], "projection_prng_key": c["projection_prng_key"],
        "save_projection": c["save_projection"], "vera_dropout": c["vera_dropout"],
        "d_initial": c["d_initial"], "init_weights": c["init_weights"], "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None,
        "layers_to_transform": c["layers_to_transform"], "layers_pattern": c["layers_pattern"],
    }
    _write(save_directory, config, tensors)


def _save_lokr(model, save_directory, adapter_name, c):
    """PEFT's LOKR files: <module>.lokr_w1 / _w1_a / _w1_b / _w2 / _w2_a / _w2_b, those the layer has."""
    config = {
        **_config_header(model, "LOKR"),
        "r": c["r"], "alpha": c["alpha"], "rank_dropout": 0.0, "module_dropout": 0.0,
        "rank_dropout_scale": False, "use_effective_conv2d": False, "decompose_both": c["decompose_both"],
        "decompose_factor": c["decompose_factor"], "init_weights": c["init_weights"],
        "target_modules": c["target_modules"], "exclude_modules": c["exclude_modules"],
        "layers_to_transform": c["layers_to_transform"], "layers_pattern": c["layers_pattern"],
        "rank_pattern": c["rank_pattern"], "alpha_pattern": c["alpha_pattern"], "modules_to_save": None,
    }
    _write(save_directory, config, _layer_tensors(model, adapter_name, LOKR_PARTS))


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
    if cfg.get("peft_type") not in _CHECK_FIELDS:
        raise ValueError(f"{cpath}: peft_type must be one of {sorted(_CHECK_FIELDS)}, got "
                         f"{cfg.get('peft_type')!r}")
    for field in _UNSUPPORTED[cfg["peft_type"]]:
        if cfg.get(field):  # every supported value is falsy (False, None, [], {})
            raise NotImplementedError(f"{cpath}: {field}={cfg[field]!r} is not supported by nf4lora.load_adapter")
    if cfg.get("bias", "none") != "none":
        raise NotImplementedError(f"{cpath}: bias={cfg['bias']!r} is not supported (only 'none')")
    _CHECK_FIELDS[cfg["peft_type"]](cpath, cfg)
    if cfg.get("target_modules") is None:
        raise ValueError(f"{cpath}: target_modules is missing")
    return cfg


def _positive_int(cpath, cfg, field, default):
    v = cfg.get(field, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{cpath}: {field} must be a positive int, got {v!r}")


def _is_number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _check_regex(cpath, field, pattern):
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{cpath}: {field} holds an invalid regular expression {pattern!r}: {e}") from None


def _check_common_fields(cpath, cfg):
    """Types of the fields every adapter kind reads (JSON of the wrong type is an error naming the
    field, not a failure deep inside model surgery)."""
    for field, what in (("target_modules", "a string or a list of strings"),
                        ("exclude_modules", "null, a string or a list of strings")):
        v = cfg.get(field)
        if v is None:
            continue
        if isinstance(v, str):
            _check_regex(cpath, field, v)
        elif not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise ValueError(f"{cpath}: {field} must be {what}, got {v!r}")
    lt = cfg.get("layers_to_transform")
    if lt is not None:
        items = lt if isinstance(lt, list) else [lt]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in items):
            raise ValueError(f"{cpath}: layers_to_transform must be null, a layer index or a list of them, "
                             f"got {lt!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(x, str) for x in lp))):
        raise ValueError(f"{cpath}: layers_pattern must be null, a string or a list of strings, got {lp!r}")
    for field in ("lora_dropout", "vera_dropout"):
        p = cfg.get(field, 0.0)
        if p is not None and not (_is_number(p) and 0.0 <= p < 1.0):
            raise ValueError(f"{cpath}: {field} must be a number in [0, 1), got {p!r}")


def _check_pattern(cpath, cfg, field, ok, what):
    pat = cfg.get(field)
    if pat is None:
        return
    if not isinstance(pat, dict):
        raise ValueError(f"{cpath}: {field} must be a JSON object (module regex -> {what}), got {pat!r}")
    for k, v in pat.items():
        _check_regex(cpath, field, k)
        if not ok(v):
            raise ValueError(f"{cpath}: {field}[{k!r}] must be {what}, got {v!r}")


def _check_lora_fields(cpath, cfg):
    _check_common_fields(cpath, cfg)
    _positive_int(cpath, cfg, "r", 8)
    for field in ("use_dora", "use_rslora"):
        if not isinstance(cfg.get(field, False), bool):
            raise ValueError(f"{cpath}: {field} must be true or false, got {cfg[field]!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise ValueError(f"{cpath}: lora_alpha must be a finite number, got {alpha!r}")
    _check_pattern(cpath, cfg, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "a positive int")
    _check_pattern(cpath, cfg, "alpha_pattern", _is_number, "a finite number")


def _check_vera_fields(cpath, cfg):
    _check_common_fields(cpath, cfg)
    _positive_int(cpath, cfg, "r", 256)
    key = cfg.get("projection_prng_key", 0)
    if isinstance(key, bool) or not isinstance(key, int):
        raise ValueError(f"{cpath}: projection_prng_key must be an int, got {key!r}")


def _check_adalora_fields(cpath, cfg):
    _check_common_fields(cpath, cfg)
    _positive_int(cpath, cfg, "init_r", 12)
    _positive_int(cpath, cfg, "target_r", 8)
    rp = cfg.get("rank_pattern")
    if rp is not None and not (isinstance(rp, dict) and all(
            isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in rp.values())):
        raise ValueError(f"{cpath}: rank_pattern must map module keys to lists of booleans")


def _check_molora_fields(cpath, cfg):
    _check_common_fields(cpath, cfg)
    _positive_int(cpath, cfg, "r", 8)
    _positive_int(cpath, cfg, "num_experts", 4)
    top_k = cfg.get("top_k")
    if top_k is not None:
        _positive_int(cpath, cfg, "top_k", 1)
    for field in ("lora_alpha", "router_aux_loss_coef"):
        if field in cfg and not _is_number(cfg[field]):
            raise ValueError(f"{cpath}: {field} must be a finite number, got {cfg[field]!r}")


def _check_lokr_fields(cpath, cfg):
    _check_common_fields(cpath, cfg)
    _positive_int(cpath, cfg, "r", 8)
    if not _is_number(cfg.get("alpha", 8)):
        raise ValueError(f"{cpath}: alpha must be a finite number, got {cfg['alpha']!r}")
    if not isinstance(cfg.get("decompose_both", False), bool):
        raise ValueError(f"{cpath}: decompose_both must be true or false, got {cfg['decompose_both']!r}")
    f = cfg.get("decompose_factor", -1)
    if isinstance(f, bool) or not isinstance(f, int):
        raise ValueError(f"{cpath}: decompose_factor must be an int, got {f!r}")
    try:
        check_lokr_dropout(cfg.get("rank_dropout", 0.0), cfg.get("module_dropout", 0.0))
    except ValueError as e:
        raise ValueError(f"{cpath}: {e}") from None
    _check_pattern(cpath, cfg, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "a positive int")
    _check_pattern(cpath, cfg, "alpha_pattern", _is_number, "a finite number")


def _check_blockdiag_fields(cpath, cfg):
    _check_lora_fields(cpath, cfg)
    n = cfg.get("lora_blocks")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{cpath}: lora_blocks must be an int >= 2, got {n!r}")


_CHECK_FIELDS = {"LORA": _check_lora_fields, "VERA": _check_vera_fields, "ADALORA": _check_adalora_fields,
                 "MOLORA": _check_molora_fields, "LOKR": _check_lokr_fields,
                 BLOCKDIAG_TYPE: _check_blockdiag_fields}


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


def _split_key(key):
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for which, suffix in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"),
                          (MAGNITUDE, f".{MAGNITUDE}")):
        if body.endswith(suffix):
            return body[: -len(suffix)], which
    return None, None


def _validate(model, cfg, names, weights):
    """Every key expected, present, of the right shape; nothing extra."""
    ranks = {n: pattern_value(cfg.get("rank_pattern"), n, cfg.get("r", 8)) for n in names}
    dora = bool(cfg.get("use_dora", False))
    by_module = {}
    for key, t in weights.items():
        module, which = _split_key(key)
        if module is None or (which == MAGNITUDE and not dora):
            kind = ("DoRA magnitude (adapter_config.json has no use_dora)" if MAGNITUDE in key else
                    "embedding LoRA" if "lora_embedding" in key else "non-LoRA")
            raise ValueError(f"adapter file has an unexpected {kind} key '{key}'")
        if module not in ranks:
            raise ValueError(f"adapter file key '{key}': module '{module}' is not one that "
                             "adapter_config.json's target_modules select in this model")
        dim = 1 if which == MAGNITUDE else 2
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dim:
            raise ValueError(f"adapter file key '{key}' must be a {dim}-D floating tensor, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        by_module.setdefault(module, {})[which] = (key, t)
    for n in names:
        layer = model.get_submodule(n)
        r = ranks[n]
        want = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        if dora:
            want[MAGNITUDE] = (layer.out_features,)
        got = by_module.get(n, {})
        for which, shape in want.items():
            if which not in got:
                raise KeyError(f"adapter file is missing '{_key(n, which)}'")
            key, t = got[which]
            if tuple(t.shape) != shape:
                hint = ""
                if which != MAGNITUDE:
                    rdim = 0 if which == "lora_A" else 1
                    fdim = 1 - rdim
                    if t.shape[fdim] == shape[fdim]:
                        hint = (f" (adapter_config.json gives r={r} for '{n}' but the tensor has rank "
                                f"{t.shape[rdim]})")
                raise ValueError(f"adapter file key '{key}' has shape {tuple(t.shape)}, expected "
                                 f"{shape}{hint}")
        if not all(bool(torch.isfinite(got[w][1]).all()) for w in want):
            raise ValueError(f"adapter weights for '{n}' contain NaN or Inf")
    return by_module


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
    """Load a LoRA adapter that PEFT (or save_adapter) wrote into `model` as adapter `adapter_name`.

    The targets come from adapter_config.json with PEFT's matching rules; plain nn.Linear targets are
    quantized to NF4 (blocksize, double_quant) on the way, QLoRALinear ones get the adapter added.
    The first adapter of a model becomes active; is_trainable=False (PEFT's default) freezes it.

    Into an adapter name the model already has (LoRA / DoRA; PEFT's way to resume training), the
    file's weights are copied into it after its config is checked against the adapter's (kind,
    targets, per-layer rank and alpha, rslora): the adapter keeps its parameters (an optimizer
    holding them sees the loaded values), its active and trainable state."""
    cfg = _read_config(path)
    weights = _read_weights(path)
    if adapter_name in adapter_configs(model):
        return _load_into_existing(model, cfg, weights, adapter_name)
    if cfg["peft_type"] == "VERA":
        return _load_vera(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant)
    if cfg["peft_type"] == "ADALORA":
        return _load_adalora(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant)
    if cfg["peft_type"] == "MOLORA":
        from .molora import load_molora
        return load_molora(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant)
    if cfg["peft_type"] in (BLOCKDIAG_TYPE, "LOKR"):
        return _load_parts(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant)
    tm = cfg["target_modules"]
    names = file_targets(model, cfg)
    by_module = _validate(model, cfg, names, weights)
    first = not active_adapters(model)
    apply_qlora(model, tm, r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8),
                lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                layers_to_transform=cfg.get("layers_to_transform"),
                layers_pattern=cfg.get("layers_pattern"), rank_pattern=cfg.get("rank_pattern"),
                alpha_pattern=cfg.get("alpha_pattern"), use_rslora=bool(cfg.get("use_rslora", False)),
                init_lora_weights=True, exclude_modules=cfg.get("exclude_modules"),
                blocksize=blocksize, double_quant=double_quant, adapter_name=adapter_name,
                use_dora=bool(cfg.get("use_dora", False)))
    _copy_lora_weights(model, by_module, adapter_name)
    adapter_configs(model)[adapter_name]["init_lora_weights"] = cfg.get("init_lora_weights", True)
    if first:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return model


def _load_into_existing(model, cfg, weights, adapter_name):
    """load_adapter into an adapter the model has: check, then copy in place."""
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"adapter {adapter_name!r} already exists; loading a {cfg['peft_type']} file "
                         "into an existing adapter is supported for LoRA / DoRA only (delete_adapter "
                         "first, or load under another name)")
    names = file_targets(model, cfg)
    have = [n for n, layer in qlora_layers(model) if adapter_name in layer.lora_config]
    if sorted(names) != sorted(have):
        raise ValueError(f"adapter {adapter_name!r} exists on modules {sorted(have)} but the file's "
                         f"config targets {sorted(names)}")
    for n in names:
        c = model.get_submodule(n).lora_config[adapter_name]
        want = {"kind": "dora" if cfg.get("use_dora", False) else "lora",
                "r": pattern_value(cfg.get("rank_pattern"), n, cfg.get("r", 8)),
                "lora_alpha": pattern_value(cfg.get("alpha_pattern"), n, cfg.get("lora_alpha", 8)),
                "use_rslora": bool(cfg.get("use_rslora", False))}
        for field, v in want.items():
            if c[field] != v:
                raise ValueError(f"adapter {adapter_name!r} on '{n}' has {field}={c[field]!r} but the "
                                 f"file's adapter_config.json gives {v!r}")
    _copy_lora_weights(model, _validate(model, cfg, names, weights), adapter_name)
    return model


def _copy_lora_weights(model, by_module, adapter_name):
    """_validate's {module: {part: (key, tensor)}} into adapter `adapter_name`'s parameters, in
    place; a merged layer re-merges."""
    with torch.no_grad():
        for n, parts in by_module.items():
            layer = model.get_submodule(n)
            for which, (_, t) in parts.items():
                getattr(layer, which)[adapter_name].weight.copy_(t)
            if layer.merged_adapters:
                layer._remerge()


def _check_exact(weights, want, kind):
    """The file holds exactly the keys in `want` (key -> shape), finite floating tensors."""
    for key in weights:
        if key not in want:
            raise ValueError(f"adapter file has an unexpected key '{key}' for this {kind} config and model")
    for key, shape in want.items():
        if key not in weights:
            raise KeyError(f"adapter file is missing '{key}'")
        t = weights[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            raise ValueError(f"adapter file key '{key}' must be a floating tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"adapter file key '{key}' contains NaN or Inf")


def _load_vera(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant):
    """A PEFT VERA adapter: every target's lambdas present with the right shapes, projections (if
    the file has them) of the shapes the targets need; nothing else in the file."""
    tm, r = cfg["target_modules"], cfg.get("r", 256)
    names = file_targets(model, cfg)
    layers = {n: model.get_submodule(n) for n in names}
    want = {}
    for n, layer in layers.items():
        want[f"{PREFIX}{n}.vera_lambda_b"] = (layer.out_features,)
        want[f"{PREFIX}{n}.vera_lambda_d"] = (r,)
    proj = {VERA_A: (r, max(m.in_features for m in layers.values())),
            VERA_B: (max(m.out_features for m in layers.values()), r)}
    has_proj = VERA_A in weights or VERA_B in weights
    if has_proj:
        want.update(proj)
    _check_exact(weights, want, "VERA")
    first = not active_adapters(model)
    apply_vera(model, tm, r=r, projection_prng_key=cfg.get("projection_prng_key", 0),
               vera_dropout=cfg.get("vera_dropout", 0.0) or 0.0, d_initial=cfg.get("d_initial", 0.1),
               init_weights=True, save_projection=bool(cfg.get("save_projection", True)),
               layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
               exclude_modules=cfg.get("exclude_modules"), blocksize=blocksize, double_quant=double_quant,
               adapter_name=adapter_name)
    if has_proj:  # the file's projections replace the regenerated ones (PEFT loads them too)
        shared = model_adapters(model).vera[adapter_name]
        with torch.no_grad():
            shared.A.copy_(weights[VERA_A])
            shared.B.copy_(weights[VERA_B])
    _copy_parts(model, layers, adapter_name, weights, VERA_PARTS)
    adapter_configs(model)[adapter_name]["init_weights"] = cfg.get("init_weights", True)
    if first:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return model


def _load_adalora(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant):
    """A PEFT ADALORA adapter: per target, lora_A/B/E holding the ranks its rank_pattern keeps
    (all init_r without one); they go back to their positions in init_r-sized tensors, the pruned
    ranks zero (E = 0 is what pruning means), so the scaling alpha / init_r stays PEFT's."""
    tm, init_r = cfg["target_modules"], cfg.get("init_r", 12)
    pattern = cfg.get("rank_pattern")
    names = file_targets(model, cfg)
    if pattern is not None:
        extra = set(pattern) - {f"{n}.lora_E" for n in names}
        if extra:
            raise ValueError(f"adapter_config.json rank_pattern names modules the config does not target: "
                             f"{sorted(extra)[:3]}")
    keep, want = {}, {}
    for n in names:
        layer = model.get_submodule(n)
        mask = pattern.get(f"{n}.lora_E") if pattern is not None else None
        if mask is None:
            mask = [True] * init_r
        if len(mask) != init_r:
            raise ValueError(f"adapter_config.json rank_pattern['{n}.lora_E'] has {len(mask)} entries, "
                             f"init_r is {init_r}")
        keep[n] = torch.tensor(mask, dtype=torch.bool)
        k = int(keep[n].sum())
        want[f"{PREFIX}{n}.lora_A"] = (k, layer.in_features)
        want[f"{PREFIX}{n}.lora_B"] = (layer.out_features, k)
        want[f"{PREFIX}{n}.lora_E"] = (k, 1)
    _check_exact(weights, want, "ADALORA")
    first = not active_adapters(model)
    apply_adalora(model, tm, init_r=init_r, target_r=cfg.get("target_r", 8),
                  lora_alpha=cfg.get("lora_alpha", 8), lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                  tinit=cfg.get("tinit", 0), tfinal=cfg.get("tfinal", 0), deltaT=cfg.get("deltaT", 1),
                  beta1=cfg.get("beta1", 0.85), beta2=cfg.get("beta2", 0.85),
                  orth_reg_weight=cfg.get("orth_reg_weight", 0.5), total_step=cfg.get("total_step"),
                  layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                  exclude_modules=cfg.get("exclude_modules"), blocksize=blocksize, double_quant=double_quant,
                  adapter_name=adapter_name, inference_mode=not is_trainable)
    with torch.no_grad():
        for n in names:
            layer, m = model.get_submodule(n), keep[n]
            A, B, E = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, layer.lora_E[adapter_name]
            A.zero_(), B.zero_(), E.zero_()
            A[m] = weights[f"{PREFIX}{n}.lora_A"].to(A.dtype)
            B[:, m] = weights[f"{PREFIX}{n}.lora_B"].to(B.dtype)
            E[m] = weights[f"{PREFIX}{n}.lora_E"].to(E.dtype)
    c = adapter_configs(model)[adapter_name]
    c["rank_pattern"] = pattern
    c["init_lora_weights"] = cfg.get("init_lora_weights", True)
    if first:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return model


def _expected_parts(layer, cfg, n):
    """{part: shape} of a block-diagonal or LoKr adapter on `layer` (module name n) under cfg."""
    r = pattern_value(cfg.get("rank_pattern"), n, cfg.get("r", 8))
    K, N = layer.in_features, layer.out_features
    if cfg["peft_type"] == BLOCKDIAG_TYPE:
        b = cfg["lora_blocks"]
        check_blocks(b, r, K, N, f" of '{n}'")
        return {"lora_block_A": (b, r // b, K // b), "lora_block_B": (b, N // b, r // b)}
    (a, b), (c, d), use_w1, use_w2 = lokr_shapes(N, K, r, cfg.get("decompose_both", False),
                                                 cfg.get("decompose_factor", -1))
    want = {"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    want.update({"lokr_w2": (b, d)} if use_w2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
    return want


def _load_parts(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant):
    """A LOKR (PEFT's) or NF4LORA_BLOCKDIAG (nf4lora's) adapter: exactly the parts each target needs
    under the config, of their shapes; then the model-level apply_* with the file's config, and the
    weights copied in."""
    tm = cfg["target_modules"]
    names = file_targets(model, cfg)
    want = {f"{PREFIX}{n}.{part}": shape for n in names
            for part, shape in _expected_parts(model.get_submodule(n), cfg, n).items()}
    _check_exact(weights, want, cfg["peft_type"])
    first = not active_adapters(model)
    common = dict(rank_pattern=cfg.get("rank_pattern"), alpha_pattern=cfg.get("alpha_pattern"),
                  layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                  exclude_modules=cfg.get("exclude_modules"), blocksize=blocksize, double_quant=double_quant,
                  adapter_name=adapter_name)
    if cfg["peft_type"] == "LOKR":
        apply_lokr(model, tm, r=cfg.get("r", 8), alpha=cfg.get("alpha", 8),
                   decompose_both=cfg.get("decompose_both", False),
                   decompose_factor=cfg.get("decompose_factor", -1), **common)
        adapter_configs(model)[adapter_name]["init_weights"] = cfg.get("init_weights", True)
        parts = LOKR_PARTS
    else:
        apply_qlora(model, tm, r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8),
                    lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                    use_rslora=bool(cfg.get("use_rslora", False)), lora_blocks=cfg["lora_blocks"], **common)
        adapter_configs(model)[adapter_name]["init_lora_weights"] = cfg.get("init_lora_weights", True)
        parts = BLOCK_PARTS
    _copy_parts(model, names, adapter_name, weights, parts)
    if first:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return model
