"""The real numbers beside `nf4lora memory`'s formulas, on a local model (the bundled MiniLM): load
it, quantize the block linears to NF4 (quantize_model), add LoRA on the --targets (apply_qlora), take
one PagedAdamW step, and count the bytes each holds."""
import torch

from .. import PagedAdamW, QLoRALinear, apply_qlora, quantize_model
from .demo_model import _quiet_transformers, read_config
from .errors import CLIError, require
from .memory_math import ALIASES, ROLES


def role_of(name):
    """The block role (q, k, v, o, gate, up, down) of a linear's module name, or None."""
    parts = name.split(".")
    last = parts[-1]
    if last == "dense" and len(parts) >= 2:  # BERT: attention.output.dense, intermediate.dense, output.dense
        if parts[-2] == "intermediate":
            return "up"
        if parts[-2] == "output":
            return "o" if len(parts) >= 3 and parts[-3] == "attention" else "down"
        return None
    return last if last in ROLES else ALIASES.get(last)


def measure(model_dir, st):
    """{"nf4_linears", "adapter", "optimizer"} bytes measured on the model in model_dir."""
    read_config(model_dir)
    require("transformers", why="measuring a model (nf4lora memory --no-measure skips it)")
    tf = _quiet_transformers()
    try:
        model = tf.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and role_of(n)]
    targets = [n for n in linears if role_of(n) in st.targets]
    if not targets:
        raise CLIError(f"--targets {','.join(st.targets)} matched no linear of {model_dir}")
    quantize_model(model, target_modules=linears, blocksize=st.blocksize, double_quant=True)
    apply_qlora(model, targets, r=st.r, lora_alpha=2 * st.r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, optim_bits=st.optim_bits, page_size=st.page_size)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"nf4_linears": sum(m.nf4_weight.nbytes for m in model.modules() if isinstance(m, QLoRALinear)),
            "adapter": sum(p.numel() * p.element_size() for p in params),
            "optimizer": state, "quantized_layers": len(linears), "adapted_layers": len(targets)}
