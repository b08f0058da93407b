"""QLoRALinear: a frozen NF4 weight plus zero or more adapters, drop-in for nn.Linear (and for a
bitsandbytes Linear4bit wrapped by PEFT LoRA).

  y = x W^T + b + sum over active adapters a of  s_a * dropout(x) A_a^T B_a^T
      W: NF4 [N, K] (an NF4Tensor parameter),  (A_a [r_a, K], B_a [N, r_a]) = kind.low_rank(a)

The adapter kinds (LoRA, DoRA, VeRA, AdaLoRA) are plug-ins (python/nf4lora/adapters/): each says
what tensors an adapter has (PEFT's names: `lora_A.<adapter>.weight`, `lora_magnitude_vector.<a>`,
`vera_lambda_b.<a>`, `lora_E.<a>`, ...), its low-rank pair, and an optional row scale (DoRA:
y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b). This layer is the NF4 base plus one loop
over the active adapters: the first adapter runs inside the fused op `qlora_linear` (x read by the
NF4 kernel, W dequantized on the fly); further ones (a rare case) add their terms with plain
torch ops, in PEFT's order; the per-example path (mixed_batch) runs the same terms on row subsets.

State dict: the weight in bitsandbytes Linear4bit keys (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), plus
`bias` and every adapter tensor under its PEFT name.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdaLoraConfig, AdapterConfig, VeraConfig, adapter_parts, kind_of, new_containers
from .adapters.dora import weight_norm
from .adapters.lora import check_init
from .functional import nf4_linear, qlora_linear
from .nf4 import NF4Tensor, quantize_nf4
from .nf4_dispatch import same_nf4_layout
from .nf4_fsdp import load_nf4_entries, nf4_local, nf4_state_dict_entries
from .per_example import per_example_forward

# Containers holding trainable adapter tensors (PEFT's names): a parameter whose name has
# ".<one of these>.<adapter>" belongs to that adapter. Derived from the registered kinds.
ADAPTER_PARTS = adapter_parts()


def _check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {name!r}")
    return name


class QLoRALinear(nn.Module):
    def __init__(self, weight: NF4Tensor, bias=None, r=8, lora_alpha=8, lora_dropout=0.0,
                 use_rslora=False, init_lora_weights=True, lora_dtype=torch.float32,
                 adapter_name="default", use_dora=False):
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise TypeError("weight must be a 2-D NF4Tensor [out_features, in_features]")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight)
        if bias is not None:
            bias = torch.as_tensor(bias).detach()
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        new_containers(self)  # lora_A, lora_B, lora_magnitude_vector, vera_*, lora_E (kinds' names)
        self.lora_config = {}  # adapter -> its kind's config dataclass (adapters/)
        self.active_adapters = []      # names; an absent name is skipped (as PEFT does)
        self.adapters_enabled = True   # False inside disable_adapter(): exactly the base output
        self.merged_adapters = []      # adapters folded into merged_weight
        self.aux_losses = {}  # adapter -> auxiliary loss of the last forward (MoLoRA: router balance)
        self.batch_adapter_names = None  # per-example adapters (mixed_batch), inference only
        self.register_buffer("merged_weight", None, persistent=False)
        if r > 0:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                             init_lora_weights, lora_dtype, use_dora)
            self.active_adapters = [adapter_name]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    blocksize=64, double_quant=True, init_lora_weights=True, lora_dtype=torch.float32,
                    adapter_name="default", use_dora=False):
        """Quantize `linear` to NF4 and attach one adapter (none when r == 0)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach().contiguous(), blocksize=blocksize,
                         double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, lora_dtype=lora_dtype,
                   adapter_name=adapter_name, use_dora=use_dora)

    # ---------------------------------------------------------------- adapters
    def add(self, adapter_name, cfg, **options):
        """Add an adapter of cfg's kind (inactive until set_adapter names it, as in PEFT); `options`
        go to the kind's create (initialisation, dtype, VeRA's shared projections)."""
        _check_adapter_name(adapter_name)
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfg must be an adapter config (nf4lora.adapters), got {type(cfg).__name__}")
        if adapter_name in self.lora_config:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        self.lora_config[adapter_name] = cfg
        try:
            with torch.no_grad():
                kind_of(cfg).create(self, adapter_name, cfg, **options)
            self.train(self.training)  # the new submodules in the layer's train / eval mode
        except BaseException:
            kind_of(cfg).delete(self, adapter_name)
            del self.lora_config[adapter_name]
            raise

    def add_adapter(self, adapter_name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, lora_dtype=torch.float32, use_dora=False, init_options=None):
        """Add a LoRA adapter; use_dora=True makes it a DoRA adapter (magnitude initialised to
        ||W + s B A||_row, as PEFT). init_lora_weights takes PEFT's names: True, False, "gaussian",
        "pissa", "pissa_niter_N", "olora", "loftq" (those last change the NF4 base; init_options
        as lora/init_methods.init_adapter takes them: weight=the dense weight, loftq_iter)."""
        check_init(init_lora_weights)
        cfg = AdapterConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            use_rslora=bool(use_rslora), use_dora=bool(use_dora))
        self.add(adapter_name, cfg, init_lora_weights=init_lora_weights, dtype=lora_dtype,
                 init_options=init_options)

    def add_vera_adapter(self, adapter_name, projections, r, vera_dropout=0.0, d_initial=0.1,
                         init_weights=True, dtype=torch.float32):
        """Add a VeRA adapter over `projections` (VeraProjections: A [>= r, >= in_features],
        B [>= out_features, >= r]), the model's shared module (not copied)."""
        self.add(adapter_name, VeraConfig(r=r, lora_dropout=vera_dropout, d_initial=d_initial),
                 projections=projections, init_weights=init_weights, dtype=dtype)

    def add_adalora_adapter(self, adapter_name, r, lora_alpha=8, lora_dropout=0.0, init_weights=True,
                            dtype=torch.float32):
        """Add an AdaLoRA adapter of initial rank r (scaling alpha / (r + 1e-5) for good)."""
        self.add(adapter_name, AdaLoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout),
                 init_weights=init_weights, dtype=dtype)

    def _kind(self, name):
        return kind_of(self.lora_config[name])

    def adapter_params(self, name):
        """The trainable tensors of one adapter."""
        return self._kind(name).params(self, name)

    def _low_rank(self, name):
        """(A [r, K], B [N, r]) with y += scaling * x A^T B^T for this adapter."""
        return self._kind(name).low_rank(self, name)

    def delete_adapter(self, adapter_name):
        if adapter_name not in self.lora_config:
            raise KeyError(f"adapter {adapter_name!r} not found in this layer")
        if adapter_name in self.merged_adapters:
            self.unmerge_()
        self._kind(adapter_name).delete(self, adapter_name)
        del self.lora_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names, requires_grad=True):
        """Make `adapter_names` (a name or a list) the active adapters; their parameters train when
        `requires_grad`, every other adapter's are frozen. A merged layer is unmerged first."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.merged_adapters and names != self.merged_adapters:
            self.unmerge_()
        for name in self.lora_config:
            on = requires_grad and name in names
            for p in self.adapter_params(name):
                p.requires_grad_(on)
        self.active_adapters = names

    def reset_lora_parameters(self, init_lora_weights=True, adapter_name=None):
        """PEFT's init of LoRA / DoRA adapters (all of them, or `adapter_name`): see adapters/lora.py."""
        names = [n for n in self.lora_config if hasattr(self._kind(n), "reset")] \
            if adapter_name is None else [adapter_name]
        check_init(init_lora_weights)
        with torch.no_grad():
            for name in names:
                self._kind(name).reset(self, name, init_lora_weights)

    def _active(self):
        return [a for a in self.active_adapters if a in self.lora_config] if self.adapters_enabled else []

    def _first_cfg(self):
        act = [a for a in self.active_adapters if a in self.lora_config]
        return self.lora_config[act[0]] if act else None

    # The active adapter's hyper-parameters and weights (the first one when several are active).
    @property
    def r(self):
        c = self._first_cfg()
        return 0 if c is None else c.r

    @property
    def scaling(self):
        c = self._first_cfg()
        return 0.0 if c is None else c.scaling

    @property
    def lora_alpha(self):
        c = self._first_cfg()
        return 0 if c is None else c.lora_alpha

    @property
    def lora_dropout(self):
        c = self._first_cfg()
        return 0.0 if c is None else c.lora_dropout

    @property
    def use_rslora(self):
        c = self._first_cfg()
        return False if c is None else c.use_rslora

    @property
    def lora_A_weight(self):
        """The active LoRA adapter's A, a Parameter [r, in_features] (None without one)."""
        act = [a for a in self.active_adapters if a in self.lora_A]
        return self.lora_A[act[0]].weight if act else None

    @property
    def lora_B_weight(self):
        """The active LoRA adapter's B, a Parameter [out_features, r] (None without one)."""
        act = [a for a in self.active_adapters if a in self.lora_B]
        return self.lora_B[act[0]].weight if act else None

    # ---------------------------------------------------------------- the NF4 weight
    def _set_weight(self, q: NF4Tensor):
        # `weight` is the NF4Tensor itself, a frozen Parameter: weight.shape / .dtype are the
        # logical [out_features, in_features] and compute dtype that transformers, PEFT and the
        # distributed engine expect; the state dict still holds bitsandbytes' keys (below).
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_row_sqnorm", None, persistent=False)  # DoRA's ||W_n||^2, lazily

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The frozen weight (the NF4Tensor parameter itself)."""
        w = self.weight
        if not isinstance(w, NF4Tensor):
            raise RuntimeError(f"this layer's weight is a {type(w).__name__} (sharded by FSDP?): the "
                               "whole NF4 weight exists only inside the sharded module's forward")
        return w

    @property
    def weight_dtype(self):
        return self.weight.dtype

    @property
    def blocksize(self):
        return nf4_local(self.weight).blocksize

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (replaced below), bias
        destination.update(nf4_state_dict_entries(self.weight, prefix + "weight", keep_vars))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        if wkey + ".quant_state.bitsandbytes__nf4" in state_dict:
            sub = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
            try:
                q = load_nf4_entries(self.weight, sub, wkey)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}")
                q = None
            if q is not None:
                if q is nf4_local(self.weight):  # a sharded weight, loaded into its shard in place
                    self._load_weight(q)
                elif tuple(q.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{wkey}: shape {tuple(q.shape)} does not match this layer's "
                                      f"{(self.out_features, self.in_features)}")
                else:
                    self._load_weight(q)
        elif strict:
            missing_keys.append(wkey + ".quant_state.bitsandbytes__nf4")
        # bias (and nothing else of this module's own) through torch's loader, the weight kept out
        rest = {k: v for k, v in state_dict.items() if k != wkey}
        n_missing = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != wkey]
        # torch reports dotted keys under a leaf module as unexpected; the weight.* ones are ours
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(wkey + ".")]

    def _load_weight(self, q):
        """Put a loaded NF4 weight in place: copied into the existing parameter when the layouts
        match (optimizers, FSDP and hooks keep their references), replaced otherwise."""
        w = self.weight
        if q is nf4_local(w):  # loaded in place (a sharded weight)
            pass
        elif isinstance(w, NF4Tensor) and same_nf4_layout(w, q):
            with torch.no_grad():
                w.copy_(q.to(w.device))
        else:
            self._set_weight(q.to(self.weight.device))
        self.weight_row_sqnorm = None
        if self.merged_adapters:
            self._remerge()

    # ---------------------------------------------------------------- DoRA
    def dora_weight_norm(self, adapter_name) -> torch.Tensor:
        """float32 [N]: ||W + s B A|| over each output row (adapters/dora.py)."""
        return weight_norm(self, adapter_name)

    # ---------------------------------------------------------------- forward
    def _term(self, name, h):
        """Adapter `name`'s term for h (already dropped out), in the adapter's dtype."""
        return self._kind(name).term(self, name, h)

    def _dropped(self, name, x):
        """x in the adapter's dtype, then its dropout (PEFT's order)."""
        dtype = self.adapter_params(name)[0].dtype
        return F.dropout(x.to(dtype), self.lora_config[name].lora_dropout, self.training)

    def _add_adapter(self, y, x, q, name):
        """y (the running result) plus adapter `name`'s contribution, as PEFT adds it: a row-scaled
        kind (DoRA) rescales its base term, which is the running result without bias (or, under
        dropout, the base layer on its dropped-out input)."""
        kind = self._kind(name)
        if not kind.has_row_scale:
            return y + self._term(name, self._dropped(name, x)).to(y.dtype)
        p = self.lora_config[name].lora_dropout if self.training else 0.0
        if p > 0.0:
            xd = F.dropout(x, p, True)
            base = nf4_linear(xd, q)
        else:
            xd, base = x, (y if self.bias is None else y - self.bias.to(y.dtype))
        scale = kind.row_scale(self, name, y.dtype)
        return y + (scale - 1) * base + scale * self._term(name, xd).to(y.dtype)

    def _adapters_forward(self, x, q, act):
        """Base + active adapters. The first adapter rides in the fused op when it can: always for
        a plain kind; for a row-scaled one (DoRA) when it is the only one and without dropout
        (then y = scale * fused + b)."""
        if not act:
            return nf4_linear(x, q, self.bias)
        first, cfg = act[0], self.lora_config[act[0]]
        p = cfg.lora_dropout if self.training else 0.0
        if self._kind(first).fused and not any(self._kind(a).has_row_scale for a in act):
            A, B = self._low_rank(first)
            y = qlora_linear(x, q, A, B, cfg.scaling, self.bias, dropout_p=p)
            for name in act[1:]:  # several active adapters: the extra terms, unfused
                y = self._add_adapter(y, x, q, name)
            return y
        if len(act) == 1 and p == 0.0 and self._kind(first).fused:
            A, B = self._low_rank(first)
            y = qlora_linear(x, q, A, B, cfg.scaling) * self._kind(first).row_scale(self, first, x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        y = nf4_linear(x, q, self.bias)
        for name in act:
            y = self._add_adapter(y, x, q, name)
        return y

    # AdapterPool.batch (serving/pool.py) sets this to a callable (layer, x) -> y that runs the
    # layer's forward over the pool's adapters instead of the layer's own.
    serving = None

    def forward(self, x):
        if self.serving is not None:
            return self.serving(self, x)
        if self.batch_adapter_names is not None and self.adapters_enabled:
            return per_example_forward(self, x, self.nf4_weight, self.batch_adapter_names)
        if self.merged_weight is not None and self.adapters_enabled:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.merged_weight.to(x.dtype), b)
        return self._adapters_forward(x, self.nf4_weight, self._active())

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def delta_weight(self, adapter_name) -> torch.Tensor:
        """float32 [N, K]: scaling * B @ A of one adapter."""
        return self._kind(adapter_name).delta(self, adapter_name)

    @torch.no_grad()
    def merged_dense(self, adapter_names=None) -> torch.Tensor:
        """float32 [N, K]: W_dequant + sum of scaling * B @ A over `adapter_names` (default: the
        active adapters); a DoRA adapter also scales the rows by m / ||W_dequant + s B A||_row."""
        names = self._active() if adapter_names is None else list(adapter_names)
        w0 = self.nf4_weight.dequantize(torch.float32)
        w = w0.clone()
        for name in names:
            if name not in self.lora_config:
                raise KeyError(f"adapter {name!r} not found in this layer")
            w = self._kind(name).merged(self, name, w0, w, self.delta_weight(name))
        return w

    @torch.no_grad()
    def merge_(self, adapter_names=None):
        """Fold adapters into a dense weight (in the original weight dtype) that forward uses until
        unmerge_(); the NF4 codes stay, so unmerging is exact. Costs one dense weight of memory."""
        names = self._active() if adapter_names is None else list(adapter_names)
        if self.merged_adapters:
            self.unmerge_()
        if not names:
            return
        self.merged_weight = self.merged_dense(names).to(self.weight_dtype)
        self.merged_adapters = names

    def _remerge(self):
        self.merged_weight = self.merged_dense(self.merged_adapters).to(self.weight_dtype)

    def unmerge_(self):
        self.merged_weight = None
        self.merged_adapters = []

    @torch.no_grad()
    def merge(self, dtype=None, adapter_names=None) -> nn.Linear:
        """A dense nn.Linear with weight W + sum of scaling * B @ A over the active adapters (or
        `adapter_names`), computed in float32, stored in `dtype` (default: the original weight dtype)."""
        dtype = dtype or self.weight_dtype
        w = self.merged_dense(adapter_names)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias.to(dtype))
        lin.requires_grad_(False)
        return lin

    def extra_repr(self):
        adapters = ", ".join(f"{n}(r={c.r}, alpha={c.lora_alpha}, dropout={c.lora_dropout}"
                             + (f", {c.kind}" if c.kind != "lora" else "") + ")"
                             for n, c in self.lora_config.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"blocksize={self.blocksize}, double_quant={nf4_local(self.weight).double_quant}, "
                f"adapters=[{adapters}], active={self.active_adapters}"
                + (f", merged={self.merged_adapters}" if self.merged_adapters else ""))
