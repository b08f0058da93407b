"""`nf4lora serve` under load (issue 14): requests per second and p50 / p99 latency at 1, 8 and 32
concurrent clients over 8 adapters of the bundled MiniLM (random LoRA weights, r = 16 on query /
key / value / attention.output.dense / intermediate.dense), /v1/embeddings with one sentence per
request, the server batching (window, max batch) against the same server with batching off.

    python bench/bench_serve.py                  # 64 requests per client count and mode
    python bench/bench_serve.py --quick          # 16 requests: checks that it runs

The server runs in this process (its uvicorn loop and worker thread); the clients are httpx async
clients in another thread's event loop, so client and server share the CPU as they would on one
box. Latency is from send to full response.
"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402,F401  (the bench scripts' shared set-up)

import nf4lora as nl  # noqa: E402
from nf4lora.cli.serve import build_server, load_base  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
WORDS = "the a quantized model serves many adapters over one base with batched low rank terms".split()


def make_adapters(root, n, r):
    model, _, _ = load_base("bundled")
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        name = f"ad{i}"
        nl.apply_qlora(model, TARGETS, r=r, lora_alpha=2 * r, adapter_name=name)
        with torch.no_grad():
            for _, layer in nl.lora.model.qlora_layers(model):
                if name in layer.lora_config:
                    for p in layer.adapter_params(name):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        nl.save_adapter(model, os.path.join(root, name), adapter_name=name)
        dirs.append((name, os.path.join(root, name)))
    return dirs


async def load(url, clients, requests, names):
    import httpx
    lat = []
    sent = iter(range(requests))

    async def client(c):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for i in sent:
                text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 8))
                t0 = time.perf_counter()
                r = await http.post("/v1/embeddings", json={"model": names[i % len(names)], "input": text})
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return requests / (time.perf_counter() - t0), lat


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    requests = args.requests or (16 if args.quick else 64)
    with tempfile.TemporaryDirectory() as root:
        adapters = make_adapters(root, args.adapters, args.r)
        names = [n for n, _ in adapters]
        print(f"CPU: {nl.info()['cpu']['model']} | torch threads {torch.get_num_threads()} | {len(names)} adapters r={args.r} | "
              f"{requests} requests per row")
        print(f"{'batching':>9} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/fwd':>8}")
        for batching in (True, False):
            server = build_server("bundled", adapters, window_ms=args.window_ms, max_batch=args.max_batch,
                                  batching=batching)
            url = server.start_background()
            try:
                asyncio.run(load(url, 1, 4, names))  # warm-up
                for c in (int(v) for v in args.clients.split(",")):
                    server.worker.batches.clear()
                    rps, lat = asyncio.run(load(url, c, requests, names))
                    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
                    rows = statistics.mean(server.worker.batches)
                    print(f"{'on' if batching else 'off':>9} {c:>7} {rps:>8.1f} {1e3 * q[49]:>8.1f} "
                          f"{1e3 * q[98]:>8.1f} {rows:>8.1f}")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
