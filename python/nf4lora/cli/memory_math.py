"""The memory arithmetic of `nf4lora memory`: what full fine-tuning, LoRA and QLoRA hold (weights,
gradients, optimizer state, activations) for a decoder or encoder architecture, from its shape.
Every number comes with the formula that made it (FORMULAS), so the table can print both.

Conventions (the QLoRA paper's setting): full fine-tuning in bf16 with fp32 master weights and
AdamW (16 B/param); LoRA and QLoRA keep adapters, their gradients and AdamW state in fp32; QLoRA's
base linears are NF4 (blocksize 64) with double-quantized scales; everything that is not a quantized
linear (embeddings, norms, biases, output head) stays bf16; activations assume gradient
checkpointing (each layer's input kept, one layer recomputed at a time) and an attention that does
not materialise the s x s scores (SDPA / FlashAttention).
"""
import json
from dataclasses import asdict, dataclass, field

from .errors import CLIError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ALIASES = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
           "o_proj": "o", "out_proj": "o", "dense": "o", "gate_proj": "gate", "w1": "gate",
           "up_proj": "up", "intermediate": "up", "w3": "up", "down_proj": "down", "output": "down",
           "w2": "down"}
CODE8_BYTES = 256 * 4  # the double-quant code table each NF4 tensor carries (float32 [256])


@dataclass
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    gated: bool = True          # SwiGLU MLP (gate, up, down) or plain (up, down)
    tied: bool = False          # output head shares the embedding
    bias: bool = False          # linears carry biases (BERT)
    extra_params: int = 0       # other 16-bit parameters (position / type embeddings, pooler)
    lm_head: bool = True        # a vocab-sized output head (decoders)

    @property
    def kv_dim(self):
        return self.hidden // self.heads * self.kv_heads

    def linears(self):
        """{role: (in_features, out_features)} of one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i),
                  "down": (i, h)}
        if not self.gated:
            del shapes["gate"]
        return shapes


PRESETS = {
    "llama-2-7b": Arch("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Arch("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Arch("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
}


def _need(cfg, path, *keys):
    for k in keys:
        if k in cfg:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise CLIError(f"{path}: '{k}' must be a positive integer, got {v!r}")
            return v
    raise CLIError(f"{path}: missing '{keys[0]}' (not a transformers decoder/encoder config)")


def arch_from_config(path):
    """An Arch from a Hugging Face config.json (LLaMA-style decoders and BERT-style encoders)."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CLIError(f"config not found: {path}")
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {' '.join(str(e).split())}")
    if not isinstance(cfg, dict):
        raise CLIError(f"{path}: a config must be a JSON object")
    h = _need(cfg, path, "hidden_size", "n_embd", "d_model")
    heads = _need(cfg, path, "num_attention_heads", "n_head")
    kv = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise CLIError(f"{path}: num_key_value_heads {kv!r} must divide num_attention_heads {heads}")
    encoder = cfg.get("model_type") in ("bert", "roberta", "xlm-roberta", "distilbert", "electra")
    act = str(cfg.get("hidden_act", "silu"))
    arch = Arch(name=cfg.get("_name_or_path") or cfg.get("model_type") or path,
                hidden=h, intermediate=_need(cfg, path, "intermediate_size", "n_inner", "ffn_dim"),
                layers=_need(cfg, path, "num_hidden_layers", "n_layer"), heads=heads, kv_heads=kv,
                vocab=_need(cfg, path, "vocab_size"), gated=act in ("silu", "swish", "swiglu"),
                tied=bool(cfg.get("tie_word_embeddings", not encoder)) if not encoder else True,
                bias=encoder or bool(cfg.get("attention_bias") or cfg.get("mlp_bias")), lm_head=not encoder)
    if encoder:  # position and token-type embeddings, the pooler (dense + bias)
        arch.extra_params = (cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)) * h \
            + h * h + h
    return arch


