"""Mutation check of the test suite's core oracles: plant each deliberate bug of tools/mutants.py
and run the tests that must catch it; a mutant that survives (its tests pass) is a test-suite bug.

    PYTHONPATH=<site> python tools/mutation_check.py            every mutant
    PYTHONPATH=<site> python tools/mutation_check.py dropout-seed non-atomic-save

Prints one line per mutant (killed or SURVIVED, by which test, seconds) and exits 1 if any survived.
Each run stops at the first failure (-x), so a killed mutant costs seconds."""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# mutant -> the core tests that must catch it
TARGETS = {
    "quantize-code": ["tests/test_quantize.py"],
    "double-quant-code": ["tests/test_quantize.py"],
    "dequantize-tail": ["tests/test_quantize.py"],
    "linear-last-column": ["tests/test_linear.py"],
    "linear-dx": ["tests/test_linear.py"],
    "lora-grad-a": ["tests/test_linear.py"],
    "dropout-seed": ["tests/test_linear.py", "-k", "dropout"],
    "adamw-no-decay": ["tests/test_optim.py"],
    "adamw8-state": ["tests/test_optim.py"],
    "blocksize-check": ["tests/test_bad_input.py"],
    "adapter-config-checks": ["tests/test_fuzz_loaders.py", "-k", "adapter"],
    "non-atomic-save": ["tests/test_crash_safe.py", "-k", "kills"],
    "no-thread-handoff": ["tests/test_threads.py"],
    "merge-wrong": ["tests/test_dora.py", "tests/test_vera.py", "tests/test_model.py", "-k", "merge"],
}


def run(name):
    env = dict(os.environ, NF4LORA_MUTANT=name,
               PYTHONPATH=os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "mutants", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                          "--no-header", *TARGETS[name]], cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    failed = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")]
    killed = res.returncode == 1 and bool(failed)
    what = failed[0][len("FAILED "):].split(" - ")[0] if failed else res.stdout.strip().splitlines()[-1:]
    print(f"{'killed  ' if killed else 'SURVIVED'} {name:24s} {dt:6.1f} s  {what}", flush=True)
    return killed


def main(argv):
    names = argv or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        sys.exit(f"unknown mutants {unknown}; known: {sorted(TARGETS)}")
    survived = [n for n in names if not run(n)]
    print(f"mutation check: {len(names) - len(survived)}/{len(names)} mutants killed"
          + (f"; SURVIVED: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
