"""QLoRALinear: a frozen NF4 weight plus zero or more LoRA adapters, drop-in for nn.Linear (and for a
bitsandbytes Linear4bit wrapped by PEFT LoRA).

  y = x W^T + b + sum over active adapters a of  s_a * dropout(x) A_a^T B_a^T
      W: NF4 [N, K],  A_a = lora_A[a].weight [r_a, K],  B_a = lora_B[a].weight [N, r_a]

DoRA adapters (use_dora=True, as PEFT) add a magnitude m_a = lora_magnitude_vector[a].weight [N]:
  y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b      (no dropout; the norm is detached)
VeRA adapters (add_vera_adapter, as PEFT's VERA) share frozen random projections A [r, K_max],
B [N_max, r] across layers and train per layer lambda_d [r] and lambda_b [N]:
  y += lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T),   A_s = A[:, :K], B_s = B[:N]
which is the fused op with A' = lambda_d A_s, B' = lambda_b B_s, scaling 1.
AdaLoRA adapters (add_adalora_adapter, PEFT's ADALORA) are SVD-shaped: P = lora_A [r, K], the
singular values lora_E [r, 1], Q = lora_B [N, r], and
  y += (alpha / (r_init + 1e-5)) * dropout(x) (A * E)^T B^T
the fused op with A' = A * E; lora/adalora.py prunes entries of E to a rank budget.
The row norms never need a dense W: ||W_n||^2 (computed once, cached) + 2 s B_n . (W A^T)_n
+ s^2 ||(B A)_n||^2, with W A^T from the NF4 op itself (A as a batch of r rows).

Parameter names follow PEFT (`lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`), so optimizers,
parameter-group rules and tools written for PEFT find them. The first active adapter goes through the
fused op `qlora_linear` (x read once, W dequantized on the fly); further active adapters, a rare case,
add their low-rank terms with plain torch ops.

State dict: the weight in bitsandbytes Linear4bit keys (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), plus
`bias` and `lora_A.<adapter>.weight` / `lora_B.<adapter>.weight`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import nf4_linear, qlora_linear
from .nf4 import NF4Tensor, quantize_nf4
from .nf4_dispatch import same_nf4_layout
from .nf4_fsdp import load_nf4_entries, nf4_local, nf4_state_dict_entries


# Names of adapter parameter containers in a QLoRALinear (PEFT's names): a parameter whose name has
# ".<one of these>.<adapter>" belongs to that adapter.
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector", "vera_lambda_b", "vera_lambda_d")


class VeraProjections(nn.Module):
    """VeRA's frozen projections of one adapter, A [r, K_max] and B [N_max, r]: ONE instance is a
    submodule of every adapted layer, so model.to() moves it once and the layers keep sharing it.
    Non-persistent buffers: they come back from projection_prng_key or the adapter file."""

    def __init__(self, A, B):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)


class LoraMagnitude(nn.Module):
    """DoRA's magnitude of one adapter: weight [out_features], PEFT's lora_magnitude_vector.<a>."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


def _check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {name!r}")
    return name


