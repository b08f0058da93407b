"""Depth-aware ranks: PEFT's `rank_pattern` from a per-depth schedule.

`depth_rank_pattern(model, target_modules, schedule, r)` finds the modules an adapter with these
targets wraps (lora/targets.py, PEFT's rules), reads each one's layer index the way PEFT's
layers_to_transform does (the first `<pattern>.<i>.` in its name, pattern "layers", "h" or "layer"
unless told), turns it into a depth fraction (i + 1) / L in (0, 1] (L = the number of layers of
that stack: modules sharing the name prefix before `<pattern>.<i>.`), and the schedule into a rank.
The result is a rank_pattern keyed by full module names (PEFT and apply_qlora match a key against
a name suffix, so a full name hits exactly that module), plus a report of the trainable-parameter
count against uniform r: sum over targeted linears of r_i * (in_features + out_features).

Schedule: a list of (fraction_upper_bound, rank) pairs with strictly increasing bounds in (0, 1],
the last one 1.0 (a layer takes the rank of the first bound >= its fraction), or a callable
fraction -> rank.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from .targets import find_targets, pattern_value

DEFAULT_SCHEDULE = ((1 / 3, 4), (2 / 3, 8), (1.0, 16))
DEFAULT_LAYERS_PATTERN = ("layers", "h", "layer")
_EPS = 1e-9  # (i + 1) / L against a bound written as 1/3, 2/3 ...


@dataclass
class DepthReport:
    """Trainable LoRA parameters with the depth pattern vs the same targets at uniform r."""
    params: int
    uniform_params: int
    uniform_r: int
    modules: int
    layer_ranks: dict = field(default_factory=dict)  # layer index -> rank (per stack, same schedule)

    @property
    def ratio(self) -> float:
        return self.params / self.uniform_params

    def __str__(self):
        return (f"depth ranks over {self.modules} modules: {self.params:,} trainable parameters vs "
                f"{self.uniform_params:,} at uniform r={self.uniform_r} ({self.ratio:.2f}x); "
                f"rank by layer {self.layer_ranks}")


def _check_rank(what, rank):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{what} must be a positive int, got {rank!r}")
    return rank


def check_schedule(schedule):
    """A list schedule as a tuple of (float bound, int rank), or the callable itself; ValueError
    naming what is wrong otherwise."""
    if callable(schedule):
        return schedule
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ValueError(f"schedule must be a list of (fraction_upper_bound, rank) pairs or a callable "
                         f"depth_fraction -> rank, got {schedule!r}")
    pairs = []
    for item in schedule:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"schedule entries must be (fraction_upper_bound, rank) pairs, got {item!r}")
        bound, rank = item
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) \
                or not 0 < bound <= 1:
            raise ValueError(f"schedule bound must be a depth fraction in (0, 1], got {bound!r}")
        if pairs and bound <= pairs[-1][0]:
            raise ValueError(f"schedule bounds must increase strictly, got {bound!r} after {pairs[-1][0]!r}")
        pairs.append((float(bound), _check_rank("schedule rank", rank)))
    if not pairs:
        raise ValueError("schedule must not be empty")
    if pairs[-1][0] != 1.0:
        raise ValueError(f"the last schedule bound must be 1.0 (the top layer), got {pairs[-1][0]!r}")
    return tuple(pairs)


def _rank_at(schedule, frac):
    if callable(schedule):
        return _check_rank(f"schedule({frac:g})", schedule(frac))
    return next(rank for bound, rank in schedule if frac <= bound + _EPS)


def _stack_and_index(name, patterns):
    """(stack prefix, layer index) of the first `<pattern>.<i>.` in name (PEFT's layers_to_transform
    rule, patterns tried in order), or None."""
    for p in patterns:
        m = re.match(rf"(?P<stack>^|.*?\.){p}\.(?P<idx>\d+)\.", name)
        if m is not None:
            return m.group("stack") + p, int(m.group("idx"))
    return None


def _features(name, mod):
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):  # nn.Linear, QLoRALinear
        return mod.in_features, mod.out_features
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # transformers' GPT-2 layer
        return w.shape[0], w.shape[1]
    raise ValueError(f"target '{name}' is a {type(mod).__name__}, not a linear layer")


def depth_rank_pattern(model: nn.Module, target_modules, schedule=DEFAULT_SCHEDULE, r: int = 8, *,
                       layers_pattern=DEFAULT_LAYERS_PATTERN, exclude_modules=None):
    """(rank_pattern, DepthReport): PEFT's rank_pattern giving each targeted module the schedule's
    rank at its depth, and the trainable-parameter count against uniform `r`. Pass the pattern to
    `apply_qlora(model, target_modules, r=r, rank_pattern=pattern)` or PEFT's LoraConfig. The model
    is only read; the schedule and `r` are checked before it is."""
    schedule = check_schedule(schedule)
    _check_rank("r", r)
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"layers_pattern must be a non-empty str or list of str, got {layers_pattern!r}")

    depth = {}  # stack -> number of layers, from every module of the model
    for name, _ in model.named_modules():
        hit = _stack_and_index(name, patterns)
        if hit is not None:
            depth[hit[0]] = max(depth.get(hit[0], 0), hit[1] + 1)
    names = find_targets(model, target_modules, exclude_modules=exclude_modules)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model")
    pattern, layer_ranks = {}, {}
    params = uniform = 0
    for name in names:
        hit = _stack_and_index(name, patterns)
        if hit is None:
            raise ValueError(f"target '{name}' has no layer number ({' / '.join(p + '.<i>' for p in patterns)} "
                             "in its name): depth-aware ranks need numbered layers (set layers_pattern, "
                             "or exclude it with exclude_modules)")
        stack, idx = hit
        rank = _rank_at(schedule, (idx + 1) / depth[stack])
        fan_in, fan_out = _features(name, model.get_submodule(name))
        pattern[name] = rank
        layer_ranks[idx] = rank
        params += rank * (fan_in + fan_out)
        uniform += r * (fan_in + fan_out)
    for name in names:  # a key is a regex ("." matches any character): make sure each hits its own
        if pattern_value(pattern, name, None) != pattern[name]:
            pattern = {re.escape(k): v for k, v in pattern.items()}
            break
    report = DepthReport(params, uniform, r, len(names), dict(sorted(layer_ranks.items())))
    return pattern, report
