"""`nf4lora bench`: the microbenchmarks on the present device, each against its baseline measured
in the same run (suites in bench_suites.py over nf4lora.benchmarks, the code bench/*.py runs too).
Prints one table at the end; --json FILE writes one record per measurement, --plot FILE.png a
chart of the ratios."""
import math
import time

import click
import torch
from tqdm import tqdm

from ..benchmarks.common import ceilings, machine_info
from .bench_suites import BUILDERS, SUITES
from .errors import CLIError, require
from .outputs import ensure_writable_file, save_figure, write_json

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _ops(text):
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in SUITES]
    if bad or not ops:
        raise CLIError(f"unknown --ops {','.join(bad) or repr(text)}; choose from {','.join(SUITES)}")
    return ops


def _device(name):
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown --device {name!r}; use cpu or cuda")
    if dev.type == "cuda":
        from .info import report
        if not (torch.cuda.is_available() and report().get("cuda", {}).get("module_built")):
            raise CLIError("--device cuda: no GPU visible or nf4lora built without its CUDA module")
        return "cuda"
    if dev.type != "cpu":
        raise CLIError(f"--device {name}: nf4lora has kernels for cpu and cuda only")
    return "cpu"


def _f(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def print_table(records):
    head = ["op", "shape", "dtype", "path", "ours ms", "baseline", "baseline ms", "ratio", "rate", "% limit"]
    rows = [[r["op"], r["shape"], r["dtype"], r.get("path", ""), _f(r["ours_ms"]), r["baseline"], _f(r["baseline_ms"]),
             _f(r["ratio"]) + ("x" if r["ratio"] else ""), f"{_f(r['rate'])} {r['unit']}",
             _f(r["pct_of_limit"], 2)] for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    click.echo(line(head))
    click.echo("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        click.echo(line(r))


def plot(path, records, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["ratio"]]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(recs) + 1.5))
    labels = [f"{r['op']} {r['shape']} {r['dtype']}\nvs {r['baseline']}" for r in recs]
    colors = ["tab:green" if r["ratio"] >= 1 else "tab:red" for r in recs]
    ax.barh(range(len(recs)), [r["ratio"] for r in recs], color=colors)
    ax.set_yticks(range(len(recs)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up = baseline time / nf4lora time (log; > 1: nf4lora faster)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@click.command()
@click.option("--quick", is_flag=True, help="One shape per suite, few repeats (< 2 min on 2 cores).")
@click.option("--large", is_flag=True, help="Add the LLaMA-70B MLP shape 8192x28672.")
@click.option("--device", "device_name", default="cuda" if torch.cuda.is_available() else "cpu",
              show_default="cuda if present, else cpu")
@click.option("--ops", default=",".join(SUITES), show_default=True, help="Comma list of suites.")
@click.option("--dtype", "dtypes", type=click.Choice(list(DTYPES)), multiple=True,
              help="Activation dtype(s) of the linear and layer suites [default: bfloat16].")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the records as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="Write a PNG chart of the ratios.")
def bench(quick, large, device_name, ops, dtypes, json_path, plot_path):
    """Microbenchmarks vs their baselines (bitsandbytes, torch dense, torch int4, torch AdamW)."""
    ops = _ops(ops)
    device = _device(device_name)
    if plot_path:
        require("matplotlib", why="nf4lora bench --plot")
    for path, opt in ((json_path, "--json"), (plot_path, "--plot")):
        if path:
            ensure_writable_file(path, opt)
    t0 = time.perf_counter()
    where = machine_info()
    click.echo(where)
    limits = ceilings(device)
    click.echo(f"machine limits measured now: memory read {limits['mem_gbps']:.1f} GB/s, "
               f"{limits['flops_what']} {limits['flops_gflops']:.0f} GFLOP/s, dense bf16 matmul "
               f"{limits['bf16_gflops']:.0f} GFLOP/s (the limit of bf16 rows)")
    cfg = {"quick": quick, "large": large, "device": device, "limits": limits,
           "dtypes": [DTYPES[d] for d in (dtypes or ("bfloat16",))]}
    cases = [c for op in ops for c in BUILDERS[op](cfg)]
    records = []
    with tqdm(cases, unit="case", leave=False, disable=None) as bar:
        for name, run in bar:
            bar.set_description(name)
            records.extend(run())
    click.echo("")
    print_table(records)
    wall = time.perf_counter() - t0
    click.echo(f"\nratio = baseline ms / ours ms (> 1: nf4lora faster); % limit = rate / the limit above; "
               f"{wall:.0f} s")
    if json_path:
        write_json(json_path, {"machine": where, "limits": limits, "quick": quick, "device": device,
                               "wall_seconds": wall, "records": records})
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot(plot_path, records, f"nf4lora bench{' --quick' if quick else ''} on {device}: {where}")
        click.echo(f"wrote {plot_path}")
    return records
