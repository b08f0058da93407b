"""Shared benchmark helpers: timing (warm-up + median of repeats), machine ceilings, tables, plots.

Benchmarks are not tests: run them alone on an idle machine (other load on these 2 cores skews
every number). Ratios are measured side by side in one run.
"""
import os
import statistics
import time

import torch


def time_fn(fn, repeats=5, warmup=1, budget_s=None):
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs. With budget_s,
    stop repeating once that much time is spent (at least one timed run)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


class Rotating:
    """Cycle through copies of an input so repeated calls do not find it in cache."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def dram_read_gbps(nbytes=1 << 30, repeats=3):
    """Sustained read bandwidth of all threads (torch sum over a large fp32 tensor)."""
    x = torch.ones(nbytes // 4)
    t = time_fn(lambda: x.sum(), repeats=repeats)
    return nbytes / t / 1e9


def fma_peak_gflops():
    from nf4lora import _C
    return _C.fma_peak_gflops(100_000_000) if _C.has_avx2() else float("nan")


def print_table(headers, rows, title=None):
    cols = [[str(h)] + [_fmt(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    if title:
        print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)))


def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def save_plot(path, title, series, xlabel, ylabel, logx=True):
    """series: {label: (xs, ys)}. Silently skipped when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_line():
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"nf4lora threads {__import__('nf4lora')._C.num_threads()}")
