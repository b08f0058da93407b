"""`nf4lora serve`: an OpenAI-style HTTP server over an NF4 base and many adapters (nf4lora.serving:
the AdapterPool and the starlette + uvicorn server; DESIGN.md "Serving")."""
import os

import click
import torch

from .demo_model import _quiet_transformers, bundled_model_dir, is_causal_lm, read_config
from .errors import CLIError, require


def load_base(base):
    """(model, tokenizer, kind): a local HF model dir ('bundled': the packaged MiniLM) loaded
    offline in float32, every linear layer quantized to NF4; kind "encoder" or "causal-lm"."""
    import nf4lora as nl
    model_dir = bundled_model_dir() if base == "bundled" else base
    cfg = read_config(model_dir)
    tf = _quiet_transformers()
    kind = "causal-lm" if is_causal_lm(cfg) else "encoder"
    cls = tf.AutoModelForCausalLM if kind == "causal-lm" else tf.AutoModel
    try:
        tok = tf.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = cls.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return nl.quantize_model(model).eval(), tok, kind


def build_server(base, adapters, adapter_roots=(), max_adapter_bytes=None, window_ms=5.0, max_batch=32,
                 batching=True):
    """The Server for `nf4lora serve` (tests and the benchmark build it the same way)."""
    import nf4lora as nl
    from ..serving.server import Server
    model, tok, kind = load_base(base)
    pool = nl.AdapterPool(model, max_bytes=max_adapter_bytes)
    for name, path in adapters:
        try:
            pool.load(name, path)
        except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
            raise CLIError(f"--adapter {name}={path}: {e}")
    roots = list(adapter_roots) or sorted({os.path.dirname(os.path.realpath(p)) for _, p in adapters})
    return Server(model, tok, pool, kind, roots, window_ms=window_ms, max_batch=max_batch,
                  batching=batching)


def _adapter_pairs(values):
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--adapter must be NAME=DIR, got {v!r}")
        out.append((name, path))
    return out


@click.command()
@click.option("--base", required=True, help="A local Hugging Face model directory, or 'bundled' (MiniLM).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="A PEFT LoRA/DoRA adapter directory served as model NAME (repeatable).")
@click.option("--adapter-root", "roots", multiple=True, type=click.Path(file_okay=False),
              help="Directories POST /adapters may load from (default: the --adapter dirs' parents).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Rows in one batched forward.")
@click.option("--batch-window-ms", default=5.0, show_default=True, type=click.FloatRange(0, 1000),
              help="How long the worker waits for more requests after the first.")
@click.option("--no-batching", is_flag=True, help="Run every request alone (the benchmark's baseline).")
@click.option("--max-adapter-bytes", default=None, type=click.IntRange(1),
              help="Byte budget of the resident adapters (LRU eviction; evicted ones reload).")
def serve(base, adapters, roots, host, port, max_batch, batch_window_ms, no_batching, max_adapter_bytes):
    """OpenAI-style HTTP server: /v1/embeddings (encoders), /v1/completions (causal LMs),
    /v1/models, POST /adapters; concurrent requests for different adapters run as one batch."""
    require("starlette", "uvicorn", why="nf4lora serve")
    server = build_server(base, _adapter_pairs(adapters), roots, max_adapter_bytes, batch_window_ms,
                          max_batch, not no_batching)
    click.echo(f"nf4lora serve: {server.kind} with adapters {server.pool.names()} on http://{host}:{port}",
               err=True)
    server.run(host, port)
