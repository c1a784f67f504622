"""The CUDA kernels build for Jetson Orin (sm_87) and Hopper (sm_90) without a GPU, and their index math is right.

- `bitmap_index.h` (the offsets, popcount prefixes and staging arithmetic every CUDA kernel uses) is compiled
  by the host compiler into custom_ops/tests/bitmap_index_selftest.cc, which replays the kernels' walks
  over odd-shaped weights lane by lane; needs only a C++ compiler.
- Every custom_ops/src/cuda/*.cu compiles with nvcc for both architectures (objects only), and the ORT
  glue compiles with the host compiler against the ORT and CUDA headers; skipped without nvcc.
- A full `cmake -DSALR_CUDA=ON` configure + build links libsalr_ops.so against cudart and exports only
  RegisterCustomOps; skipped without nvcc, cudart or ORT headers.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUSTOM_OPS = REPO / "custom_ops"
CUDA_SRC = CUSTOM_OPS / "src" / "cuda"
GENCODE = ["-gencode", "arch=compute_87,code=sm_87", "-gencode", "arch=compute_90,code=sm_90"]


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _cuda_include(nvcc: str) -> Path | None:
    """include/ of a CUDA toolkit (cuda_runtime_api.h for the host-compiled glue): the one owning `nvcc`,
    else $CUDA_HOME / $CUDA_PATH / /usr/local/cuda* (`nvcc` may be a wrapper script elsewhere)."""
    roots = [Path(nvcc).resolve().parent.parent]
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += [Path("/usr/local/cuda")] + [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in roots:
        for candidate in (root / "include", *sorted(root.glob("targets/*/include"))):
            if (candidate / "cuda_runtime_api.h").is_file():
                return candidate
    return None


def _ort_include() -> Path | None:
    """ORT headers, found in custom_ops/CMakeLists.txt's order."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salr-edge" / "ort-headers"
    for candidate in (os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), "/usr/include/onnxruntime", str(cache)):
        if candidate and (Path(candidate) / "onnxruntime_c_api.h").is_file():
            return Path(candidate)
    return None


def _cudart_present() -> bool:
    patterns = ["/usr/local/cuda*/lib64/libcudart.so*", "/usr/local/cuda*/lib/libcudart.so*",
                "/usr/local/cuda*/targets/*/lib/libcudart.so*"]
    return any(glob.glob(p) for p in patterns)


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_bitmap_index_selftest(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "bitmap_index_selftest"
    build = _run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-x", "c++", "-I", str(CUDA_SRC),
                  str(CUSTOM_OPS / "tests" / "bitmap_index_selftest.cc"), "-o", str(exe)])
    assert build.returncode == 0, f"host build of bitmap_index.h failed:\n{build.stderr}"
    run = _run([str(exe)])
    assert run.returncode == 0, f"bitmap_index selftest failed:\n{run.stdout}{run.stderr}"


def test_cuda_sources_compile_for_sm87_and_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    sources = sorted(CUDA_SRC.glob("*.cu"))
    assert sources, f"no .cu files under {CUDA_SRC}"
    includes = ["-I", str(CUDA_SRC), "-I", str(CUSTOM_OPS / "include")]
    ort = _ort_include()
    if ort is not None:
        includes += ["-I", str(ort)]
    jobs = {src.name: [nvcc, "-std=c++17", "-O3", "-c", *GENCODE, "-Xcompiler", "-Wall,-Wextra", *includes,
                       "-DSALR_WITH_CUDA=1", "-DORT_API_MANUAL_INIT", str(src), "-o", str(tmp_path / f"{src.stem}.o")]
            for src in sources}
    cxx, cuda_include = _cxx(), _cuda_include(nvcc)
    glue = sorted(CUDA_SRC.glob("*.cc"))
    if glue and cxx and cuda_include and ort:
        for src in glue:
            jobs[src.name] = [cxx, "-std=c++17", "-O2", "-c", "-Wall", "-Wextra", "-Werror", "-fPIC", *includes,
                              "-I", str(cuda_include), "-DSALR_WITH_CUDA=1", "-DORT_API_MANUAL_INIT", str(src),
                              "-o", str(tmp_path / f"{src.stem}.o")]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    failed = {name: r for name, r in results.items() if r.returncode != 0}
    assert not failed, "\n\n".join(f"{name}: {' '.join(jobs[name])}\n{r.stdout}{r.stderr}"
                                   for name, r in failed.items())
    if glue and not (cxx and cuda_include and ort):
        pytest.skip("the .cu files compile; the ORT glue was not compiled (no C++ compiler, CUDA or ORT headers)")


def test_cmake_cuda_build_links(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    if not _cudart_present():
        pytest.skip("no libcudart under /usr/local/cuda*")
    ort = _ort_include()
    if ort is None:
        pytest.skip("no ORT headers (set ONNXRUNTIME_INCLUDE_DIR, or run `pip install -e .` once to fetch them)")
    env = dict(os.environ, ONNXRUNTIME_INCLUDE_DIR=str(ort))
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(CUSTOM_OPS), "-B", str(build), "-DSALR_CUDA=ON",
                                f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_BUILD_TYPE=Release"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, f"cmake configure failed:\n{configure.stdout}{configure.stderr}"
    make = subprocess.run(["cmake", "--build", str(build), f"-j{max(2, os.cpu_count() or 2)}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert make.returncode == 0, f"cmake build failed:\n{make.stdout[-6000:]}{make.stderr[-6000:]}"
    lib = build / "libsalr_ops.so"
    assert lib.is_file()
    if shutil.which("nm"):
        exported = _run(["nm", "-D", "--defined-only", str(lib)]).stdout.split()
        assert "RegisterCustomOps" in exported
    if shutil.which("ldd"):
        assert "libcudart" in _run(["ldd", str(lib)]).stdout
    # The CUDA kernels are registered for the CUDA EP (and, through the CPU registration, reachable).
    assert b"CUDAExecutionProvider" in lib.read_bytes()
