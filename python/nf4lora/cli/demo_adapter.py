"""The demo's adapter directory, in PEFT's format for a transformers model class, and the checks
that PEFT reads it back.

save_adapter writes the LoRA tensors, a classifier's trained head (the model trains it as PEFT's
modules_to_save: config "modules_to_save": [head], tensors `base_model.model.<head>.weight` /
`.bias`) and adapter_config.json; the task type is added here ("SEQ_CLS"), so
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=k),
adapter)` and nl.load_adapter restore the whole fine-tune. Everything is written in a temporary sibling directory and
renamed into place at the end: an interrupted run leaves the previous adapter (or none), never half
of one.
"""
import copy
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file

from .. import QLoRALinear, save_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _set_task_type(directory, task_type):
    cpath = os.path.join(directory, CONFIG)
    with open(cpath) as f:
        cfg = json.load(f)
    cfg["task_type"] = task_type
    with open(cpath, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def write_adapter(model, path, task_type):
    """Write the adapter (+ trained head) to `path` atomically: a temp dir beside it, then rename."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    tmp = tempfile.mkdtemp(prefix=".adapter.tmp-", dir=parent)
    old = None
    try:
        save_adapter(model, tmp)
        _set_task_type(tmp, task_type)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".adapter.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def dequantized_base(model, fresh):
    """`fresh` (the same architecture as loaded from the model dir, plain linears) with each NF4
    layer's dequantized weight copied in: the base model PEFT wraps."""
    base = copy.deepcopy(fresh)
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, QLoRALinear):
                continue
            lin = base.get_submodule(name)
            lin.weight.copy_(m.nf4_weight.dequantize(lin.weight.dtype))
            if m.bias is not None and lin.bias is not None:
                lin.bias.copy_(m.bias)
    return base


def peft_logits(base, adapter_dir, data, batch_size=64):
    """Load the adapter with PEFT onto `base` and return its logits on `data` plus the number of
    tensors PEFT's file holds vs the number it loaded (missing keys of the adapter)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    pm = PeftModel.from_pretrained(base, adapter_dir)
    pm.eval()
    saved = load_file(os.path.join(adapter_dir, WEIGHTS))
    loaded = get_peft_model_state_dict(pm)
    outs = []
    with torch.no_grad():
        n = len(data["labels"])
        for i in range(0, n, batch_size):
            outs.append(pm(**{k: v[i:i + batch_size] for k, v in data.items() if k != "labels"}).logits)
    same = sorted(saved) == sorted(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    return torch.cat(outs).float(), {"tensors_in_file": len(saved), "tensors_in_peft": len(loaded),
                                     "all_loaded": same}
