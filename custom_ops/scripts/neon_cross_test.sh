#!/usr/bin/env bash
# Cross-compile the CPU kernels for AArch64 (NEON path) with Debian's g++-aarch64-linux-gnu and run the
# standalone kernel self-test (custom_ops/tests/kernel_selftest.cc, no ONNX Runtime needed) under
# qemu-aarch64: every kernel set compiled for the target (scalar and NEON) is checked against a float64
# reference on odd shapes, fp16 and fp32 values, 2:4 and unstructured bitmaps, m = 1 .. 130.
#
# Needs: apt-get install g++-aarch64-linux-gnu qemu-user
# Usage: custom_ops/scripts/neon_cross_test.sh   (exit status 0 when every check passes)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${BUILD_DIR:-$here/../build/aarch64}
cxx=${CXX_AARCH64:-aarch64-linux-gnu-g++}
sysroot=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
for tool in "$cxx" qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "neon_cross_test: $tool not found (apt-get install g++-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
mkdir -p "$out"
"$cxx" -O2 -std=c++17 -Wall -Wextra -march=armv8.2-a+fp16 -I"$here/include" -I"$here/src/cpu" \
  "$here"/src/cpu/kernels_scalar.cc "$here"/src/cpu/kernels_neon.cc "$here"/src/cpu/kernels_avx2.cc \
  "$here"/src/cpu/sparse_linear.cc "$here"/src/cpu/format.cc "$here"/src/cpu/q24_layout.cc "$here"/tests/kernel_selftest.cc \
  -o "$out/kernel_selftest"
# Baseline armv8-a must build too: the library is not allowed to need the fp16 arithmetic extension.
"$cxx" -O2 -std=c++17 -march=armv8-a -I"$here/include" -I"$here/src/cpu" -c "$here/src/cpu/kernels_neon.cc" \
  -o "$out/kernels_neon_armv8a.o"
qemu-aarch64 -L "$sysroot" "$out/kernel_selftest"
