#!/usr/bin/env bash
# Build nf4lora._C with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# NF4LORA_SANITIZE=address,undefined; CPU module only) into a private folder and run the kernel
# tests under it. Passes only with zero sanitizer reports.
#   tools/sanitize.sh            the kernel tests (csrc/ref vs fast paths, quantize, linear, multi-LoRA,
#                                optimizer, bad input, fuzzing, threads) except those marked slow
#   tools/sanitize.sh -k gemv    extra arguments go to pytest
# Python itself is not instrumented, so libasan is preloaded (it must come first in the library
# list, with libstdc++ right after it) and leak detection is off (CPython and torch keep allocations to exit on purpose). Reports
# go to one file per process under $logs (forked fuzz workers and subprocesses included), and the
# script fails if any file appears. UBSan reports are recoverable so a run lists every one; an ASan
# report stops its process.
set -euo pipefail
cd "$(dirname "$0")/.."
site="${NF4LORA_SAN_SITE:-build/sanitize-site}"
logs="${NF4LORA_SAN_LOGS:-build/sanitize-logs}"
sanitizers="${NF4LORA_SANITIZE:-address,undefined}"
mkdir -p "$site" "$logs"
site="$(cd "$site" && pwd)" logs="$(cd "$logs" && pwd)"
default_tests="tests/test_quantize.py tests/test_linear*.py tests/test_optim.py tests/test_bad_input.py
  tests/test_fuzz.py tests/test_fuzz_loaders.py tests/test_threads.py tests/test_multi_lora.py"
# shellcheck disable=SC2206  (word splitting wanted: a list of test files)
tests=(${NF4LORA_SAN_TESTS:-$default_tests})

start=$(date +%s)
isolation=--no-build-isolation
python -c "import scikit_build_core, pybind11" 2>/dev/null || isolation=""
NF4LORA_CUDA=OFF python -m pip install $isolation --no-deps --upgrade -q --target "$site" \
  -Cbuild-dir=build/sanitize -Ccmake.define.NF4LORA_SANITIZE="$sanitizers" .
built=$(date +%s)

# libstdc++ is preloaded with libasan: ASan resolves the real __cxa_throw when it starts, and
# python does not link libstdc++ (without it the first C++ exception aborts in ASan's interceptor).
libasan="$(${CXX:-g++} -print-file-name=libasan.so):$(${CXX:-g++} -print-file-name=libstdc++.so)"
rm -rf "$logs" && mkdir -p "$logs"
export LD_PRELOAD="$libasan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:log_path=$logs/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$logs/ubsan:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# The instrumented module is the one imported, and it is instrumented.
python - <<'PY'
import os, nf4lora._C as C
site = os.environ["PYTHONPATH"].split(":")[0]
assert C.__file__.startswith(site), f"imported {C.__file__}, not the sanitizer build in {site}"
syms = open(C.__file__, "rb").read()
assert b"__asan_report" in syms and b"__ubsan_handle" in syms, "module is not instrumented"
print("sanitizer build:", C.__file__)
PY
status=0
# -m "not slow": the exhaustive 2^28-float encoder sweeps take hours at ASan speed (they run
# uninstrumented in the normal suite).
python -m pytest "${tests[@]}" -q -p no:cacheprovider -m "not slow" "$@" || status=$?
end=$(date +%s)
reports=$(find "$logs" -type f | wc -l)
echo "sanitize: build $((built - start)) s, tests $((end - built)) s, pytest status $status, $reports sanitizer report file(s) in $logs"
if [ "$reports" -ne 0 ]; then
  head -n 60 "$logs"/* >&2
  exit 1
fi
exit $status
