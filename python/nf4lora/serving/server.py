"""The HTTP server of `nf4lora serve`: OpenAI-style endpoints over one NF4 model and an AdapterPool,
on starlette + uvicorn.

  POST /v1/embeddings   {"model": adapter|"base", "input": str | [str]}   (encoders: mean-pooled,
                        L2-normalized last hidden states, as sentence-transformers)
  POST /v1/completions  {"model", "prompt": str | [str], "max_tokens": int}   (causal LMs: greedy)
  GET  /v1/models       the adapters ("base" first)
  POST /adapters        {"name", "path"}: load a PEFT adapter directory that lies under one of the
                        adapter roots given at start (resolved; no "..", no symlink out)

Batching: the handlers put requests on a queue; one worker thread takes every request that
arrives within `window_ms` of the first (up to `max_batch` rows, requests of one kind), runs them
as one forward with one adapter per row (pool.batch: one multi_lora_linear per layer), and hands
each request its rows through its asyncio future. batching=False runs each request alone.
Bad requests get a 4xx JSON error {"error": {"message", "type", "code"}}; the server keeps serving.
"""
import asyncio
import collections
import contextlib
import json
import os
import queue
import socket
import threading
import time

import torch

from .pool import BASE

MAX_BODY = 1 << 20      # bytes of one request body
MAX_INPUTS = 64         # strings in one request
MAX_CHARS = 8192        # characters of one string
MAX_NEW_TOKENS = 256


class RequestError(Exception):
    def __init__(self, status, message, code="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _err(status, message, code="invalid_request_error"):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status)


class Engine:
    """The model side: tokenizes, runs a batch of rows with one adapter each, pools or decodes.
    kind "encoder" (embeddings) or "causal-lm" (completions)."""

    def __init__(self, model, tokenizer, pool, kind, max_length=512):
        self.model, self.tok, self.pool, self.kind = model, tokenizer, pool, kind
        self.max_length = max_length
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _ids(self, text, special=True):
        return self.tok.encode(text, add_special_tokens=special, truncation=True,
                               max_length=self.max_length)

    def _padded(self, seqs, left):
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
        return ids, mask

    @torch.inference_mode()
    def embed(self, texts, adapters):
        """[len(texts), hidden] float32 unit vectors; row i through adapters[i]."""
        ids, mask = self._padded([self._ids(t) for t in texts], left=False)
        with self.pool.batch(adapters):
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(e.float(), dim=-1)

    @torch.inference_mode()
    def complete(self, prompts, adapters, max_tokens):
        """Greedy continuations (token id lists, finish reasons); row i through adapters[i]. The
        left-padded prompts run once, then each step feeds one token per row against the model's
        KV cache (rows that finished keep stepping until all have; their tokens are dropped)."""
        seqs = [self._ids(p) or [self.pad] for p in prompts]
        eos = self.tok.eos_token_id
        out, done = [[] for _ in seqs], [m == 0 for m in max_tokens]
        ids, mask = self._padded(seqs, left=True)
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # left padding: each row's positions start at 0
        past = None
        for _ in range(max(max_tokens)):
            if all(done):
                break
            with self.pool.batch(adapters):
                res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(t)
                done[i] = len(out[i]) >= max_tokens[i] or (eos is not None and t == eos)
            if past is None:  # a model without a cache: run the whole sequence again
                ids, pos = torch.cat([ids, nxt[:, None]], 1), torch.cat([pos, pos[:, -1:] + 1], 1)
            else:
                ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], 1)
        reasons = ["stop" if eos is not None and o and o[-1] == eos else "length" for o in out]
        return [self.tok.decode(o, skip_special_tokens=True) for o in out], reasons


