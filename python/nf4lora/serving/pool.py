"""AdapterPool: many LoRA / DoRA adapters over one NF4 model, kept in per-layer pool tensors and
served as a mixed batch with one multi_lora_linear call per layer (S-LoRA style).

Per QLoRALinear the pool keeps A [E, r_max, K], B [E, N, r_max], scalings [E] (E slots, shared by
all layers; a slot's adapter is zero in the layers it does not target, and those rows run as
base there), plus DoRA's row scale m / ||W + s B A||_row [E, N] computed once when the adapter is
placed. The adapters live only here, never as the model's own parameters. A byte budget
(max_bytes over the adapters' own unpadded bytes) evicts the least recently used adapter that
came from a directory; it is read again from that directory when a batch names it.
"""
import collections
import contextlib
import math
import os
import threading

import torch

from ..adapters.dora import low_rank_row_norm
from ..adapters.bdlora import BdLoraConfig
from ..adapters.bdlora import dense as bd_dense
from ..adapters.lora import LORA, MAGNITUDE
from ..lora.io import _read_config, _read_weights, check_file
from ..lora.model import _check_targets, qlora_layers
from ..lora.targets import find_targets
from ..per_example import multi_rows
from ..nn import _check_adapter_name

BASE = "__base__"


class _LayerSlots:
    """The pool tensors of one layer (capacity `cap` slots of rank `r`)."""

    def __init__(self, layer, dtype):
        self.layer = layer
        dev = layer.weight.device
        N, K = layer.out_features, layer.in_features
        self.A = torch.zeros(0, 1, K, dtype=dtype, device=dev)
        self.B = torch.zeros(0, N, 1, dtype=dtype, device=dev)
        self.s = torch.zeros(0, dtype=torch.float32, device=dev)
        self.has = torch.zeros(0, dtype=torch.bool, device=dev)   # slot targets this layer
        self.scale = None  # [cap, N] DoRA row scale (ones for other slots), once a DoRA slot exists

    def resize(self, cap, r):
        def grown(t, shape):
            new = t.new_zeros(shape)
            new[tuple(slice(0, n) for n in t.shape)] = t
            return new
        N, K = self.layer.out_features, self.layer.in_features
        self.A, self.B = grown(self.A, (cap, r, K)), grown(self.B, (cap, N, r))
        self.s, self.has = grown(self.s, (cap,)), grown(self.has, (cap,))
        if self.scale is not None:
            old = self.scale
            self.scale = old.new_ones(cap, N)
            self.scale[:old.shape[0]] = old

    def put(self, e, A, B, s, scale):
        self.clear(e)
        self.A[e, :A.shape[0]] = A
        self.B[e, :, :B.shape[1]] = B
        self.s[e], self.has[e] = s, True
        if scale is not None:
            if self.scale is None:
                self.scale = torch.ones(self.A.shape[0], self.layer.out_features, dtype=torch.float32,
                                        device=self.A.device)
            self.scale[e] = scale

    def clear(self, e):
        self.A[e], self.B[e], self.s[e], self.has[e] = 0, 0, 0, False
        if self.scale is not None:
            self.scale[e] = 1

    def hook(self, slots):
        """The layer's serving callable for batch rows in `slots` (int64 [Bt], -1: base)."""
        safe = slots.clamp_min(0)
        rows = torch.where(self.has[safe] & (slots >= 0), slots, -1)
        row_scale = None
        if self.scale is not None:
            row_scale = torch.where((rows >= 0)[:, None], self.scale[safe], 1.0)
        A, B, s = self.A, self.B, self.s

        def serve(layer, x):
            if x.shape[0] != rows.shape[0]:
                raise ValueError(f"AdapterPool.batch named {rows.shape[0]} adapters but the batch has "
                                 f"{x.shape[0]} rows (dim 0 of the input)")
            return multi_rows(layer, x, layer.nf4_weight, A, B, s, rows, row_scale)
        return serve


class _Adapter:
    def __init__(self, slot, nbytes, path, rank):
        self.slot, self.nbytes, self.path, self.rank = slot, nbytes, path, rank


