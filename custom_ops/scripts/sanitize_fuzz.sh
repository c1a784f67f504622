#!/usr/bin/env bash
# Build libsalr_ops.so with AddressSanitizer + UndefinedBehaviorSanitizer, then run the custom-op tests and a
# fuzz pass of random malformed inputs against it. Any sanitizer report aborts the process (halt_on_error),
# so "0 reports" means the whole run completed and the log holds no sanitizer output.
#
# Usage: custom_ops/scripts/sanitize_fuzz.sh [FUZZ_CASES=5000] [SEED=0]
# Env: PYTHON (default: python3 of the active venv), BUILD_DIR (default: build/asan), ONNXRUNTIME_INCLUDE_DIR.
set -uo pipefail
cases=${1:-5000}
seed=${2:-0}
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$repo/build/asan}
py=${PYTHON:-python3}
log=$build/sanitize_fuzz.log

cmake -S "$repo/custom_ops" -B "$build" -DSALR_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null || exit 1
cmake --build "$build" -j"$(nproc)" >/dev/null || exit 1
lib=$build/libsalr_ops.so

# Python is not instrumented: the ASan runtime must be loaded first. Leak checking is off because the
# interpreter and ORT keep allocations alive until exit by design.
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:alloc_dealloc_mismatch=0:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export SALR_OPS_LIBRARY=$lib

: >"$log"
failed=0
echo "== kernel tests (best kernel set and scalar set, per test parametrisation) under ASan+UBSan"
(cd "$repo" && "$py" -m pytest tests/custom_ops/test_ort_cpu.py tests/custom_ops/test_ort_cpu_quantized.py tests/custom_ops/test_domain_constants.py -q \
  -p no:cacheprovider 2>>"$log" | tail -n 1) || failed=1
echo "== fuzz: $cases random malformed cases per kernel set, seed $seed"
for kernels in "" scalar; do
  (cd "$repo" && SALR_KERNELS=$kernels "$py" -c "
import sys
from tests.custom_ops.fuzz import run_fuzz
s = run_fuzz(sys.argv[1], cases=int(sys.argv[2]), seed=int(sys.argv[3]))
print('kernels=${kernels:-best}', s)
" "$lib" "$cases" "$seed" 2>>"$log") || { echo "fuzz (kernels=${kernels:-best}) died"; failed=1; }
done
reports=$(grep -cE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$log" || true)
echo "== sanitizer reports: $reports (log: $log)"
[[ "$reports" == 0 && "$failed" == 0 ]]