def _check_layer_dropout(name, p):
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


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
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.vera_lambda_b = nn.ParameterDict()  # VeRA adapters: [N] and [r], with the shared
        self.vera_lambda_d = nn.ParameterDict()  # projections in self.vera_projections[name]
        self.vera_projections = nn.ModuleDict()  # adapter -> VeraProjections, shared by the model
        self.lora_E = nn.ParameterDict()  # AdaLoRA adapters: singular values [r, 1]
        self.lora_config = {}  # adapter -> dict(r, lora_alpha, scaling, lora_dropout, use_rslora, use_dora)
        self.active_adapters = []      # names; an absent name is skipped (as PEFT does)
        self.adapters_enabled = True   # False inside disable_adapter(): exactly the base output
        self.merged_adapters = []      # adapters folded into merged_weight
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
    def _check_new_adapter(self, adapter_name, r):
        _check_adapter_name(adapter_name)
        if adapter_name in self.lora_config:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")

    def add_adapter(self, adapter_name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, lora_dtype=torch.float32, use_dora=False):
        """Add a LoRA adapter (inactive until set_adapter names it, as in PEFT); use_dora=True makes
        it a DoRA adapter (magnitude initialised to ||W + s B A||_row, as PEFT)."""
        self._check_new_adapter(adapter_name, r)
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) \
                or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        _check_layer_dropout("lora_dropout", lora_dropout)
        dev = self.weight.device
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=lora_dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=lora_dtype)
        self.lora_config[adapter_name] = dict(
            r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=bool(use_rslora),
            scaling=lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r,
            use_dora=bool(use_dora))
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = LoraMagnitude(
                torch.empty(self.out_features, device=dev, dtype=lora_dtype))
        self.reset_lora_parameters(init_lora_weights, adapter_name)

    def add_vera_adapter(self, adapter_name, projections, r, vera_dropout=0.0, d_initial=0.1,
                         init_weights=True, dtype=torch.float32):
        """Add a VeRA adapter (inactive until set_adapter names it): `projections` (VeraProjections:
        A [>= r, >= in_features], B [>= out_features, >= r]) is the model's shared module (not copied);
        lambda_d [r] = d_initial and lambda_b [N] = 0 (PEFT's init: the adapter starts as a no-op;
        init_weights=False: lambda_d ~ N(0, 1), lambda_b = 1, PEFT's untouched values)."""
        self._check_new_adapter(adapter_name, r)
        _check_layer_dropout("vera_dropout", vera_dropout)
        vera_A, vera_B = projections.A, projections.B
        if vera_A.dim() != 2 or vera_B.dim() != 2 or vera_A.shape[0] < r or vera_B.shape[1] < r \
                or vera_A.shape[1] < self.in_features or vera_B.shape[0] < self.out_features:
            raise ValueError(f"vera_A {tuple(vera_A.shape)} / vera_B {tuple(vera_B.shape)} are too small "
                             f"for r={r} and this layer's {self.out_features} x {self.in_features}")
        dev = self.weight.device
        self.vera_projections[adapter_name] = projections
        self.vera_lambda_b[adapter_name] = nn.Parameter(torch.ones(self.out_features, device=dev, dtype=dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(torch.randn(r, device=dev, dtype=dtype))
        if init_weights:
            with torch.no_grad():
                self.vera_lambda_d[adapter_name].fill_(d_initial)
                self.vera_lambda_b[adapter_name].zero_()
        self.lora_config[adapter_name] = dict(
            kind="vera", r=r, lora_alpha=r, lora_dropout=float(vera_dropout), use_rslora=False,
            scaling=1.0, use_dora=False, d_initial=d_initial)

    def add_adalora_adapter(self, adapter_name, r, lora_alpha=8, lora_dropout=0.0, init_weights=True,
                            dtype=torch.float32):
        """Add an AdaLoRA adapter of initial rank r (inactive until set_adapter names it):
        lora_A [r, K], lora_B [N, r] ~ N(0, 0.02), lora_E [r, 1] = 0 (PEFT's init; init_weights=False
        leaves PEFT's N(0, 1) draws). Scaling alpha / (r + 1e-5) for good: pruning zeroes entries of E,
        it never changes r (PEFT's ranknum)."""
        self._check_new_adapter(adapter_name, r)
        _check_layer_dropout("lora_dropout", lora_dropout)
        dev = self.weight.device
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, device=dev, dtype=dtype))
        with torch.no_grad():
            if init_weights:
                self.lora_E[adapter_name].zero_()
                self.lora_A[adapter_name].weight.normal_(0.0, 0.02)
                self.lora_B[adapter_name].weight.normal_(0.0, 0.02)
            else:
                self.lora_A[adapter_name].weight.normal_()
                self.lora_B[adapter_name].weight.normal_()
        alpha = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_config[adapter_name] = dict(
            kind="adalora", r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
            use_rslora=False, use_dora=False, scaling=alpha / (float(r) + 1e-5))

    def _kind(self, name):
        return self.lora_config[name].get("kind", "lora")

    def _adapter_params(self, name):
        """The trainable tensors of one adapter."""
        if self._kind(name) == "vera":
            return [self.vera_lambda_b[name], self.vera_lambda_d[name]]
        ps = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_E:
            ps.append(self.lora_E[name])
        if name in self.lora_magnitude_vector:
            ps.append(self.lora_magnitude_vector[name].weight)
        return ps

    def _low_rank(self, name):
        """(A [r, K], B [N, r]) with y += scaling * x A^T B^T for this adapter: LoRA's own weights,
        or VeRA's lambda_d * A_s and lambda_b * B_s (differentiable in the lambdas)."""
        if self._kind(name) == "vera":
            P = self.vera_projections[name]
            A, B = P.A, P.B
            ld, lb = self.vera_lambda_d[name], self.vera_lambda_b[name]
            r = ld.shape[0]
            A_s = A[:r, : self.in_features].to(device=ld.device, dtype=ld.dtype)
            B_s = B[: self.out_features, :r].to(device=lb.device, dtype=lb.dtype)
            return ld[:, None] * A_s, lb[:, None] * B_s
        if name in self.lora_E:  # AdaLoRA: A * E
            return self.lora_A[name].weight * self.lora_E[name], self.lora_B[name].weight
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delete_adapter(self, adapter_name):
        if adapter_name not in self.lora_config:
            raise KeyError(f"adapter {adapter_name!r} not found in this layer")
        if adapter_name in self.merged_adapters:
            self.unmerge_()
        if self._kind(adapter_name) == "vera":
            del self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name]
            del self.vera_projections[adapter_name]
        else:
            del self.lora_A[adapter_name], self.lora_B[adapter_name]
        del self.lora_config[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if adapter_name in self.lora_E:
            del self.lora_E[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names, requires_grad=True):
        """Make `adapter_names` (a name or a list) the active adapters; their parameters train when
        `requires_grad`, every other adapter's are frozen. A merged layer is unmerged first."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.merged_adapters and names != self.merged_adapters:
            self.unmerge_()
        for name in self.lora_config:
            on = requires_grad and name in names
            for p in self._adapter_params(name):
                p.requires_grad_(on)
        self.active_adapters = names

    def reset_lora_parameters(self, init_lora_weights=True, adapter_name=None):
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
        False: both kaiming-uniform (the adapter is not a no-op)."""
        names = [n for n in self.lora_config if self._kind(n) == "lora"] if adapter_name is None \
            else [adapter_name]
        with torch.no_grad():
            for name in names:
                A, B = self.lora_A[name].weight, self.lora_B[name].weight
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                    nn.init.zeros_(B)
                elif init_lora_weights == "gaussian":
                    nn.init.normal_(A, std=1.0 / self.lora_config[name]["r"])
                    nn.init.zeros_(B)
                elif init_lora_weights is False:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                else:
                    raise ValueError("init_lora_weights must be True, False or 'gaussian', got "
                                     f"{init_lora_weights!r}")
                if name in self.lora_magnitude_vector:  # DoRA: m = ||W + s B A||_row (PEFT)
                    self.lora_magnitude_vector[name].weight.copy_(self.dora_weight_norm(name))

    def _active(self):
        return [a for a in self.active_adapters if a in self.lora_config] if self.adapters_enabled else []

    def _first_cfg(self):
        act = [a for a in self.active_adapters if a in self.lora_config]
        return self.lora_config[act[0]] if act else None

    # The active adapter's hyper-parameters and weights (the first one when several are active).
    @property
    def r(self):
        c = self._first_cfg()
        return 0 if c is None else c["r"]

    @property
    def scaling(self):
        c = self._first_cfg()
        return 0.0 if c is None else c["scaling"]

    @property
    def lora_alpha(self):
        c = self._first_cfg()
        return 0 if c is None else c["lora_alpha"]

    @property
    def lora_dropout(self):
        c = self._first_cfg()
        return 0.0 if c is None else c["lora_dropout"]

    @property
    def use_rslora(self):
        c = self._first_cfg()
        return False if c is None else c["use_rslora"]

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
    @torch.no_grad()
    def dora_weight_norm(self, adapter_name) -> torch.Tensor:
        """float32 [N]: ||W + s B A|| over each output row, W the dequantized NF4 weight, in float64
        from ||W_n||^2 (cached), W A^T (the NF4 op on A's r rows) and the r x r Gram matrix of A."""
        c = self.lora_config[adapter_name]
        s = c["scaling"]
        A = self.lora_A[adapter_name].weight.detach()
        B = self.lora_B[adapter_name].weight.detach().double()
        if self.weight_row_sqnorm is None:  # one dense pass over W, once per weight
            self.weight_row_sqnorm = self.nf4_weight.dequantize(torch.float32).double().pow(2).sum(1)
        wa = nf4_linear(A.float(), self.nf4_weight).double().t()  # [N, r] = W A^T
        gram = A.double() @ A.double().t()                         # [r, r]
        sq = self.weight_row_sqnorm + 2.0 * s * (B * wa).sum(1) + s * s * ((B @ gram) * B).sum(1)
        return sq.clamp_min(0.0).sqrt().float()

    def _dora_scale(self, name, dtype):
        """m / ||W + s B A||_row (the norm detached: DoRA paper sec. 4.3, as PEFT), [N] in dtype."""
        m = self.lora_magnitude_vector[name].weight
        return (m / self.dora_weight_norm(name).to(m.dtype)).to(dtype)

    def _dropped(self, name, x):
        """x in the adapter's dtype, then its dropout (PEFT's order)."""
        dtype = self._adapter_params(name)[0].dtype
        return F.dropout(x.to(dtype), self.lora_config[name]["lora_dropout"], self.training)

    def _lora_term(self, name, h):
        c = self.lora_config[name]
        A, B = self._low_rank(name)
        return F.linear(F.linear(h.to(A.dtype), A), B) * c["scaling"]

    def _forward_dora(self, x, q, act):
        """Active adapters with at least one DoRA adapter, in PEFT's order: each adapter adds to the
        running result; a DoRA adapter's base term is the running result without bias (or, under
        dropout, the base layer on its dropped-out input)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if len(act) == 1 and not (self.training and self.lora_config[act[0]]["lora_dropout"] > 0):
            c = self.lora_config[act[0]]  # the common case: one fused op, then a row scale
            y = qlora_linear(x, q, self.lora_A[act[0]].weight, self.lora_B[act[0]].weight,
                             c["scaling"]) * self._dora_scale(act[0], x.dtype)
            return y if bias is None else y + bias
        result = nf4_linear(x, q, self.bias)
        for name in act:
            c = self.lora_config[name]
            p = c["lora_dropout"] if self.training else 0.0
            if not c["use_dora"]:
                result = result + self._lora_term(name, self._dropped(name, x)).to(result.dtype)
                continue
            if p > 0.0:
                xd = F.dropout(x, p, True)
                base = nf4_linear(xd, q)
            else:
                xd, base = x, (result if bias is None else result - bias)
            scale = self._dora_scale(name, result.dtype)
            result = result + (scale - 1) * base + scale * self._lora_term(name, xd).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x, q, names):
        """Row i of the batch (dim 0 of x) through adapter names[i] ("__base__": none), as PEFT's
        `adapter_names`: the base GEMM once for the whole batch, then each adapter's low-rank term
        (DoRA: its row scale too, which PEFT does not support here) on its rows."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} "
                             "rows (dim 0 of the input)")
        if self.merged_weight is not None:
            raise ValueError("per-example adapters need an unmerged model: call unmerge_adapter first")
        y = nf4_linear(x, q, self.bias)
        bias = None if self.bias is None else self.bias.to(y.dtype)
        for name in dict.fromkeys(names):  # first-seen order
            if name not in self.lora_config:  # "__base__", or an adapter this layer does not have
                continue
            idx = torch.tensor([i for i, a in enumerate(names) if a == name], device=x.device)
            xs, ys = x.index_select(0, idx), y.index_select(0, idx)
            delta = self._lora_term(name, xs).to(y.dtype)
            if self.lora_config[name]["use_dora"]:
                scale = self._dora_scale(name, y.dtype)
                base = ys if bias is None else ys - bias
                delta = (scale - 1) * base + scale * delta
            y = y.index_add(0, idx, delta)
        return y

    # ---------------------------------------------------------------- forward
    def forward(self, x):
        if self.batch_adapter_names is not None and self.adapters_enabled:
            return self._mixed_batch_forward(x, self.nf4_weight, self.batch_adapter_names)
        act = self._active()
        if self.merged_weight is not None and self.adapters_enabled:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.merged_weight.to(x.dtype), b)
        q = self.nf4_weight
        if not act:
            return nf4_linear(x, q, self.bias)
        if any(self.lora_config[a]["use_dora"] for a in act):
            return self._forward_dora(x, q, act)
        c = self.lora_config[act[0]]
        p = c["lora_dropout"] if self.training else 0.0
        A, B = self._low_rank(act[0])
        y = qlora_linear(x, q, A, B, c["scaling"], self.bias, dropout_p=p)
        for name in act[1:]:  # several active adapters: the extra low-rank terms, unfused
            y = y + self._lora_term(name, self._dropped(name, x)).to(y.dtype)
        return y

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def delta_weight(self, adapter_name) -> torch.Tensor:
        """float32 [N, K]: scaling * B @ A of one adapter."""
        c = self.lora_config[adapter_name]
        A, B = self._low_rank(adapter_name)
        return c["scaling"] * (B.float() @ A.float())

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
            d = self.delta_weight(name)
            if self.lora_config[name]["use_dora"]:  # PEFT: (m / ||W0 + dW||_row) * (W + dW)
                m = self.lora_magnitude_vector[name].weight.float()
                w = (m / (w0 + d).norm(dim=1))[:, None] * (w + d)
            else:
                w += d
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
        adapters = ", ".join(f"{n}(r={c['r']}, alpha={c['lora_alpha']}, dropout={c['lora_dropout']}"
                             + (", dora" if c["use_dora"] else "")
                             + (f", {c['kind']}" if c.get("kind") in ("vera", "adalora") else "") + ")"
                             for n, c in self.lora_config.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"blocksize={self.blocksize}, double_quant={nf4_local(self.weight).double_quant}, "
                f"adapters=[{adapters}], active={self.active_adapters}"
                + (f", merged={self.merged_adapters}" if self.merged_adapters else ""))
