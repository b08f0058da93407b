"""Timing and reporting helpers shared by the benchmarks in bench/ (not tests).

    t = time_fn(fn, repeats=10, warmup=2)        # median seconds of fn() (CUDA-synchronized)
    print_table(rows, headers)                    # aligned text table
    save_plot(path, labels, series, ...)          # optional PNG (skipped without matplotlib)
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn, repeats=10, warmup=2, setup=None):
    """Median wall time of fn() in seconds, after `warmup` untimed calls. `setup()` (untimed) runs
    before every call, e.g. to rotate inputs so caches do not flatter. CUDA work is synchronized."""
    samples = time_samples(fn, repeats, warmup, setup)
    return statistics.median(samples)


def time_samples(fn, repeats=10, warmup=2, setup=None):
    """Every timed sample (seconds), for callers that want min/median/spread."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync()
    out = []
    for _ in range(repeats):
        if setup:
            setup()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def fmt_time(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def print_table(rows, headers, title=None, file=None):
    """Print rows (sequences of values; str() each) under headers, columns aligned. Returns the
    table as a string (also usable as a Markdown table: columns are '|'-separated)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    text = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    text += [line(r) for r in cells[1:]]
    out = ("\n".join([title, ""] if title else []) + "\n".join(text))
    print(out, file=file, flush=True)
    return out


def machine_info():
    """One line describing where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load avg %.1f/%.1f/%.1f" % os.getloadavg()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu};{load}")


def save_plot(path, labels, series, ylabel="", title="", logy=False):
    """Grouped bar chart: labels on x, one bar per series ({name: [value per label]}). Returns the
    path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(series)), 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