class Worker:
    """One thread runs the model; requests of one kind arriving within window_ms of the first are
    run together (up to max_batch rows)."""

    def __init__(self, engine, window_ms=5.0, max_batch=32, batching=True):
        self.engine, self.window, self.max_batch = engine, window_ms / 1000.0, max_batch
        self.batching = batching
        self.q, self._held = queue.Queue(), collections.deque()
        self.thread = threading.Thread(target=self._run, name="nf4lora-serve-worker", daemon=True)
        self.batches = []  # rows per forward (tests, benchmark)

    def start(self):
        self.thread.start()

    def stop(self):
        self.q.put(None)
        self.thread.join()

    async def submit(self, kind, rows, adapters, extra=None):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.q.put((kind, rows, adapters, extra, loop, fut))
        return await fut

    def _next(self, timeout=None):
        if self._held:
            return self._held.popleft()
        return self.q.get(timeout=timeout) if timeout is not None else self.q.get()

    def _run(self):
        while True:
            job = self._next()
            if job is None:
                return
            jobs, n = [job], len(job[1])
            deadline = time.monotonic() + self.window
            while self.batching and job[0] != "admin" and n < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    more = self._next(timeout=max(left, 0.0)) if left > 0 else self._next(timeout=0.0)
                except queue.Empty:
                    break
                if more is None or more[0] != job[0] or n + len(more[1]) > self.max_batch:
                    self._held.appendleft(more)  # next round (a stop waits for this batch)
                    break
                jobs.append(more)
                n += len(more[1])
            self._serve(jobs)

    def _serve(self, jobs):
        kind = jobs[0][0]
        try:
            if kind == "admin":
                results = [jobs[0][2]()]  # a callable (adapter load) run on this thread
            else:
                rows = [r for j in jobs for r in j[1]]
                adapters = [a for j in jobs for a in j[2]]
                self.batches.append(len(rows))
                if kind == "embed":
                    res = self.engine.embed(rows, adapters).tolist()
                else:
                    texts, reasons = self.engine.complete(rows, adapters,
                                                          [m for j in jobs for m in j[3]])
                    res = list(zip(texts, reasons))
                results, at = [], 0
                for j in jobs:
                    results.append(res[at:at + len(j[1])])
                    at += len(j[1])
            for j, r in zip(jobs, results):
                j[4].call_soon_threadsafe(_resolve, j[5], r, None)
        except Exception as e:  # noqa: BLE001  (a failed batch fails its requests, not the server)
            for j in jobs:
                j[4].call_soon_threadsafe(_resolve, j[5], None, e)


