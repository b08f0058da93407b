"""Model surgery: apply_qlora (NF4 base + LoRA adapters, PEFT's matching rules), quantize_model (NF4
linears without adapters), prepare_for_training, and the adapter controls (set_adapter,
disable_adapter, delete_adapter, mixed_batch).

The model keeps its own class; adapted layers become QLoRALinear in place. The model's own adapter
state (what save_adapter writes to adapter_config.json, the active adapters, VeRA's shared
projections, AdaLoRA's allocator) is one ModelAdapters object in `model._nf4lora`: a plain
attribute, so the model deep-copies and pickles.
"""
import contextlib
import dataclasses
import math

from torch import nn

from ..adapters.base import check_dropout as _check_dropout
from ..adapters.lora import check_init, is_basic_init
from ..adapters.bdlora import BdLoraConfig, bd_side, check_bdlora, compact_shapes
from ..adapters.blockdiag import PEFT_TYPE as BLOCKDIAG_TYPE
from ..adapters.blockdiag import BlockLoraConfig, check_blocks
from ..nn import ADAPTER_PARTS, QLoRALinear, _check_adapter_name
from . import modules_to_save as mts
from .targets import ALL_LINEAR, find_targets, pattern_value


def qlora_layers(model):
    """(name, QLoRALinear) for every adapted or quantized layer of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]


@dataclasses.dataclass
class ModelAdapters:
    """Everything nf4lora keeps on a model (beside its layers)."""
    configs: dict = dataclasses.field(default_factory=dict)  # adapter -> adapter_config.json fields
    active: list = dataclasses.field(default_factory=list)   # the active adapters, in order
    vera: dict = dataclasses.field(default_factory=dict)     # adapter -> its shared VeraProjections
    adalora: dict = None  # the trained AdaLoRA adapter's allocator state (lora/adalora.py)


def model_adapters(model) -> ModelAdapters:
    st = model.__dict__.get("_nf4lora")
    if st is None:
        st = model.__dict__["_nf4lora"] = ModelAdapters()
    return st


def forget_adapters(model):
    """Drop the model's adapter state (merge_and_unload)."""
    model.__dict__.pop("_nf4lora", None)


def adapter_configs(model) -> dict:
    return model_adapters(model).configs


def active_adapters(model) -> list:
    return list(model_adapters(model).active)


def _set_child(model, name, new):
    """Put `new` in place of the module `name`, in that module's train / eval mode (a layer made
    from an eval-mode model must not run its dropout)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)
    if isinstance(new, QLoRALinear):
        _ddp_ignore(model, name + ".weight")


def _ddp_ignore(model, param_name):
    """DistributedDataParallel broadcasts every parameter from rank 0 at construction by
    concatenating them into one dense buffer, which an NF4Tensor cannot join (and need not: it is
    frozen, and every rank loads the same checkpoint). DDP skips the names listed here; the
    adapters' parameters stay in DDP's broadcast and gradient all-reduce."""
    ignored = model.__dict__.setdefault("_ddp_params_and_buffers_to_ignore", [])
    if param_name not in ignored:
        ignored.append(param_name)


def _check_targets(model, names, what):
    if not names:
        raise ValueError(f"{what} matched no module of {type(model).__name__}")
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, (nn.Linear, QLoRALinear)):
            raise ValueError(f"target module '{n}' is a {type(m).__name__}; only nn.Linear layers "
                             "can be adapted")


def _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform, layers_pattern,
                         exclude_modules):
    """The first checks of every apply_*: a fresh adapter name, and the (sorted) target_modules with
    the module names they select in this model. Changes nothing."""
    _check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick "
                         "another adapter_name")
    if isinstance(target_modules, (set, tuple)):
        target_modules = sorted(target_modules)
    names = find_targets(model, target_modules, layers_to_transform, layers_pattern, exclude_modules)
    _check_targets(model, names, f"target_modules={target_modules!r}")
    return target_modules, names


def _adaptable_layers(model, names, blocksize, double_quant):
    """Freeze every parameter of the model, then the layers `names` as QLoRALinear (an nn.Linear is
    quantized to NF4 and replaced on the way), in order. Call only after every check passed."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for n in names:
        layer = model.get_submodule(n)
        if not isinstance(layer, QLoRALinear):
            layer = QLoRALinear.from_linear(layer, r=0, blocksize=blocksize, double_quant=double_quant)
            _set_child(model, n, layer)
        layers.append(layer)
    return layers


def _targets_record(target_modules, names, exclude_modules):
    """How an adapter config records its targets (what save_adapter writes): "all-linear" as the
    module names it selected, lists as lists."""
    resolved = names if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR \
        else target_modules
    return dict(target_modules=list(resolved) if not isinstance(resolved, str) else resolved,
                exclude_modules=list(exclude_modules) if isinstance(exclude_modules, (list, set, tuple))
                else exclude_modules)


