#!/usr/bin/env bash
# Build libsalr_ops.so with the CUDA kernels on a Jetson Orin (aarch64, JetPack 6, CUDA 12.x), on the device.
#
# Usage: custom_ops/scripts/build_jetson.sh [cmake|pip] [--test]
#   cmake (default)  configure + build into $BUILD_DIR; prints the SALR_OPS_LIBRARY line to use it
#   pip              SALR_CUDA=ON pip install . (installs the library into salr_edge/lib, where
#                    salr_edge.runtime.library_path() finds it)
#   --test           afterwards, run tests/custom_ops/test_ort_cuda.py (needs onnxruntime with the CUDA EP)
#
# Env:
#   ONNXRUNTIME_INCLUDE_DIR   include/ of an ORT release, 1.21 <= version <= the ORT the device runs. The
#                             headers do not depend on the architecture: the include/ folder of any ORT
#                             release archive works, or copy ~/.cache/salr-edge/ort-headers from a build PC.
#                             (The Debian-package fallback of the CPU build does not apply to JetPack's Ubuntu.)
#   CUDA_HOME                 default /usr/local/cuda (JetPack puts nvcc there but not on PATH)
#   CMAKE_CUDA_ARCHITECTURES  default 87 (Orin); the library then runs on Orin only
#   BUILD_DIR                 default build/jetson;  PYTHON  default python3;  JOBS  default nproc
set -euo pipefail

mode=cmake
run_tests=0
for arg in "$@"; do
  case "$arg" in
    cmake|pip) mode=$arg ;;
    --test) run_tests=1 ;;
    *) echo "usage: $0 [cmake|pip] [--test]" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "$0")/../.." && pwd)
cuda_home=${CUDA_HOME:-/usr/local/cuda}
archs=${CMAKE_CUDA_ARCHITECTURES:-87}
build=${BUILD_DIR:-$repo/build/jetson}
py=${PYTHON:-python3}
jobs=${JOBS:-$(nproc)}

if [[ "$(uname -m)" != "aarch64" ]]; then
  echo "build_jetson: warning: this is $(uname -m), not a Jetson; building for sm_${archs} anyway" >&2
fi
nvcc=$cuda_home/bin/nvcc
if [[ ! -x "$nvcc" ]]; then
  echo "build_jetson: no nvcc at $nvcc; install JetPack's CUDA toolkit (apt install nvidia-jetpack) or set CUDA_HOME" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2

if [[ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" ]]; then
  for candidate in /usr/include/onnxruntime "${XDG_CACHE_HOME:-$HOME/.cache}/salr-edge/ort-headers"; do
    if [[ -f "$candidate/onnxruntime_c_api.h" ]]; then
      export ONNXRUNTIME_INCLUDE_DIR=$candidate
      break
    fi
  done
fi
if [[ ! -f "${ONNXRUNTIME_INCLUDE_DIR:-}/onnxruntime_c_api.h" ]]; then
  echo "build_jetson: set ONNXRUNTIME_INCLUDE_DIR to the include/ folder of an ONNX Runtime release (1.21 or" >&2
  echo "  newer, not newer than the onnxruntime the device runs), e.g. from onnxruntime-linux-aarch64-1.21.*.tgz" >&2
  exit 1
fi
echo "build_jetson: ORT headers $ONNXRUNTIME_INCLUDE_DIR, CUDA architectures $archs"

export PATH=$cuda_home/bin:$PATH
export CUDACXX=$nvcc
if [[ "$mode" == pip ]]; then
  (cd "$repo" && SALR_CUDA=ON CMAKE_CUDA_ARCHITECTURES=$archs "$py" -m pip install .)
  lib=$("$py" -c 'from salr_edge.runtime import library_path; print(library_path())')
else
  cmake -S "$repo/custom_ops" -B "$build" -DSALR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$archs" \
        -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_BUILD_TYPE=Release
  cmake --build "$build" -j"$jobs"
  lib=$build/libsalr_ops.so
fi

if ! nm -D --defined-only "$lib" | grep -q ' RegisterCustomOps$'; then
  echo "build_jetson: $lib does not export RegisterCustomOps" >&2
  exit 1
fi
echo "build_jetson: built $lib"
[[ "$mode" == cmake ]] && echo "  use it with: export SALR_OPS_LIBRARY=$lib"

if (( run_tests )); then
  if ! "$py" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    echo "build_jetson: onnxruntime has no CUDAExecutionProvider here (install JetPack's onnxruntime-gpu wheel); skipping tests" >&2
    exit 0
  fi
  (cd "$repo" && SALR_OPS_LIBRARY=$lib "$py" -m pytest -q tests/custom_ops/test_ort_cuda.py)
fi
