"""Tiny transformers models built from configs (nothing downloaded) and helpers shared by the
model-level tests."""
import torch

VOCAB = 96


def tiny_llama(layers=2, hidden=64, inter=128, seed=0, dtype=torch.float32, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(dtype)
    m.eval()
    return m


def tokens(batch=2, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def dequantized_copy(qmodel, base):
    """`base` (a plain model of the same architecture) with each QLoRALinear of `qmodel` replaced by
    an nn.Linear holding its dequantized NF4 weight: the reference model PEFT wraps."""
    import copy

    from nf4lora.nn import QLoRALinear
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, QLoRALinear):
                lin = ref.get_submodule(name)
                lin.weight.copy_(m.nf4_weight.dequantize(lin.weight.dtype))
    return ref


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randomize_adapters(model, adapter="default", seed=0, scale=0.05):
    """Give every adapter weight a non-zero value (B starts at zero, which would hide bugs)."""
    from nf4lora.nn import QLoRALinear
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, QLoRALinear) and adapter in m.lora_config:
                for p in (m.lora_A[adapter].weight, m.lora_B[adapter].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
