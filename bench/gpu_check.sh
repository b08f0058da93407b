#!/usr/bin/env bash
# One-shot GPU check for a lent machine (H200 image: python3 + torch 2.11+cu130, nvcc 13, CMake,
# ninja, pybind11, scikit-build-core, no internet). Builds nf4lora for this GPU, runs tests/gpu (and
# the host tests), runs compute-sanitizer on small cases, benchmarks, and prints a short table last.
# Full logs and bench_gpu.json go to $OUT when set (else /tmp/nf4lora_gpu_check). Total < 8 min:
# build <= 240 s; the tests, sanitizer and bench get time limits from what is left of 460 s (the
# bench stops its own suites at its budget). Assumes the image's pip has scikit-build-core and
# pybind11 (KINDS.md lists both); otherwise it configures with CMake directly and copies the .so
# files next to a copy of python/nf4lora.
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp/nf4lora_gpu_check}"
mkdir -p "$LOG"
SITE="$PWD/build/gpu-site"
PY=python3
T0=$(date +%s)
declare -A STATUS
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
TOTAL=460  # seconds for everything (the lent machine's call allows 8 minutes)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
clamp() { local v=$1; (( v > $2 )) && v=$2; (( v < $3 )) && v=$3; echo $v; }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/nvidia-smi.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG/nvidia-smi.txt"

# ------------------------------------------------------------------ build (sm_90 only: faster)
ARCH="$($PY -c 'import torch; m,n=torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)"
export CMAKE_BUILD_PARALLEL_LEVEL=16 NF4LORA_CUDA=ON
stamp "build for sm_${ARCH} (pip + scikit-build-core, falling back to plain CMake)"
rm -rf "$SITE"
if timeout 240 $PY -m pip install --no-build-isolation --no-deps -v --target "$SITE" \
     -Cbuild-dir=build/gpu -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${ARCH}-real" \
     -Ccmake.define.NF4LORA_PTXAS_VERBOSE=ON -Cbuild.verbose=true . > "$LOG/build.log" 2>&1; then
  STATUS[build]="ok (pip)"
else
  stamp "pip build failed (see build.log); trying CMake directly"
  PB="$($PY -m pybind11 --cmakedir 2>/dev/null)"
  if timeout 240 cmake -S . -B build/gpu-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DNF4LORA_CUDA=ON \
       -DCMAKE_CUDA_ARCHITECTURES="${ARCH}-real" -DNF4LORA_PTXAS_VERBOSE=ON -Dpybind11_DIR="$PB" \
       -DPython_EXECUTABLE="$(command -v $PY)" >> "$LOG/build.log" 2>&1 &&
     timeout 240 cmake --build build/gpu-cmake >> "$LOG/build.log" 2>&1; then
    mkdir -p "$SITE" && cp -r python/nf4lora "$SITE/" && cp build/gpu-cmake/_C*.so "$SITE/nf4lora/"
    STATUS[build]="ok (cmake)"
  else
    STATUS[build]="FAILED"
  fi
fi
grep -E "registers|spill" "$LOG/build.log" > "$LOG/ptxas.txt" 2>/dev/null
stamp "build: ${STATUS[build]}"
export PYTHONPATH="$SITE"

# ------------------------------------------------------------------ tests
if [[ "${STATUS[build]}" != FAILED ]]; then
  stamp "tests: tests/test_cuda_host.py + tests/gpu"
  timeout "$(clamp $(( $(left) - 150 )) 200 60)" \
      $PY -m pytest -q -p no:cacheprovider -rfE tests/test_cuda_host.py tests/gpu \
      > "$LOG/pytest.log" 2>&1
  rc=$?
  STATUS[tests]="$( (grep -E "passed|failed|error" "$LOG/pytest.log" | tail -1) || echo "rc=$rc")"
  [[ $rc -eq 124 ]] && STATUS[tests]="TIMEOUT: ${STATUS[tests]}"
  tail -25 "$LOG/pytest.log"

  # -------------------------------------------------------------- compute-sanitizer
  if command -v compute-sanitizer > /dev/null; then
    stamp "compute-sanitizer memcheck + racecheck on small cases"
    timeout "$(clamp $(( $(left) - 140 )) 60 20)" compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_case.py \
        > "$LOG/memcheck.log" 2>&1
    m=$?
    timeout "$(clamp $(( $(left) - 120 )) 40 10)" compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize_case.py \
        > "$LOG/racecheck.log" 2>&1
    rr=$?
    STATUS[sanitizer]="memcheck rc=$m racecheck rc=$rr (0 clean, 9 errors, 124 timeout)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/memcheck.log" "$LOG/racecheck.log" | head -4
  else
    STATUS[sanitizer]="not available"
  fi

  # -------------------------------------------------------------- benchmark
  stamp "bench/bench_gpu.py"
  B=$(clamp $(( $(left) - 40 )) 120 30)
  timeout $(( B + 60 )) $PY bench/bench_gpu.py --budget "$B" --out "$LOG" > "$LOG/bench.log" 2>&1
  STATUS[bench]="rc=$?"
fi

# ------------------------------------------------------------------ summary (last)
echo
sed -n '/^bf16 GEMM rate/,$p' "$LOG/bench.log" 2>/dev/null
echo
echo "================ nf4lora GPU check ($(( $(date +%s) - T0 )) s) ================"
for k in build tests sanitizer bench; do printf "%-10s %s\n" "$k" "${STATUS[$k]:-skipped}"; done
echo "logs: $LOG"
