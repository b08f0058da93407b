"""Timing and reporting helpers shared by the benchmarks (bench/*.py and `nf4lora bench`; not tests).

    t = time_fn(fn, repeats=10, warmup=2)        # median seconds of fn() (CUDA-synchronized)
    print_table(rows, headers)                    # aligned text table (also valid Markdown)
    save_plot(path, labels, series, ...)          # optional PNG bar chart (needs matplotlib)
    save_line_plot(path, {name: (xs, ys)}, ...)   # optional PNG line plot
    dram_read_gbps(), fma_peak_gflops()           # this machine's ceilings, measured now
    ceilings(device)                              # both, for a CPU or a CUDA device
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


def time_fn(fn, repeats=10, warmup=2, setup=None, budget_s=None):
    """Median wall time of fn() in seconds, after `warmup` untimed calls. `setup()` (untimed) runs
    before every call, e.g. to rotate inputs so caches do not flatter. CUDA work is synchronized.
    With budget_s, repeating stops once that much time is spent (at least one timed call)."""
    samples = time_samples(fn, repeats, warmup, setup, budget_s)
    return statistics.median(samples)


def time_samples(fn, repeats=10, warmup=2, setup=None, budget_s=None):
    """Every timed sample (seconds), for callers that want min/median/spread."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync()
    out = []
    start = time.perf_counter()
    for _ in range(repeats):
        if setup:
            setup()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return out


class Rotating:
    """Cycle through copies of an input so consecutive calls do not find it in cache."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def dram_read_gbps(nbytes=1 << 30, repeats=3):
    """Sustained read bandwidth of all threads: torch's sum over a large fp32 tensor."""
    x = torch.ones(nbytes // 4)
    return nbytes / time_fn(lambda: x.sum(), repeats=repeats, warmup=1) / 1e9


def fma_peak_gflops():
    """Sustained fp32 FMA GFLOP/s of all threads (nf4lora._C's register-FMA probe; AVX2 only)."""
    from nf4lora import _C
    # best of three: the first run also pays for clocks ramping up and thread start
    return max(_C.fma_peak_gflops(50_000_000) for _ in range(3)) if _C.has_avx2() else float("nan")


def cuda_ceilings(repeats=5):
    """(memory read GB/s, dense bf16 matmul GFLOP/s) of the current CUDA device, measured now."""
    x = torch.ones(1 << 28, device="cuda")  # 1 GiB
    bw = x.numel() * 4 / time_fn(lambda: x.sum(), repeats=repeats, warmup=2) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / time_fn(lambda: a @ a, repeats=repeats, warmup=2) / 1e9
    del x, a
    return bw, peak


def ceilings(device="cpu"):
    """The machine limits a '% of limit' column is taken against: {"mem_gbps", "flops_gflops",
    "flops_what", "bf16_gflops"}. CPU: all-thread DRAM read, fp32 FMA peak and torch's dense bf16
    matmul; CUDA: device memory read and dense bf16 matmul."""
    if torch.device(device).type == "cuda":
        bw, peak = cuda_ceilings()
        return {"mem_gbps": bw, "flops_gflops": peak, "flops_what": "bf16 matmul", "bf16_gflops": peak}
    return {"mem_gbps": dram_read_gbps(), "flops_gflops": fma_peak_gflops(), "flops_what": "fp32 FMA",
            "bf16_gflops": bf16_matmul_gflops()}


def bf16_matmul_gflops(n=2048, repeats=5):
    """Dense bf16 matmul GFLOP/s of torch's BLAS on this CPU (oneDNN: AMX or AVX512-BF16 where
    present): the ceiling bf16 rows are measured against, as fp32 FMA peak is for fp32 rows."""
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    return 2 * n ** 3 / time_fn(lambda: a @ b, repeats=repeats, warmup=2) / 1e9


def fmt(v):
    """Numbers for tables: 3 significant digits, '-' for NaN (not measured)."""
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


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


def save_line_plot(path, series, xlabel, ylabel, title="", logx=True):
    """Line plot, series = {name: (xs, ys)}. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
