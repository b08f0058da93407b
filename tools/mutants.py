"""pytest plugin for tools/mutation_check.py: with NF4LORA_MUTANT=<name> it plants one deliberate
bug in nf4lora before the tests run (`pytest -p mutants`, tools/ on sys.path). Each mutant emulates
a real failure mode: a wrong code from a fast kernel (the csrc/ref twin intact), an off-by-a-little
output column, a dropout mask regenerated from the wrong seed, a dropped weight decay, a skipped
argument check, a non-atomic save, a lost thread-count hand-off, a wrong merge. The core tests must
fail on every one."""
import contextlib
import ctypes
import os
import warnings

MUTANTS = {}


def mutant(fn):
    MUTANTS[fn.__name__.replace("_", "-")] = fn
    return fn


def _wrap_native(name, after):
    """Wrap nf4lora._native._C.<name> (what the backends call); after(args) runs after the call."""
    from nf4lora import _native
    real = getattr(_native._C, name)

    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        after(args)
        return out
    _native._C.__dict__[name] = call


def _wrap_op(op, fn_name, module, post=None, pre=None):
    """Re-register the CPU kernel of nf4lora::<op> as the backend's function with a bug around it."""
    import torch
    real = getattr(module, fn_name)

    def kernel(*args):
        if pre is not None:
            args = pre(args)
        out = real(*args)
        return post(out, args) if post is not None else out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.register_kernel(f"nf4lora::{op}", "cpu", kernel)


@mutant
def quantize_code():
    """The fast quantize kernel writes one wrong code (element n/2)."""
    def after(a):
        n, packed, impl = a[2], a[4], a[-1]
        if impl == "fast" and n >= 2:
            byte = ctypes.c_uint8.from_address(packed + (n // 2) // 2)
            byte.value ^= 0x10 if (n // 2) % 2 == 0 else 0x01
    _wrap_native("nf4_quantize", after)


@mutant
def double_quant_code():
    """The fast double-quant kernel writes one absmax code off by one."""
    def after(a):
        nb, q, impl = a[1], a[4], a[-1]
        if impl == "fast":
            byte = ctypes.c_uint8.from_address(q + nb // 2)
            byte.value = (byte.value + 1) % 256
    _wrap_native("absmax_quantize", after)


@mutant
def dequantize_tail():
    """dequantize leaves the last element of a ragged tensor as 0 (a tail-loop bug)."""
    from nf4lora.backends import cpu

    def post(out, args):
        if out.numel() > 1 and out.numel() % 32:
            out.view(-1)[-1] = 0
        return out
    _wrap_op("dequantize_nf4", "dequantize_nf4", cpu, post)


@mutant
def linear_last_column():
    """The fused forward is 1e-4 off (relative) in its last output column."""
    from nf4lora.backends import cpu_linear

    def post_y(out, args):
        y = out[0] if isinstance(out, tuple) else out
        y[..., -1] *= 1.0001
        return out
    _wrap_op("nf4_linear", "nf4_linear", cpu_linear, post_y)
    _wrap_op("qlora_fwd", "qlora_fwd", cpu_linear, post_y)


@mutant
def linear_dx():
    """dx = dy W is 1e-4 off in its first column."""
    from nf4lora.backends import cpu_linear

    def post(dx, args):
        dx[..., 0] *= 1.0001
        return dx
    _wrap_op("nf4_linear_t", "nf4_linear_t", cpu_linear, post)
    _wrap_op("qlora_bwd_dx", "qlora_bwd_dx", cpu_linear, post)


@mutant
def lora_grad_a():
    """dA is scaled by 1 + 1e-4."""
    from nf4lora.backends import cpu_linear
    _wrap_op("lora_grad_a", "lora_grad_a", cpu_linear, lambda dA, args: dA * 1.0001)


@mutant
def dropout_seed():
    """The forward regenerates its dropout mask from seed + 1 (backward uses the right one)."""
    import torch
    from nf4lora.backends import cpu_linear

    def pre(args):
        args = list(args)
        if args[-1] is not None:
            args[-1] = args[-1] + 1
        return tuple(args)
    _wrap_op("qlora_fwd", "qlora_fwd", cpu_linear, pre=pre)
    del torch


@mutant
def adamw_no_decay():
    """The 32-bit AdamW step drops the weight decay."""
    from nf4lora.backends import optim_cpu

    def pre(args):
        args = list(args)
        args[-3] = 0.0  # weight_decay (then step, page_size)
        return tuple(args)
    _wrap_op("adamw_step_multi", "adamw_step_multi", optim_cpu, pre=pre)


@mutant
def adamw8_state():
    """The 8-bit AdamW step leaves the first m code one off."""
    from nf4lora.backends import optim_cpu

    def post(out, args):
        for m in args[2]:
            if m.numel():
                m.view(-1)[0] = (int(m.view(-1)[0]) + 1) % 256
        return out
    _wrap_op("adamw8bit_step_multi", "adamw8bit_step_multi", optim_cpu, post)


@mutant
def blocksize_check():
    """The public blocksize check accepts any int."""
    import nf4lora._checks as checks
    import nf4lora.nf4 as nf4
    ok = lambda blocksize, name="blocksize": blocksize  # noqa: E731
    checks.check_blocksize = ok
    nf4.check_blocksize = ok


@mutant
def adapter_config_checks():
    """load_adapter stops checking adapter_config.json field types."""
    from nf4lora.lora import io
    io._CHECK_FIELDS.update({k: (lambda cpath, cfg: None) for k in io._CHECK_FIELDS})


@mutant
def non_atomic_save():
    """Saves write straight into the final file (no temporary file + rename)."""
    from nf4lora import checkpoint
    from nf4lora.lora import bnb, io

    @contextlib.contextmanager
    def direct(path):
        yield path
    for mod in (io, bnb, checkpoint):
        mod.atomic_path = direct
    io.atomic_write_text = lambda path, text: open(path, "w").write(text)


@mutant
def no_thread_handoff():
    """Our kernels keep the OpenMP runtime's own thread count (torch.set_num_threads ignored)."""
    from nf4lora import _native
    _native.sync_threads = lambda: None


@mutant
def merge_wrong():
    """merge_and_unload adds 1e-3 to one element of one merged weight."""
    import nf4lora
    import nf4lora.lora as lora
    import torch
    real = lora.merge_and_unload

    def merged(model, *a, **k):
        from nf4lora.nn import QLoRALinear
        adapted = [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
        out = real(model, *a, **k)
        if adapted:  # one merged layer (W + s B A) gets a wrong element
            with torch.no_grad():
                out.get_submodule(adapted[0]).weight.view(-1)[0] += 1e-3
        return out
    nf4lora.merge_and_unload = lora.merge_and_unload = merged


def pytest_configure(config):
    name = os.environ.get("NF4LORA_MUTANT")
    if name:
        MUTANTS[name]()
        config.stash_mutant = name  # noqa: B010 - marker for the report


def pytest_report_header(config):
    name = os.environ.get("NF4LORA_MUTANT")
    return f"nf4lora mutant: {name} ({MUTANTS[name].__doc__})" if name else None