def _activate_new(model, adapter_name, inference_mode=False):
    """PEFT's rule for a new adapter: the model's first becomes active (trainable unless
    inference_mode); a later one stays inactive and frozen until set_adapter names it."""
    active = active_adapters(model) or [adapter_name]
    set_adapter(model, active, inference_mode=inference_mode and active == [adapter_name])


def apply_qlora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, layers_to_transform=None,
                layers_pattern=None, rank_pattern=None, alpha_pattern=None, use_rslora=False,
                init_lora_weights=True, exclude_modules=None, blocksize=64, double_quant=True,
                adapter_name="default", use_dora=False, loftq_config=None, lora_blocks=1, use_bdlora=None,
                modules_to_save=None):
    """Replace the matching nn.Linear layers of `model` by QLoRALinear (NF4 weight + a LoRA adapter
    `adapter_name`; a DoRA adapter with use_dora=True; with lora_blocks=n > 1 a block-diagonal one,
    A and B of n blocks, n x fewer parameters: adapters/blockdiag.py), in place; freeze every other
    parameter; return the model. use_bdlora: PEFT's BD-LoRA (a BdLoraConfig or its dict:
    target_modules_bd_a / target_modules_bd_b name patterns, nblocks, match_strict): A or B of the
    matching modules block-diagonal (adapters/bdlora.py), PEFT's LORA files. modules_to_save: PEFT's
    list of modules trained whole with this adapter (a classification head; lora/modules_to_save.py).

    init_lora_weights takes PEFT's names: True, False, "gaussian", and the ones that also change the
    NF4 base: "pissa" / "pissa_niter_N", "olora", "loftq" (loftq_config={"loftq_iter": n}, PEFT's
    LoftQConfig). Those decompose each target's dense weight while it is still dense (a layer that
    is already NF4 decomposes its dequantized weight; LoftQ then needs the dense one and refuses),
    and the reconstruction error ||W - (Q + s B A)|| before and after lands in the adapter's config
    as init_errors {module: (before, after)}.

    Matching follows PEFT (lora/targets.py). Layers that are already QLoRALinear (from quantize_model,
    a bitsandbytes checkpoint or an earlier adapter) get the new adapter added. The first adapter
    of a model becomes active and trainable; a later one is added inactive and frozen until
    set_adapter names it (PEFT's add_adapter behaviour)."""
    target_modules, names = _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform,
                                                 layers_pattern, exclude_modules)
    plan = [(n, pattern_value(rank_pattern, n, r), pattern_value(alpha_pattern, n, lora_alpha))
            for n in names]
    for n, ri, ai in plan:
        if isinstance(ri, bool) or not isinstance(ri, int) or ri <= 0:
            raise ValueError(f"rank for '{n}' must be a positive int, got {ri!r}")
        if isinstance(ai, bool) or not isinstance(ai, (int, float)) or not math.isfinite(ai):
            raise ValueError(f"lora_alpha for '{n}' must be a finite number, got {ai!r}")
    _check_dropout("lora_dropout", lora_dropout)
    check_init(init_lora_weights)
    basic = is_basic_init(init_lora_weights)
    options = {}
    if loftq_config is not None:
        if init_lora_weights != "loftq":
            raise ValueError("loftq_config is only used with init_lora_weights='loftq'")
        if not isinstance(loftq_config, dict) or set(loftq_config) - {"loftq_iter", "loftq_bits"}:
            raise ValueError(f"loftq_config must be a dict with loftq_iter / loftq_bits, got {loftq_config!r}")
        options.update(loftq_config)
    check_blocks(lora_blocks, None)
    if lora_blocks > 1:
        if use_dora:
            raise ValueError("lora_blocks > 1 with use_dora is not supported")
        if not basic:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} needs lora_blocks=1 (the methods "
                             "decompose into a dense A, B)")
        for n, ri, _ in plan:
            m = model.get_submodule(n)
            check_blocks(lora_blocks, ri, m.in_features, m.out_features, f" of '{n}'")
    modules_to_save = mts.check_names(modules_to_save)
    keep_whole = [] if modules_to_save is None else mts.resolve(model, modules_to_save)
    overlap = set(keep_whole) & set(names)
    if overlap:
        raise ValueError(f"modules_to_save selects adapter targets {sorted(overlap)}")
    bd = {}  # module -> its BdLoraConfig (a block-diagonal factor)
    if use_bdlora is not None:
        if dataclasses.is_dataclass(use_bdlora) and not isinstance(use_bdlora, type):
            use_bdlora = dataclasses.asdict(use_bdlora)  # PEFT's BdLoraConfig object
        use_bdlora = check_bdlora(use_bdlora)
        if use_dora or lora_blocks > 1 or not basic:
            raise ValueError("use_bdlora cannot be combined with use_dora, lora_blocks > 1 or init_lora_weights="
                             f"{init_lora_weights!r} (it takes True, False or 'gaussian')")
        for n, ri, ai in plan:
            side = bd_side(use_bdlora, n)
            if side is not None:
                m = model.get_submodule(n)
                bd[n] = BdLoraConfig(r=ri, lora_alpha=ai, lora_dropout=lora_dropout, use_rslora=bool(use_rslora),
                                     bd_side=side, nblocks=use_bdlora["nblocks"])
                compact_shapes(bd[n], m.out_features, m.in_features, f" of '{n}'")
    dense = {}
    if not basic:  # the dense weights the methods decompose, before the layers are quantized
        for n in names:
            m = model.get_submodule(n)
            if isinstance(m, nn.Linear):
                dense[n] = m.weight.detach()
            elif init_lora_weights == "loftq":
                raise ValueError(f"init_lora_weights='loftq' needs the dense weight of '{n}', which "
                                 "is already NF4: apply it to the full-precision model")

    layers = _adaptable_layers(model, names, blocksize, double_quant)
    errors = {}
    for layer, (n, ri, ai) in zip(layers, plan):
        if lora_blocks > 1:
            layer.add(adapter_name, BlockLoraConfig(r=ri, lora_alpha=ai, lora_dropout=lora_dropout,
                                                    use_rslora=bool(use_rslora), lora_blocks=lora_blocks),
                      init_lora_weights=init_lora_weights)
            continue
        if n in bd:
            layer.add(adapter_name, bd[n], init_lora_weights=init_lora_weights)
            continue
        init_options = None if basic else {**options, "weight": dense.get(n)}
        layer.add_adapter(adapter_name, ri, ai, lora_dropout, use_rslora, init_lora_weights,
                          use_dora=use_dora, init_options=init_options)
        if not basic:
            errors[n] = layer.init_errors.pop(adapter_name)
    adapter_configs(model)[adapter_name] = dict(peft_type="LORA", init_errors=errors,
        r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
        **_targets_record(target_modules, names, exclude_modules),
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=bool(use_rslora), init_lora_weights=init_lora_weights,
        blocksize=blocksize, double_quant=double_quant, use_dora=bool(use_dora), use_bdlora=use_bdlora,
        modules_to_save=modules_to_save)
    mts.add_copies(model, keep_whole, adapter_name)
    if lora_blocks > 1:  # nf4lora's own file layout (lora/io.py), not PEFT's LORA
        adapter_configs(model)[adapter_name].update(peft_type=BLOCKDIAG_TYPE, lora_blocks=lora_blocks)
    _activate_new(model, adapter_name)
    return model


