"""PagedAdamW: AdamW with 32-bit or 8-bit blockwise optimizer state kept in fixed-size pages.

State layout (per parameter with n elements; see _optim_ops.py): one flat buffer per state
tensor, split logically into pages of `page_size` elements (a multiple of 256). The pages are
views of that buffer, so a page never straddles an 8-bit block and the state saves as plain tensors.

- CPU parameters: state is ordinary host memory; the update is one fused AVX2/AVX-512/OpenMP pass,
  one parallel region over the pages of every parameter of a group. `paged` changes nothing else
  on CPU.
- CUDA parameters, paged=True: state lives in pinned host memory; each step streams the pages
  through three device staging slots with async copies on side streams (page i+1 copies in while
  page i updates and page i-1 copies out), so device memory holds at most three pages of state.
  paged=False: state lives on the GPU and the fused kernel runs over it in one launch.
"""
import math

import torch

from . import _optim_ops
from ._optim_ops import BLOCK, MIN_8BIT_SIZE, n_blocks
from .backends import optim_cpu, optim_cuda, optim_default  # noqa: F401  (register the kernels)
from .nf4_fsdp import is_dtensor

__all__ = ["PagedAdamW"]

DEFAULT_PAGE_SIZE = 1 << 20  # elements: 8 MiB of fp32 m+v per page, 2 MiB at 8 bits
_PLACEMENT = ("paged", "page_size")  # group keys load_state_dict leaves as they are
_STATE32 = ("exp_avg", "exp_avg_sq")
_STATE8 = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def _number(name, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_group(group):
    """Validated (lr, beta1, beta2, eps, weight_decay) of a param group; ValueError/TypeError
    naming the hyper-parameter."""
    lr = _number("lr", group["lr"])
    if lr < 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    eps = _number("eps", group["eps"])
    if eps < 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
    wd = _number("weight_decay", group["weight_decay"])
    if wd < 0.0:
        raise ValueError(f"Invalid weight_decay: {wd} (must be >= 0)")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (_number(f"betas[{i}]", b) for i, b in enumerate(betas))
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {b} (must be in [0, 1))")
    bits = group["optim_bits"]
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {bits!r}")
    if not isinstance(group["paged"], bool):
        raise TypeError(f"paged must be a bool, got {type(group['paged']).__name__}")
    ps = group["page_size"]
    if isinstance(ps, bool) or not isinstance(ps, int):
        raise TypeError(f"page_size must be an int, got {type(ps).__name__}")
    if ps <= 0 or ps % BLOCK:
        raise ValueError(f"page_size must be a positive multiple of {BLOCK}, got {ps}")
    mbs = group["min_8bit_size"]
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {mbs!r}")
    return lr, b1, b2, eps, wd


def _bad_grad(p, g, where):
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"PagedAdamW does not support sparse gradients ({where})")
    if g.is_complex():
        raise TypeError(f"PagedAdamW does not support complex gradients ({where})")
    raise TypeError(f"grad dtype {g.dtype} differs from param dtype {p.dtype} ({where})")


