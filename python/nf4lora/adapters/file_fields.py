"""Checks of adapter_config.json fields (JSON as PEFT writes it), shared by the kinds' file
mappings. Each raises ValueError naming the field; lora/io.py prefixes the file's path. JSON of the
wrong type is an error here, not a failure deep inside model surgery."""
import math
import re


def is_number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def positive_int(cfg, field, default):
    v = cfg.get(field, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{field} must be a positive int, got {v!r}")


def boolean(cfg, field):
    if not isinstance(cfg.get(field, False), bool):
        raise ValueError(f"{field} must be true or false, got {cfg[field]!r}")


def number(cfg, field, default):
    if not is_number(cfg.get(field, default)):
        raise ValueError(f"{field} must be a finite number, got {cfg[field]!r}")


def integer(cfg, field, default):
    v = cfg.get(field, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{field} must be an int, got {v!r}")


def _regex(field, pattern):
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field} holds an invalid regular expression {pattern!r}: {e}") from None


def common(cfg):
    """The target fields every kind reads, and any dropout field."""
    for field, what in (("target_modules", "a string or a list of strings"),
                        ("exclude_modules", "null, a string or a list of strings")):
        v = cfg.get(field)
        if v is None:
            continue
        if isinstance(v, str):
            _regex(field, v)
        elif not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise ValueError(f"{field} must be {what}, got {v!r}")
    lt = cfg.get("layers_to_transform")
    if lt is not None:
        items = lt if isinstance(lt, list) else [lt]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in items):
            raise ValueError(f"layers_to_transform must be null, a layer index or a list of them, got {lt!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(x, str) for x in lp))):
        raise ValueError(f"layers_pattern must be null, a string or a list of strings, got {lp!r}")
    for field in ("lora_dropout", "vera_dropout", "rank_dropout", "module_dropout"):
        p = cfg.get(field, 0.0)
        if p is not None and not (is_number(p) and 0.0 <= p < 1.0):
            raise ValueError(f"{field} must be a number in [0, 1), got {p!r}")


def pattern(cfg, field, ok, what):
    """A PEFT rank_pattern / alpha_pattern: {module regex: value}."""
    pat = cfg.get(field)
    if pat is None:
        return
    if not isinstance(pat, dict):
        raise ValueError(f"{field} must be a JSON object (module regex -> {what}), got {pat!r}")
    for k, v in pat.items():
        _regex(field, k)
        if not ok(v):
            raise ValueError(f"{field}[{k!r}] must be {what}, got {v!r}")


def rank_alpha_patterns(cfg):
    pattern(cfg, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "a positive int")
    pattern(cfg, "alpha_pattern", is_number, "a finite number")


def targets_record(c):
    """The target fields of a model-level config as adapter_config.json carries them."""
    return {k: c.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")}
