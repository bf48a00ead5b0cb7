"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one,
never half of one. Leftover temporaries of a killed writer end in ``.partial``.

On object storage (a URL cache, see :mod:`storage`) one PUT is already atomic and durable
once it returns: a write is that PUT, and the flushes are no-ops."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from .storage import is_remote, put

PARTIAL_SUFFIX = ".partial"  # zarr's LocalStore names its temporaries the same way


def atomic_write_bytes(path: Path, data: bytes | list, durable: bool = True) -> None:
    """Write ``data`` (bytes, or buffers written one after the other) to a temporary file beside
    ``path``, fsync, rename it over ``path``, then fsync the folder, so that the new file survives
    a power cut once this returns. ``durable=False`` leaves out both flushes, for a caller that
    flushes many files together later."""
    if is_remote(path):
        return put(path, data if isinstance(data, bytes) else b"".join(data))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.writelines([data] if isinstance(data, bytes) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` of ``arrays`` written atomically."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_npy(path: Path, array: Any) -> None:
    """``np.save`` of one array written atomically (readable memory-mapped)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def remove_partials(directory: Path) -> int:
    """Delete the temporaries a killed writer left under ``directory``; returns how many."""
    if is_remote(directory):
        return 0  # a PUT leaves no temporary
    leftovers = list(Path(directory).rglob(f"*{PARTIAL_SUFFIX}")) if Path(directory).exists() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def fsync_paths(files: list[Path], root: Path) -> None:
    """Flush ``files`` to disk, then every folder between them and ``root`` (inclusive), deepest
    first, so that new files and the new folders holding them survive a power cut."""
    if is_remote(root):
        return
    folders: set[Path] = set()
    for path in dict.fromkeys(files):
        _fsync(path)
        parent = path.parent
        while parent != root.parent and parent not in folders:
            folders.add(parent)
            parent = parent.parent
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk (before a completion marker)."""
    if is_remote(directory):
        return
    for root, _, files in os.walk(directory):
        for name in [*files, "."]:
            _fsync(Path(root) / name)
