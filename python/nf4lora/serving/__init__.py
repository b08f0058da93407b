"""Serving many adapters over one NF4 base: AdapterPool (pool.py); the HTTP server (server.py,
needs starlette + uvicorn: the `serve` extra) is imported only by `nf4lora serve`."""
from .pool import AdapterPool

__all__ = ["AdapterPool"]
