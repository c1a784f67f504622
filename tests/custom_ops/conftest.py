"""Fixtures of the custom-op library tests: the built library (or a clean skip) and ORT sessions."""

from __future__ import annotations

import os

import pytest


def find_library() -> str | None:
    """Path of libsalr_ops.so ($SALR_OPS_LIBRARY, else the copy installed in salr_edge/lib), or None."""
    try:
        from salr_edge.runtime import library_path
    except ImportError:  # the package is being edited or not installed: honour the override alone
        override = os.environ.get("SALR_OPS_LIBRARY")
        return override if override and os.path.isfile(override) else None
    try:
        return library_path()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="session")
def salr_lib() -> str:
    pytest.importorskip("onnxruntime")
    path = find_library()
    if path is None:
        pytest.skip("libsalr_ops.so is not built: `pip install -e .`, or build custom_ops/ with CMake and set "
                    "SALR_OPS_LIBRARY")
    return path