def quantize_model(model, target_modules=ALL_LINEAR, exclude_modules=None, blocksize=64,
                   double_quant=True, layers_to_transform=None, layers_pattern=None):
    """Replace the matching nn.Linear layers by frozen NF4 QLoRALinear layers without adapters (for
    inference, or as the base that apply_qlora / load_adapter later adapt). The default targets
    every Linear except the output head, as bitsandbytes' 4-bit loading does. Returns the model."""
    names = find_targets(model, target_modules, layers_to_transform, layers_pattern, exclude_modules)
    _check_targets(model, names, f"target_modules={target_modules!r}")
    for n in names:
        layer = model.get_submodule(n)
        if isinstance(layer, nn.Linear):
            _set_child(model, n, QLoRALinear.from_linear(layer, r=0, blocksize=blocksize,
                                                         double_quant=double_quant))
    return model


def set_adapter(model, adapter_name, inference_mode=False):
    """Make `adapter_name` (a name or a list of names) the active adapter(s) of every layer. Their
    parameters train (unless inference_mode); every other adapter's are frozen."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = adapter_configs(model)
    for n in names:
        if n not in known:
            raise ValueError(f"adapter {n!r} not found; the model has {sorted(known)}")
    wrapped = [w for _, w in mts.wrappers(model)]
    for w in wrapped:  # checked before anything changes
        have = [n for n in names if n in w.modules_to_save]
        if len(have) > 1:
            raise ValueError(f"adapters {have} each train their own copy of a modules_to_save module; only "
                             "one of them can be active at a time (PEFT's rule)")
    for _, layer in qlora_layers(model):
        layer.set_adapter(names, requires_grad=not inference_mode)
    for w in wrapped:
        w.set_adapter(names, requires_grad=not inference_mode)
    model_adapters(model).active = names
    return model


@contextlib.contextmanager
def _set_on_every_layer(model, attr, value):
    """Inside the context every QLoRALinear (and modules_to_save wrapper) of the model has `attr` =
    value; each gets its own value back on the way out, also on an exception."""
    layers = [m for _, m in qlora_layers(model)] + [w for _, w in mts.wrappers(model)]
    saved = [getattr(m, attr) for m in layers]
    for m in layers:
        setattr(m, attr, value)
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            setattr(m, attr, s)


@contextlib.contextmanager
def disable_adapter(model):
    """Inside this context every QLoRALinear gives exactly its base output x W^T + b."""
    with _set_on_every_layer(model, "adapters_enabled", False):
        yield model


BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@contextlib.contextmanager
def mixed_batch(model, adapter_names):
    """Inference with a different adapter per example (PEFT's `adapter_names` argument): inside the
    context, batch row i of every QLoRALinear input goes through adapter adapter_names[i] ("__base__"
    for the plain base model). The NF4 GEMM runs once for the whole batch; each adapter adds its
    low-rank term to its rows. DoRA adapters work too (PEFT refuses them here).

        with nl.mixed_batch(model, ["default", "__base__", "french"]):
            logits = model(input_ids).logits      # input_ids [3, T]
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError("adapter_names must be a list with one adapter name per batch row, got "
                        f"{type(adapter_names).__name__}")
    names = list(adapter_names)
    known = adapter_configs(model)
    for n in names:
        if n != BASE and n not in known:
            raise ValueError(f"adapter_names: {n!r} is not an adapter of this model "
                             f"({sorted(known)}, or {BASE!r})")
    if model.training:
        raise ValueError("mixed_batch is for inference: call model.eval() first")
    if any(m.merged_weight is not None for _, m in qlora_layers(model)):
        raise ValueError("mixed_batch needs an unmerged model: call unmerge_adapter first")
    with _set_on_every_layer(model, "batch_adapter_names", names):
        yield model


def delete_adapter(model, adapter_name):
    """Remove an adapter from every layer. When it was the only active one, the first remaining
    adapter becomes active (as PEFT does)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; the model has {sorted(configs)}")
    for _, layer in qlora_layers(model):
        if adapter_name in layer.lora_config:
            layer.delete_adapter(adapter_name)
    for _, w in mts.wrappers(model):
        w.delete(adapter_name)
    del configs[adapter_name]
    st = model_adapters(model)
    st.vera.pop(adapter_name, None)
    if st.adalora is not None and st.adalora["adapter"] == adapter_name:
        st.adalora = None
    active = [a for a in active_adapters(model) if a != adapter_name]
    if not active and configs:
        active = [next(iter(configs))]
    if active:
        set_adapter(model, active)
    else:
        for _, layer in qlora_layers(model):
            layer.active_adapters = []
        for _, w in mts.wrappers(model):
            w.set_adapter([])
        model_adapters(model).active = []
    return model


TRAINED_PARTS = (*ADAPTER_PARTS, "modules_to_save")  # containers whose entries are an adapter's


def _make_output_require_grad(module, inputs, output):
    # module-level (not a closure), so a model carrying this hook still pickles
    output.requires_grad_(True)


def prepare_for_training(model, gradient_checkpointing=True, gradient_checkpointing_kwargs=None):
    """Get a (Q)LoRA model ready to train: freeze everything except the active adapters' weights
    (LoRA A and B, DoRA magnitudes, VeRA lambdas, AdaLoRA's E), turn off the KV cache, and with
    gradient_checkpointing enable transformers' activation checkpointing (default
    {"use_reentrant": False}) plus a picklable hook that makes the input
    embeddings' output require grad (what reentrant checkpointing needs with a frozen embedding).
    Call it before or after apply_qlora. Returns the model."""
    active = set(active_adapters(model))
    for n, p in model.named_parameters():
        parts = n.split(".")
        is_lora = any(parts[i] in TRAINED_PARTS and parts[i + 1] in active for i in range(len(parts) - 1))
        p.requires_grad_(is_lora)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if not gradient_checkpointing:
        return model
    kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "pass gradient_checkpointing=False")
    # transformers registers a closure hook (unpicklable); swap it for a module-level one
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
        model._require_grads_hooks = []
        model.__dict__.pop("_require_grads_hook", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and not getattr(emb, "_nf4lora_grad_hook", False):
        emb.register_forward_hook(_make_output_require_grad)
        emb._nf4lora_grad_hook = True
    return model


def trainable_parameters(model):
    """(trainable, total) parameter counts; a packed NF4 weight counts its n elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for _, m in qlora_layers(model))
    return trainable, total
