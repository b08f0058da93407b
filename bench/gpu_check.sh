#!/usr/bin/env bash
# One-shot GPU check for a lent machine (H200 image: python3 + torch 2.11+cu130, nvcc 13, CMake,
# ninja, pybind11, scikit-build-core, no internet). Builds nf4lora for this GPU, runs tests/gpu (and
# the host tests), runs compute-sanitizer on small cases, benchmarks, and prints a short table last.
# Full logs and bench_gpu.json go to $OUT when set (else /tmp/nf4lora_gpu_check). Total < 8 min:
# build <= 240 s, tests <= 150 s, sanitizer <= 60 s, bench <= 130 s (it stops its suites itself).
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

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/nvidia-smi.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG/nvidia-smi.txt"

# ------------------------------------------------------------------ build (sm_90 only: faster)
ARCH="$($PY -c 'import torch; m,n=torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)"
export CMAKE_BUILD_PARALLEL_LEVEL=16 NF4LORA_CUDA=ON
stamp "build for sm_${ARCH} (pip + scikit-build-core, falling back to plain CMake)"
rm -rf "$SITE"
if timeout 240 $PY -m pip install --no-build-isolation --no-deps -q --target "$SITE" \
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
  timeout 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/test_cuda_host.py tests/gpu \
      > "$LOG/pytest.log" 2>&1
  rc=$?
  STATUS[tests]="$( (grep -E "passed|failed|error" "$LOG/pytest.log" | tail -1) || echo "rc=$rc")"
  [[ $rc -eq 124 ]] && STATUS[tests]="TIMEOUT: ${STATUS[tests]}"
  tail -25 "$LOG/pytest.log"

  # -------------------------------------------------------------- compute-sanitizer
  if command -v compute-sanitizer > /dev/null; then
    stamp "compute-sanitizer memcheck + racecheck on small cases"
    timeout 35 compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_case.py \
        > "$LOG/memcheck.log" 2>&1
    m=$?
    timeout 25 compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize_case.py \
        > "$LOG/racecheck.log" 2>&1
    rr=$?
    STATUS[sanitizer]="memcheck rc=$m racecheck rc=$rr (0 clean, 9 errors, 124 timeout)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/memcheck.log" "$LOG/racecheck.log" | head -4
  else
    STATUS[sanitizer]="not available"
  fi

  # -------------------------------------------------------------- benchmark
  stamp "bench/bench_gpu.py"
  timeout 170 $PY bench/bench_gpu.py --budget 120 --out "$LOG" > "$LOG/bench.log" 2>&1
  STATUS[bench]="rc=$?"
fi

# ------------------------------------------------------------------ summary (last)
echo
sed -n '/^bf16 GEMM rate/,$p' "$LOG/bench.log" 2>/dev/null
echo
echo "================ nf4lora GPU check ($(( $(date +%s) - T0 )) s) ================"
for k in build tests sanitizer bench; do printf "%-10s %s\n" "$k" "${STATUS[$k]:-skipped}"; done
echo "logs: $LOG"
