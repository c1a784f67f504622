"""Find and register the com.salr custom-op library, make ONNX Runtime sessions, generate text.

onnxruntime is imported lazily so that `import salr_edge` stays lean.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_ENV = "SALR_OPS_LIBRARY"
_LIBRARY_NAME = "libsalr_ops.so"


def library_path() -> str:
    """Return the path of the built custom-op library `libsalr_ops.so`.

    Resolution order: `$SALR_OPS_LIBRARY` (a developer build), then the copy installed inside the
    package (`salr_edge/lib/`, put there by `pip install`).

    Raises:
        FileNotFoundError: no built library was found; the message says how to build it.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={override} does not exist")
        return str(Path(override).resolve())
    candidates = [Path(__file__).resolve().parent / "lib" / _LIBRARY_NAME]
    try:  # editable installs (scikit-build-core redirect mode) keep the built file elsewhere
        from importlib.resources import files

        candidates.append(Path(str(files("salr_edge") / "lib" / _LIBRARY_NAME)))
    except (ModuleNotFoundError, TypeError):
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"the custom-op library {_LIBRARY_NAME} is not built: reinstall with `pip install -e .` "
        f"(it builds custom_ops/ with CMake) or set {LIBRARY_ENV} to a built copy"
    )