def _step_value(step, key):
    """A saved 'step' (an int, or a one-element tensor holding one, as torch's optimizers save it)."""
    if isinstance(step, torch.Tensor):
        v = step.item() if step.numel() == 1 else None
        step = int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"state of param {key}: step must be an int >= 0, got {step!r}")
    return step


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with paged 32-bit or 8-bit state.

    Args:
        params: iterable of parameters or of param-group dicts (each group may override any
            keyword below).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (p -= lr * wd * p, then the Adam step).
        optim_bits: 32 (float32 m and v) or 8 (blockwise dynamic quantization: blocks of 256
            elements with one float32 absmax each, m in the signed and v in the unsigned 8-bit
            dynamic code, requantized to the exact-nearest code every step, as bitsandbytes'
            8-bit blockwise AdamW). Tensors with fewer than `min_8bit_size` elements keep 32-bit
            state.
        paged: CUDA parameters keep their state in pinned host memory and stream it through the
            GPU page by page (no effect on CPU parameters).
        page_size: elements per page (a positive multiple of 256).

    The math is float32 for every parameter dtype: fp16/bf16 parameters are read as float32,
    updated, and rounded back to their dtype (round to nearest even) every step, so updates smaller
    than half an ulp of a low-precision parameter are lost, as with torch's AdamW on bf16 params.
    m and v are always float32 (or 8-bit), never the parameter's low-precision dtype.

    The state of each parameter: "step" (int), "exp_avg", "exp_avg_sq" (flat float32 [n], or uint8
    [n] codes at 8 bits), and at 8 bits "exp_avg_absmax", "exp_avg_sq_absmax" (float32
    [ceil(n/256)]). state_dict() holds only tensors and plain Python values (torch.save, then
    torch.load(weights_only=True)); load_state_dict() restores it exactly, on any device.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 optim_bits=32, paged=True, page_size=DEFAULT_PAGE_SIZE, min_8bit_size=MIN_8BIT_SIZE):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, optim_bits=optim_bits, paged=paged,
                        page_size=page_size, min_8bit_size=min_8bit_size)
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("PagedAdamW does not support complex parameters")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"PagedAdamW supports float32, float16 and bfloat16 parameters, got {p.dtype}")

    # ------------------------------------------------------------------ state placement
    @staticmethod
    def _state_device(p, group):
        """Where a parameter's state lives: with the param, or pinned host memory when paged on CUDA."""
        if p.device.type == "cuda" and group["paged"]:
            return torch.device("cpu"), True
        return p.device, False

    def _empty(self, p, group, numel, dtype):
        dev, pinned = self._state_device(p, group)
        return torch.empty((numel,), dtype=dtype, device=dev, pin_memory=pinned)

    def _init_state(self, p, group):
        if is_dtensor(p):  # FSDP2: state shards like its parameter (this rank's rows)
            if group["optim_bits"] == 8:
                raise ValueError("PagedAdamW: optim_bits=8 is not supported for sharded (DTensor) "
                                 "parameters; use optim_bits=32 under FSDP2")
            return {"step": 0, **{name: _like_param(p, torch.zeros_like(p._local_tensor,
                                                                        dtype=torch.float32))
                                  for name in _STATE32}}
        n = p.numel()
        eight = group["optim_bits"] == 8 and n >= group["min_8bit_size"]
        st = {"step": 0}
        if eight:
            st["exp_avg"] = self._empty(p, group, n, torch.uint8).fill_(127)  # code of 0.0 (signed)
            st["exp_avg_sq"] = self._empty(p, group, n, torch.uint8).zero_()  # code of 0.0 (unsigned)
            st["exp_avg_absmax"] = self._empty(p, group, n_blocks(n), torch.float32).zero_()
            st["exp_avg_sq_absmax"] = self._empty(p, group, n_blocks(n), torch.float32).zero_()
        else:
            st["exp_avg"] = self._empty(p, group, n, torch.float32).zero_()
            st["exp_avg_sq"] = self._empty(p, group, n, torch.float32).zero_()
        return st

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            lr, b1, b2, eps, wd = _check_group(group)
            # One multi-tensor op per (state kind, device, step): the CPU kernel runs a whole
            # list in one OpenMP region, instead of one op dispatch and fork/join per tensor.
            batches = {}
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None or p.numel() == 0:
                    continue
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p, group))
                if is_dtensor(p):  # the kernels update this rank's shard
                    p, g = p._local_tensor, g._local_tensor
                    if p.numel() == 0:
                        st["step"] += 1
                        continue
                if g.layout != torch.strided or g.dtype != p.dtype or g.is_complex():
                    _bad_grad(p, g, f"param {pi} of group {gi}, shape {tuple(p.shape)}")
                st["step"] += 1
                eight = st["exp_avg"].dtype == torch.uint8
                names = _STATE8 if eight else _STATE32
                lists = batches.setdefault((eight, p.device, st["step"]), [[] for _ in range(2 + len(names))])
                lists[0].append(p)
                lists[1].append(g)
                for lst, name in zip(lists[2:], names):
                    lst.append(_local_flat(st[name]))
            for (eight, _, step), lists in batches.items():
                op = torch.ops.nf4lora.adamw8bit_step_multi if eight else torch.ops.nf4lora.adamw_step_multi
                op(*lists, lr, b1, b2, eps, wd, step, group["page_size"])
        return loss

    # ------------------------------------------------------------------ state dict
    def _sync_paged(self):
        """Wait for in-flight page copies (paged CUDA state is written back asynchronously)."""
        if torch.cuda.is_available() and any(
                p.device.type == "cuda" for g in self.param_groups for p in g["params"]):
            torch.cuda.synchronize()

    def state_dict(self):
        self._sync_paged()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        """Restore a state_dict() exactly: hyper-parameters (lr, betas, eps, weight_decay,
        optim_bits, ...) from its param groups, every state tensor copied bit for bit onto this
        optimizer's placement (param device, or pinned host memory for paged CUDA params). The
        placement settings `paged` and `page_size` stay this optimizer's own; results do not
        depend on them."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        self._sync_paged()
        # Placement (paged, page_size) is this optimizer's own setting, not training state: keep it,
        # so a checkpoint written on one device loads onto any other placement.
        placement = [{k: g[k] for k in _PLACEMENT} for g in self.param_groups]
        # torch validates the groups and restores their hyper-parameters; the state is ours to place
        # (torch would cast float state to the param dtype: lossy for bf16 params and 8-bit absmax).
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for group, keep in zip(self.param_groups, placement):
            group.update(keep)
            _check_group(group)
        id_map = {}
        for sg, g in zip(saved_groups, self.param_groups):
            for old, p in zip(sg["params"], g["params"]):
                id_map[old] = (p, g)
        self.state.clear()
        for key, st in saved_state.items():
            if key not in id_map:
                raise ValueError(f"state_dict['state'] has an entry for unknown param index {key}")
            p, g = id_map[key]
            self.state[p] = self._restore_param_state(p, g, st, key)

    def _restore_param_state(self, p, group, st, key):
        if is_dtensor(p):
            return self._restore_sharded_state(p, st, key)
        n = p.numel()
        if not isinstance(st, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(st):
            raise ValueError(f"state of param {key} must hold 'step', 'exp_avg', 'exp_avg_sq'")
        step = _step_value(st["step"], key)
        eight = st["exp_avg"].dtype == torch.uint8
        expect = {"exp_avg": (n, torch.uint8 if eight else torch.float32),
                  "exp_avg_sq": (n, torch.uint8 if eight else torch.float32)}
        if eight:
            expect["exp_avg_absmax"] = (n_blocks(n), torch.float32)
            expect["exp_avg_sq_absmax"] = (n_blocks(n), torch.float32)
        out = {"step": step}
        for name, (numel, dtype) in expect.items():
            t = st.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != numel:
                got = "missing" if t is None else f"{getattr(t, 'dtype', type(t).__name__)} with {getattr(t, 'numel', lambda: '?')()} elements"
                raise ValueError(f"state of param {key}: {name} must be {dtype} with {numel} elements, got {got}")
            out[name] = self._empty(p, group, numel, dtype).copy_(t.reshape(-1))
        return out

    def _restore_sharded_state(self, p, st, key):
        """A sharded parameter's state: DTensors laid out like it (this rank's shard), as
        torch.distributed.checkpoint hands them back."""
        if not isinstance(st, dict) or not {"step", *_STATE32} <= set(st):
            raise ValueError(f"state of param {key} must hold 'step', 'exp_avg', 'exp_avg_sq'")
        out = {"step": _step_value(st["step"], key)}
        local = p._local_tensor
        for name in _STATE32:
            t = st[name]
            t = t._local_tensor if is_dtensor(t) else t
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != local.numel():
                raise ValueError(f"state of param {key}: {name} must be float32 with this rank's "
                                 f"{local.numel()} elements")
            out[name] = _like_param(p, t.to(local.device, copy=True).reshape(local.shape))
        return out


def _like_param(p, local):
    """A state tensor sharded like the DTensor parameter p, from this rank's part `local`."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def _local_flat(t):
    """The flat view the kernels update: this rank's part of a sharded state tensor, or t."""
    return t._local_tensor.view(-1) if is_dtensor(t) else t