class AdapterPool:
    """Adapters for `model` (with QLoRALinear layers: apply_qlora or quantize_model) kept in pool
    tensors of `dtype`; `max_bytes` None for no budget.

        pool = nl.AdapterPool(model, max_bytes=256 << 20)
        pool.load("french", "adapters/french")     # a PEFT LoRA / DoRA directory
        with torch.no_grad(), pool.batch(["french", "__base__", "legal"]):
            out = model(input_ids)                   # row i through adapter i
    """

    def __init__(self, model, max_bytes=None, dtype=torch.float32):
        layers = qlora_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no QLoRALinear layer: apply_qlora or "
                             "quantize_model it first")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes <= 0):
            raise ValueError(f"max_bytes must be None or a positive int, got {max_bytes!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.model, self.max_bytes, self.dtype = model, max_bytes, dtype
        self._slots = {n: _LayerSlots(m, dtype) for n, m in layers}
        self._resident = collections.OrderedDict()  # name -> _Adapter, least recently used first
        self._paths = {}                            # name -> directory, for every loaded adapter
        self._free, self._cap, self._r = [], 0, 1
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ what is there
    def names(self):
        """Every adapter the pool can serve: resident ones and evicted ones it can read again."""
        with self._lock:
            return sorted(set(self._resident) | set(self._paths))

    def resident(self):
        """The adapters in the pool tensors now, least recently used first."""
        with self._lock:
            return list(self._resident)

    @property
    def nbytes(self):
        """Summed bytes of the resident adapters (their own A, B, DoRA scale, unpadded)."""
        with self._lock:
            return sum(a.nbytes for a in self._resident.values())

    def __contains__(self, name):
        with self._lock:
            return name in self._resident or name in self._paths

    # ------------------------------------------------------------------ adding
    def load(self, name, path):
        """Read a PEFT LoRA (or DoRA) adapter directory into the pool as `name`, checked as
        load_adapter checks it (config, keys, shapes, finite values) before anything changes."""
        self._new_name(name)
        path = os.path.realpath(os.fspath(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter directory not found: {path}")
        self._place(name, self._read(path), path)
        with self._lock:
            self._paths[name] = path

    def add(self, name, layers):
        """Put an adapter given as tensors in the pool: layers = {module name: {"A": [r, K],
        "B": [N, r], "scaling": s, "magnitude": [N] (DoRA, optional)}}. It has no directory, so the
        budget never evicts it (evict() does, and forgets it)."""
        self._new_name(name)
        if not isinstance(layers, dict) or not layers:
            raise TypeError("layers must be a non-empty dict {module name: {'A', 'B', 'scaling'}}")
        self._place(name, {m: self._check_layer(m, d) for m, d in layers.items()}, None)

    def add_model_adapter(self, name, adapter_name=None):
        """Copy one of the model's own low-rank adapters (LoRA, DoRA, VeRA, AdaLoRA) into the pool
        (as add(); default adapter_name: `name`)."""
        adapter_name = name if adapter_name is None else adapter_name
        layers = {}
        for n, sl in self._slots.items():
            layer = sl.layer
            if adapter_name not in layer.lora_config:
                continue
            if not layer._kind(adapter_name).fused:
                raise ValueError(f"adapter {adapter_name!r} on '{n}' is not one low-rank pair "
                                 f"({layer.lora_config[adapter_name].kind}); the pool holds LoRA-form adapters")
            A, B = layer._low_rank(adapter_name)
            d = {"A": A.detach(), "B": B.detach(), "scaling": layer.lora_config[adapter_name].scaling}
            if MAGNITUDE in layer._kind(adapter_name).containers:
                d["magnitude"] = getattr(layer, MAGNITUDE)[adapter_name].weight.detach()
            layers[n] = d
        if not layers:
            raise KeyError(f"the model has no adapter {adapter_name!r}")
        self.add(name, layers)

    def evict(self, name):
        """Free `name`'s slot. An adapter loaded from a directory stays known and is read again on
        its next batch; one added from tensors is forgotten."""
        with self._lock:
            if name not in self._resident and name not in self._paths:
                raise KeyError(f"no adapter {name!r} in the pool")
            self._drop(name)

    def remove(self, name):
        """Forget `name` entirely (freed, and not read again)."""
        with self._lock:
            self.evict(name)
            self._paths.pop(name, None)

    # ------------------------------------------------------------------ serving
    @contextlib.contextmanager
    def batch(self, adapter_names):
        """Inside the context, batch row i of every QLoRALinear input (dim 0) goes through adapter
        adapter_names[i] ("__base__": the base model), one multi_lora_linear per layer. Evicted
        adapters named here are read again first. Inference only."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError("adapter_names must be a list with one adapter name per batch row, got "
                            f"{type(adapter_names).__name__}")
        if not adapter_names:
            raise ValueError("adapter_names is empty")
        bad = [n for n in adapter_names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter names must be str, got {bad[0]!r}")
        with self._lock:
            wanted = list(dict.fromkeys(n for n in adapter_names if n != BASE))
            for n in wanted:
                if n not in self:
                    raise KeyError(f"no adapter {n!r} in the pool (it has {self.names()}, or {BASE!r})")
            need = [n for n in wanted if n not in self._resident]
            for n in need:
                self._place(n, self._read(self._paths[n]), self._paths[n], keep=wanted)
            for n in wanted:
                self._resident.move_to_end(n)
            dev = next(iter(self._slots.values())).A.device
            slots = torch.tensor([self._resident[n].slot if n != BASE else -1 for n in adapter_names],
                                 dtype=torch.int64, device=dev)
            layers = [(sl.layer, sl.hook(slots)) for sl in self._slots.values()]
            try:
                for layer, serve in layers:
                    layer.serving = serve
                yield self.model
            finally:
                for layer, _ in layers:
                    layer.serving = None

    # ------------------------------------------------------------------ inside
    def _new_name(self, name):
        _check_adapter_name(name)
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        with self._lock:
            if name in self:
                raise ValueError(f"adapter {name!r} is already in the pool (evict or remove it first)")

    def _read(self, path):
        """{module: {"A", "B", "scaling"[, "magnitude"]}} of a PEFT LoRA directory (lora/io.py's
        readers and checks)."""
        cfg = _read_config(path)
        if cfg["peft_type"] != "LORA":
            raise ValueError(f"{path}: AdapterPool holds LoRA / DoRA adapters, not {cfg['peft_type']}")
        if cfg.get("modules_to_save"):
            raise NotImplementedError(f"{path}: AdapterPool holds low-rank layers only; this adapter also "
                                      f"trains whole modules (modules_to_save={cfg['modules_to_save']})")
        weights = _read_weights(path)
        tm = cfg["target_modules"]
        names = find_targets(self.model, tm, cfg.get("layers_to_transform"), cfg.get("layers_pattern"),
                             cfg.get("exclude_modules"))
        _check_targets(self.model, names, f"{path}: adapter_config.json target_modules={tm!r}")
        for n in names:
            if n not in self._slots:
                raise ValueError(f"{path}: target module '{n}' is not a QLoRALinear layer of this model "
                                 "(quantize_model / apply_qlora it before building the pool)")
        per_layer, _ = check_file(cfg, {n: self.model.get_submodule(n) for n in names}, weights)
        rename = {"lora_A.weight": "A", "lora_B.weight": "B", MAGNITUDE: "magnitude"}
        out = {}
        for n in names:
            d, lc = {rename[suffix]: t for suffix, t in per_layer[n].items()}, LORA.layer_config(cfg, n)
            if isinstance(lc, BdLoraConfig):  # the pool holds dense factors (exact: zero blocks)
                d["A"], d["B"] = bd_dense(lc, d["A"], d["B"])
            out[n] = {**d, "scaling": lc.scaling}
        return out

    def _check_layer(self, module, d):
        if module not in self._slots:
            raise KeyError(f"'{module}' is not a QLoRALinear layer of this model")
        layer = self._slots[module].layer
        if not isinstance(d, dict) or not {"A", "B", "scaling"} <= set(d):
            raise TypeError(f"layers['{module}'] must be a dict with 'A', 'B' and 'scaling'")
        A, B, s, m = d["A"], d["B"], d["scaling"], d.get("magnitude")
        r = A.shape[0] if isinstance(A, torch.Tensor) and A.dim() == 2 else -1
        for what, t, shape in (("A", A, (r, layer.in_features)), ("B", B, (layer.out_features, r)),
                               ("magnitude", m, (layer.out_features,))):
            if t is None and what == "magnitude":
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or r < 1 \
                    or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                raise ValueError(f"layers['{module}']['{what}'] must be a finite floating tensor of "
                                 f"shape {shape} (r >= 1), got {getattr(t, 'dtype', type(t))} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"layers['{module}']['scaling'] must be a finite number, got {s!r}")
        return dict(d)

    def _place(self, name, layers, path, keep=()):
        """Put a checked adapter in a slot, evicting least recently used directory adapters (not
        those in `keep`) while the budget is exceeded."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        nbytes = sum((d["A"].numel() + d["B"].numel() + (d["B"].shape[0] if "magnitude" in d else 0))
                     * itemsize for d in layers.values())
        rank = max(d["A"].shape[0] for d in layers.values())
        with self._lock:
            if self.max_bytes is not None:
                if nbytes > self.max_bytes:
                    raise ValueError(f"adapter {name!r} needs {nbytes} bytes, more than max_bytes="
                                     f"{self.max_bytes}")
                while self.nbytes + nbytes > self.max_bytes:
                    victim = next((n for n, a in self._resident.items()
                                   if a.path is not None and n not in keep), None)
                    if victim is None:
                        raise ValueError(f"adapter {name!r} ({nbytes} bytes) does not fit in max_bytes="
                                         f"{self.max_bytes}: the resident adapters that cannot be evicted "
                                         f"(added from tensors, or in this batch) hold {self.nbytes}")
                    self._drop(victim)
            slot = self._free.pop() if self._free else self._grow()
            if rank > self._r:
                self._r = rank
                for sl in self._slots.values():
                    sl.resize(self._cap, rank)
            with torch.no_grad():
                for n, d in layers.items():
                    sl = self._slots[n]
                    scale = None
                    if "magnitude" in d:
                        norm = low_rank_row_norm(sl.layer, d["A"].float(), d["B"].float(), d["scaling"])
                        scale = d["magnitude"].float().to(norm.device) / norm
                    sl.put(slot, d["A"], d["B"], d["scaling"], scale)
            self._resident[name] = _Adapter(slot, nbytes, path, rank)

    def _grow(self):
        cap = max(4, 2 * self._cap)
        for sl in self._slots.values():
            sl.resize(cap, self._r)
        self._free = list(range(cap - 1, self._cap, -1))
        slot, self._cap = self._cap, cap
        return slot

    def _drop(self, name):
        a = self._resident.pop(name, None)
        if a is None:  # already evicted
            return
        for sl in self._slots.values():
            sl.clear(a.slot)
        self._free.append(a.slot)