def _resolve(fut, result, exc):
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def resolve_under(roots, path):
    """The real path of `path` (relative to a root, or absolute) if it lies inside one of the
    `roots` after resolving symlinks; RequestError otherwise. '..' components are refused."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise RequestError(400, "'path' must be a non-empty string")
    if ".." in path.replace("\\", "/").split("/"):
        raise RequestError(403, "'path' must not contain '..'")
    for root in roots:
        real_root = os.path.realpath(root)
        cand = os.path.realpath(os.path.join(real_root, path))
        if os.path.commonpath([cand, real_root]) == real_root and os.path.isdir(cand):
            return cand
    raise RequestError(403 if os.path.isabs(path) else 404,
                       f"'path' {path!r} is not an adapter directory under the server's adapter roots")


class Server:
    """The ASGI app and its worker over (model, tokenizer, pool).

    kind "encoder" serves /v1/embeddings, "causal-lm" /v1/completions; adapter_roots bound what
    POST /adapters may read."""

    def __init__(self, model, tokenizer, pool, kind, adapter_roots=(), window_ms=5.0, max_batch=32,
                 batching=True, max_length=512):
        self.engine = Engine(model, tokenizer, pool, kind, max_length)
        self.worker = Worker(self.engine, window_ms, max_batch, batching)
        self.pool, self.kind, self.roots = pool, kind, [os.path.realpath(r) for r in adapter_roots]
        self.app = self._app()
        self._uv = None

    # -------------------------------------------------------------- requests
    async def _json(self, request):
        body = await request.body()
        if len(body) > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise RequestError(400, "request body must be a JSON object")
        return data

    def _adapter(self, data):
        name = data.get("model", "base")
        if not isinstance(name, str):
            raise RequestError(400, "'model' must be a string (an adapter name, or 'base')")
        if name == "base":
            return BASE
        if name == BASE or name not in self.pool:
            raise RequestError(404, f"unknown model {name!r}: GET /v1/models lists the adapters",
                               "model_not_found")
        return name

    @staticmethod
    def _texts(data, field):
        v = data.get(field)
        texts = [v] if isinstance(v, str) else v
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError(400, f"'{field}' must be a non-empty string or a non-empty list of strings")
        if len(texts) > MAX_INPUTS:
            raise RequestError(413, f"'{field}' has {len(texts)} strings; at most {MAX_INPUTS}")
        for t in texts:
            if not t:
                raise RequestError(400, f"'{field}' has an empty string")
            if len(t) > MAX_CHARS:
                raise RequestError(413, f"a string in '{field}' has {len(t)} characters; at most {MAX_CHARS}")
        return texts

    def _wants(self, kind):
        if self.kind != kind:
            what = "embeddings" if kind == "encoder" else "completions"
            raise RequestError(400, f"this server's model is a {self.kind}; it does not serve {what}")

    async def embeddings(self, request):
        data = await self._json(request)
        self._wants("encoder")
        adapter, texts = self._adapter(data), self._texts(data, "input")
        vecs = await self.worker.submit("embed", texts, [adapter] * len(texts))
        return {"object": "list", "model": data.get("model", "base"),
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]}

    async def completions(self, request):
        data = await self._json(request)
        self._wants("causal-lm")
        adapter, prompts = self._adapter(data), self._texts(data, "prompt")
        mt = data.get("max_tokens", 16)
        if isinstance(mt, bool) or not isinstance(mt, int) or not 0 <= mt <= MAX_NEW_TOKENS:
            raise RequestError(400, f"'max_tokens' must be an int in [0, {MAX_NEW_TOKENS}]")
        res = await self.worker.submit("complete", prompts, [adapter] * len(prompts), [mt] * len(prompts))
        return {"object": "text_completion", "model": data.get("model", "base"),
                "choices": [{"index": i, "text": t, "finish_reason": r} for i, (t, r) in enumerate(res)]}

    async def models(self, request):
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "nf4lora"}
                                           for n in ["base"] + self.pool.names()]}

    async def load_adapter(self, request):
        data = await self._json(request)
        name, path = data.get("name"), data.get("path")
        if not isinstance(name, str) or not name or name in ("base", BASE) or "." in name:
            raise RequestError(400, "'name' must be a non-empty string without '.', not 'base'")
        if name in self.pool:
            raise RequestError(409, f"adapter {name!r} is already loaded")
        real = resolve_under(self.roots, path)
        try:
            await self.worker.submit("admin", [None], lambda: self.pool.load(name, real))
        except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
            raise RequestError(422, f"cannot load adapter {name!r}: {e}") from None
        return {"object": "model", "id": name}

    # -------------------------------------------------------------- app
    def _app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        def route(path, fn, methods):
            async def endpoint(request):
                try:
                    return JSONResponse(await fn(request))
                except RequestError as e:
                    return _err(e.status, e.message, e.code)
                except Exception as e:  # noqa: BLE001  (one request's failure, reported to it)
                    return _err(500, f"{type(e).__name__}: {e}", "server_error")
            return Route(path, endpoint, methods=methods)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.worker.start()
            try:
                yield
            finally:
                self.worker.stop()

        return Starlette(routes=[route("/v1/embeddings", self.embeddings, ["POST"]),
                                 route("/v1/completions", self.completions, ["POST"]),
                                 route("/v1/models", self.models, ["GET"]),
                                 route("/adapters", self.load_adapter, ["POST"])],
                         lifespan=lifespan)

    def run(self, host="127.0.0.1", port=8000, sock=None):
        """Serve until stopped (Ctrl-C, or stop() from another thread)."""
        import uvicorn
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="on")
        self._uv = uvicorn.Server(config)
        self._uv.run(sockets=[sock] if sock is not None else None)

    def start_background(self, host="127.0.0.1"):
        """Serve on a free loopback port from a background thread; returns the base URL."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self.run, kwargs={"sock": sock}, daemon=True)
        self._thread.start()
        while self._uv is None or not self._uv.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped while starting")
            time.sleep(0.01)
        return f"http://{host}:{port}"

    def stop(self, timeout=30):
        if self._uv is not None:
            self._uv.should_exit = True
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("the server did not stop in time")
