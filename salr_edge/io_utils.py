"""Atomic file and directory writes: a reader never sees a half-written output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_writable_parent(path: str | os.PathLike) -> Path:
    """Fail early, naming the problem, if `path` cannot be created."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file beside `path`; on success it is renamed onto `path`, on error removed."""
    path = check_writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success its files replace those in `path`.

    A new `path` appears whole (one rename). An existing `path` gets each file replaced by a rename,
    so no file in it is ever half-written.
    """
    path = check_writable_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory")
        for item in tmp.iterdir():
            target = path / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
