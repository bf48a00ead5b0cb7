"""The stage contract: content-hash keys, skip / force, locks, manifests.

A stage is ``deps + params + outs``: its key is the sha256 of the canonical JSON of
``{stage, stage_version, params, inputs}``, where ``inputs`` are upstream keys (or, for
extraction, the dataset fingerprint). A stage whose output for that key is complete is skipped.
This module knows no particular stage.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from . import cache_schema

MISSING, PARTIAL, COMPLETE = "missing", "partial", "complete"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, version: int, params: dict[str, Any], inputs: Iterable[str] = ()) -> str:
    """sha256 over the stage name, its hand-bumped version, its parameters and upstream keys."""
    payload = {"stage": stage, "stage_version": version, "params": params, "inputs": list(inputs)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def package_versions(names: Iterable[str] = ("stegoscope", "torch", "timm", "zarr", "numpy")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# -- file hashing -------------------------------------------------------------------------------

_HASH_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fast_file_hash(path: Path, size: int) -> str:
    """sha256 of size + first and last MiB: catches edits without reading whole datasets."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_HASH_BLOCK))
        if size > 2 * _HASH_BLOCK:
            fh.seek(-_HASH_BLOCK, os.SEEK_END)
            digest.update(fh.read(_HASH_BLOCK))
        elif size > _HASH_BLOCK:
            digest.update(fh.read())
    return digest.hexdigest()


class FileHashMemo:
    """Memoised per-file hashes, invalidated by (size, mtime_ns). Stored as one JSON file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, list] = {}
        if path is not None and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}  # a damaged memo only costs a rehash
        self._dirty = False

    def hash(self, path: Path, full: bool = False) -> str:
        stat = path.stat()
        entry_key = f"{'full' if full else 'fast'}:{path.resolve()}"
        cached = self._entries.get(entry_key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        value = sha256_file(path) if full else _fast_file_hash(path, stat.st_size)
        self._entries[entry_key] = [stat.st_size, stat.st_mtime_ns, value]
        self._dirty = True
        return value

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        atomic_write_text(self.path, json.dumps(self._entries))
        self._dirty = False


def fingerprint_files(root: Path, files: Iterable[Path], memo: FileHashMemo) -> str:
    """Dataset fingerprint: sha256 over sorted (relative path, size, fast content hash)."""
    root = Path(root)
    rows = []
    for path in files:
        path = Path(path)
        rows.append([path.relative_to(root).as_posix(), path.stat().st_size, memo.hash(path)])
    rows.sort()
    memo.save()
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


# -- atomic writes, manifests -------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MANIFEST = cache_schema.MANIFEST


def atomic_write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` of ``arrays`` written atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage, or None when there is none (not done)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise cache_schema.StoreError(f"{path}: manifest does not parse ({exc}); rerun the stage with --force") from exc


def artefact_state(directory: Path) -> str:
    """An artefact directory is complete once its manifest exists (it is written last)."""
    if read_manifest(directory) is not None:
        return COMPLETE
    return PARTIAL if Path(directory).exists() else MISSING


def store_state(path: Path, key: str) -> str:
    """A Zarr store is complete when its attrs say so for this key; readable or not, else partial."""
    if not Path(path).exists():
        return MISSING
    try:
        store = cache_schema.open_feature_store(path)
    except cache_schema.StoreError:
        return PARTIAL
    return COMPLETE if store.complete and store.key == key else PARTIAL


def begin_artefact(directory: Path) -> None:
    """Create the artefact directory and drop any old manifest, so a crash leaves it incomplete."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / MANIFEST).unlink(missing_ok=True)


# -- locks --------------------------------------------------------------------------------------


class LockHeld(RuntimeError):
    """Another process holds the lock of a stage key."""


@contextmanager
def stage_lock(path: Path, wait: bool = True, on_wait=None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the duration of a stage run.

    The kernel drops the lock when its holder dies, so a stale lock of a crashed process is
    taken over at once. Local file systems only: flock means nothing on object storage.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            if not wait:
                raise LockHeld(f"{path} is held by {holder}") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# -- the stage contract -------------------------------------------------------------------------


class Stage(ABC):
    """One unit of cached work: ``params`` and ``inputs`` give the key, ``output`` the artefact."""

    name: str
    version: int

    def __init__(self, cache_root: Path):
        self.cache_root = Path(cache_root)

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Every parameter that changes the output."""

    def inputs(self) -> list[str]:
        """Upstream keys or content fingerprints."""
        return []

    @cached_property
    def key(self) -> str:
        return stage_key(self.name, self.version, self.params(), self.inputs())

    @property
    @abstractmethod
    def output(self) -> Path:
        """Where the artefact of this key lives."""

    @abstractmethod
    def state(self) -> str:
        """``complete``, ``partial`` (resumable) or ``missing``."""

    @abstractmethod
    def execute(self, force: bool) -> Any:
        """Do the work (resuming when possible; from scratch with ``force``)."""


@dataclass
class RunResult:
    stage: Stage
    skipped: bool
    seconds: float
    detail: Any = None


def run_stage(stage: Stage, force: bool = False, wait: bool = True, on_wait=None) -> RunResult:
    """Skip a complete stage; otherwise run it under the lock of its key."""
    start = time.perf_counter()
    if not force and stage.state() == COMPLETE:
        return RunResult(stage, True, time.perf_counter() - start)
    with stage_lock(cache_schema.lock_path(stage.cache_root, stage.key), wait=wait, on_wait=on_wait):
        # Whoever held the lock before us may have finished the same work.
        if not force and stage.state() == COMPLETE:
            return RunResult(stage, True, time.perf_counter() - start)
        detail = stage.execute(force)
    return RunResult(stage, False, time.perf_counter() - start, detail)
