"""`nf4lora memory`: the memory tables the QLoRA literature quotes (weights, gradients, optimizer
state, activations for full fine-tuning, LoRA and QLoRA), computed from a model's architecture with
the formula beside each number (memory_math.py); on a local model with weights (the bundled MiniLM)
the NF4, adapter and optimizer bytes are also measured (memory_measure.py)."""
import json
import os

import click

from .errors import CLIError
from .outputs import finite
from .memory_math import FORMULAS, PRESETS, Settings, arch_from_config, fmt_bytes, parse_targets, table

BUNDLED = ("all-minilm-l6-v2", "bundled")


def resolve(model):
    """(Arch, model directory to measure or None) for --model."""
    if model in PRESETS:
        return PRESETS[model], None
    if model in BUNDLED:
        from .demo_model import bundled_model_dir
        d = bundled_model_dir()
        return arch_from_config(os.path.join(d, "config.json")), d
    if os.path.isdir(model):
        cfg = os.path.join(model, "config.json")
        if not os.path.isfile(cfg):
            raise CLIError(f"{model} has no config.json")
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(model))
        return arch_from_config(cfg), model if has_weights else None
    if model.endswith(".json") or os.path.exists(model):
        return arch_from_config(model), None
    raise CLIError(f"unknown --model {model!r}: use {', '.join(PRESETS)}, {BUNDLED[0]}, a config.json "
                   "or a model directory")


def _print(rep, measured):
    a, st, p = rep["arch"], rep["settings"], rep["params"]
    click.echo(f"{a['name']}: {a['layers']} layers, hidden {a['hidden']}, intermediate {a['intermediate']}, "
               f"heads {a['heads']} (kv {a['kv_heads']}), vocab {a['vocab']}; {p['total'] / 1e9:.3f} B "
               f"params, {p['quantized_linears'] / 1e9:.3f} B in block linears")
    click.echo(f"batch {st['batch']}, seq {st['seq']}, LoRA r={st['r']} on {','.join(st['targets'])}: "
               f"{p['adapter']:,} adapter params; AdamW state {st['optim_bits']}-bit\n")
    rows = ("weights", "gradients", "optimizer", "activations", "total")
    hdr = f"{'':<12}{'full FT (bf16)':>16}{'LoRA (bf16 base)':>18}{'QLoRA (NF4 base)':>18}"
    click.echo(hdr)
    click.echo("-" * len(hdr))
    m = rep["methods"]
    for r in rows:
        click.echo(f"{r:<12}" + "".join(f"{fmt_bytes(m[k][r]):>{w}}" for k, w in
                                        (("full", 16), ("lora", 18), ("qlora", 18))))
    click.echo("\nformulas (bytes; P params, A adapter params, L layers, h hidden, i intermediate, "
               "kv k/v width, V vocab, b batch, s seq):")
    for k, v in FORMULAS.items():
        click.echo(f"  {k:<20} {v}")
    base = rep["qlora_base_bytes"]
    click.echo(f"\ndouble quant: NF4 linears {fmt_bytes(base['nf4_linears'])} vs "
               f"{fmt_bytes(base['nf4_linears_without_double_quant'])} with float32 scales: saves "
               f"{fmt_bytes(rep['double_quant_saving_bytes'])} "
               f"({8 * rep['double_quant_saving_bytes'] / max(p['quantized_linears'], 1):.3f} bits/param)")
    po = rep["paged_optimizer"]
    click.echo(f"paged optimizer: {fmt_bytes(po['state_bytes'])} of AdamW state in pinned host memory; "
               f"on a GPU {fmt_bytes(po['resident_on_gpu_bytes'])} resident (3 pages of "
               f"{st['page_size']:,} elements)")
    if measured:
        click.echo(f"\nmeasured on {measured['model_dir']} ({measured['quantized_layers']} NF4 linears, "
                   f"{measured['adapted_layers']} adapted):")
        click.echo(f"{'':<24}{'formula':>14}{'measured':>14}")
        for k, f in (("nf4_linears", base["nf4_linears"]), ("adapter", 4 * p["adapter"]),
                     ("optimizer", po["state_bytes"])):
            click.echo(f"{k:<24}{f:>14,}{measured[k]:>14,}")


@click.command()
@click.option("--model", default="llama-2-7b", show_default=True,
              help="llama-2-7b, llama-2-13b, llama-2-70b, all-minilm-l6-v2 (bundled; also measured), "
                   "a config.json or a model directory.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seq", type=click.IntRange(1), default=512, show_default=True)
@click.option("--r", "rank", type=click.IntRange(1), default=16, show_default=True, help="LoRA rank.")
@click.option("--targets", default="all-linear", show_default=True,
              help="all-linear or a comma list such as q_proj,v_proj.")
@click.option("--optim-bits", type=click.Choice(["32", "8"]), default="32", show_default=True)
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Measure the real bytes when the model has local weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def memory(model, batch, seq, rank, targets, optim_bits, measure, as_json):
    """Memory of full fine-tuning vs LoRA vs QLoRA for a model, with the formulas."""
    arch, model_dir = resolve(model)
    st = Settings(batch=batch, seq=seq, r=rank, targets=parse_targets(targets, arch), optim_bits=int(optim_bits))
    rep = table(arch, st)
    measured = None
    if measure and model_dir:
        from .memory_measure import measure as run_measure
        measured = {**run_measure(model_dir, st), "model_dir": model_dir}
        rep["measured"] = measured
    if as_json:
        click.echo(json.dumps(finite(rep), indent=2, allow_nan=False))
    else:
        _print(rep, measured)