def parse_targets(text, arch):
    """--targets: "all-linear" or a comma list of module names (q_proj, v_proj, query, ...)."""
    if text.strip().lower() == "all-linear":
        return list(arch.linears())
    roles = []
    for name in (t.strip() for t in text.split(",")):
        role = name if name in ROLES else ALIASES.get(name)
        if role is None or role not in arch.linears():
            raise CLIError(f"unknown --targets entry {name!r}; use all-linear or module names such as "
                           "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
        if role not in roles:
            roles.append(role)
    return roles


def nf4_bytes(n, blocksize=64, double_quant=True):
    """Bytes of one NF4 tensor of n elements as nf4lora stores it: packed codes (2 per byte) plus
    per-block absmax (uint8 codes + float32 per 256 blocks + the 256-entry code table with double
    quant; float32 per block without)."""
    blocks = -(-n // blocksize)
    scales = blocks + 4 * -(-blocks // 256) + CODE8_BYTES if double_quant else 4 * blocks
    return -(-n // 2) + scales


def adamw_state_bytes(n, bits=32, min_8bit_size=4096):
    """PagedAdamW state of one tensor: m and v in fp32, or 8-bit codes + a float32 absmax per 256
    (tensors under min_8bit_size elements stay 32-bit, as bitsandbytes does)."""
    if bits == 8 and n >= min_8bit_size:
        return 2 * n + 2 * 4 * -(-n // 256)
    return 8 * n


@dataclass
class Settings:
    batch: int = 1
    seq: int = 512
    r: int = 16
    targets: list = field(default_factory=lambda: list(ROLES))
    optim_bits: int = 32
    blocksize: int = 64
    page_size: int = 1 << 20


FORMULAS = {
    "params": "P = L*(sum of block linears) + V*h*(1 + untied head) + norms/biases/other",
    "full.weights": "2*P (bf16)",
    "full.gradients": "2*P (bf16)",
    "full.optimizer": "12*P (fp32 master copy 4 + AdamW m 4 + v 4)",
    "lora.weights": "2*P (bf16 base) + 4*A (fp32 adapters), A = L*sum_targets r*(in+out)",
    "lora.gradients": "4*A",
    "lora.optimizer": "8*A (AdamW m, v fp32) [8-bit: 2*A + 8*ceil(n/256) per tensor]",
    "qlora.weights": "sum over quantized linears of ceil(n/2) + ceil(n/64) + 4*ceil(ceil(n/64)/256) + 1024"
                     " (NF4 + double-quant scales) + 2*(P - P_linear) + 4*A",
    "qlora.gradients": "4*A",
    "qlora.optimizer": "as LoRA; paged: on a GPU only 3 staging pages stay resident",
    "activations": "2*b*s*h*L (each layer's input, bf16, gradient checkpointing) + one layer recomputed: "
                   "2*b*s*(4h + 2*kv + 3i) + 4*b*s*V (fp32 logits)",
    "double_quant_saving": "sum over linears of 4*ceil(n/64) - (ceil(n/64) + 4*ceil(ceil(n/64)/256) + 1024)",
}


def table(arch, st):
    """Every number of the report, in bytes (and parameter counts), as a dict."""
    lin = arch.linears()
    per_block = sum(i * o for i, o in lin.values())
    p_linear = arch.layers * per_block
    biases = arch.layers * sum(o for _, o in lin.values()) if arch.bias else 0
    norms = arch.layers * 2 * arch.hidden * (2 if arch.bias else 1) + arch.hidden
    embed = arch.vocab * arch.hidden * (1 if arch.tied or not arch.lm_head else 2)
    P = p_linear + biases + norms + embed + arch.extra_params
    adapter_tensors = [n for role in st.targets for n in (st.r * lin[role][0], st.r * lin[role][1])]
    A = arch.layers * sum(adapter_tensors)
    opt_bytes = arch.layers * sum(adamw_state_bytes(n, st.optim_bits) for n in adapter_tensors)
    nf4 = arch.layers * sum(nf4_bytes(i * o, st.blocksize, True) for i, o in lin.values())
    nf4_nodq = arch.layers * sum(nf4_bytes(i * o, st.blocksize, False) for i, o in lin.values())
    b, s, h, i, L = st.batch, st.seq, arch.hidden, arch.intermediate, arch.layers
    act = 2 * b * s * h * L + 2 * b * s * (4 * h + 2 * arch.kv_dim + 3 * i) + \
        (4 * b * s * arch.vocab if arch.lm_head else 0)
    methods = {
        "full": {"weights": 2 * P, "gradients": 2 * P, "optimizer": 12 * P, "activations": act},
        "lora": {"weights": 2 * P + 4 * A, "gradients": 4 * A, "optimizer": opt_bytes, "activations": act},
        "qlora": {"weights": nf4 + 2 * (P - p_linear) + 4 * A, "gradients": 4 * A, "optimizer": opt_bytes,
                  "activations": act},
    }
    for m in methods.values():
        m["total"] = sum(m.values())
    page_bytes = st.page_size * (8 if st.optim_bits == 32 else 2)
    return {
        "arch": asdict(arch), "settings": asdict(st),
        "params": {"total": P, "quantized_linears": p_linear, "adapter": A},
        "methods": methods,
        "qlora_base_bytes": {"nf4_linears": nf4, "nf4_linears_without_double_quant": nf4_nodq,
                             "bf16_rest": 2 * (P - p_linear)},
        "double_quant_saving_bytes": nf4_nodq - nf4,
        "paged_optimizer": {"state_bytes": opt_bytes, "resident_on_gpu_bytes": min(opt_bytes, 3 * page_bytes),
                            "note": "PagedAdamW(paged=True) on CUDA keeps state in pinned host memory and "
                                    "streams it through 3 device pages of page_size elements"},
        "formulas": FORMULAS,
    }


def fmt_bytes(n):
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 1024 else f"{n} B"
