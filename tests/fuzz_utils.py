"""Fuzzing support: run each case in a forked worker (a segfault, abort, sanitizer stop or hang
is caught there and reported, never taking pytest down), classify its outcome, count outcomes.

A case is a function run in the child. It returns normally when the result equals the reference
(the function asserts that itself), or raises. Outcomes:
  equal      returned: the result matched the reference
  raised     a Python exception of an accepted type whose message names the problem
  mismatch   an AssertionError: a silent wrong answer          -> test failure
  bad-error  an exception of another type (IndexError, AttributeError, ...) or a message that does
             not name what is wrong                              -> test failure
  crash      the worker died on a signal (segfault, abort, ASan) -> test failure
  hang       the worker did not finish within the timeout       -> test failure
"""
import collections
import os
import pickle
import select
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, settings

# outcome counts per fuzz target, printed at the end of the session (conftest.py)
STATS = collections.defaultdict(collections.Counter)

ACCEPTED = (ValueError, TypeError, KeyError, NotImplementedError, FileNotFoundError, RuntimeError)
TIMEOUT_S = 120


def fuzz_settings(request, examples):
    """hypothesis settings: `examples` cases per test by default (derandomized, so CI runs the same
    cases every time), ten times as many random ones with --fuzz-long."""
    long = request.config.getoption("--fuzz-long")
    return settings(max_examples=examples * 10 if long else examples, deadline=None,
                    derandomize=not long, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def _child(fn, w):
    try:
        torch.set_num_threads(1)  # torch's own OpenMP pool does not survive fork either
        fn()
        msg = ("equal", "", "")
    except AssertionError as e:
        msg = ("mismatch", "AssertionError", str(e)[:4000])
    except BaseException as e:  # noqa: BLE001 - every exception is classified by the parent
        msg = ("raised", type(e).__name__, str(e)[:4000], isinstance(e, ACCEPTED))
    data = pickle.dumps(msg)
    view = memoryview(data)
    while view:
        n = os.write(w, view)
        view = view[n:]


def run_isolated(fn, timeout=TIMEOUT_S):
    """Run fn() in a forked child; returns (outcome, exc_type, message[, accepted])."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(r)
        try:
            _child(fn, w)
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("hang", "", f"no result after {timeout} s")
            data = os.read(r, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("crash", "", f"worker killed by signal {os.WTERMSIG(status)}")
    if not chunks:
        return ("crash", "", f"worker exited with status {os.WEXITSTATUS(status)} and no result")
    return pickle.loads(b"".join(chunks))


def check_case(target, fn, names=(), describe=""):
    """Run a case isolated and fail the test unless it is `equal`, or `raised` an accepted
    exception whose message contains one of `names` (case-insensitive; any message when names is
    empty)."""
    res = run_isolated(fn)
    outcome = res[0]
    if outcome == "raised":
        accepted = res[3]
        msg = res[2].lower()
        if not accepted or (names and not any(n.lower() in msg for n in names)):
            outcome = "bad-error"
    STATS[target][outcome] += 1
    if outcome not in ("equal", "raised"):
        pytest.fail(f"{target}: {outcome}: {res[1]}: {res[2]}\n  case: {describe}\n"
                    f"  (expected the reference result or an exception naming one of {list(names)})")
    return res
