"""Where the cache lives: a local folder, or any URL fsspec resolves (``s3://bucket/prefix``,
``gs://…``, ``memory://…``).

A local path (or ``file://`` URL) stays a :class:`pathlib.Path`: atomic renames, fsync and
``flock`` work as before. Any other URL becomes a :class:`upath.UPath`, which speaks the same
path API over fsspec, so that the cache's code is written once. ``pathlib.Path(upath)``
raises, so a URL can never turn into a local folder of its name.

What differs on object storage, and how it is kept equivalent:

- **Atomic writes.** One PUT is atomic: an object is seen whole or not at all, so a file is
  written with one PUT (no temporary key to publish), and a manifest is still written last.
- **Durability.** There is nothing to fsync: a PUT that returned is stored.
- **Locks.** ``flock`` does not exist; :class:`Lease` objects written with a conditional
  (create-only) PUT take its place.
- **Configuration.** Credentials and endpoints come from the backend's usual settings (for S3:
  ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto), so
  that every process and dask worker finds the same store by its URL alone.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
# Backends whose create-only PUT is atomic across processes (s3fs sends If-None-Match: *).
CONDITIONAL_PUT = {"s3", "s3a", "memory"}
# The package each common scheme needs, for the error that says what to install.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
# Options the cache sets on a backend unless the URL's user set them: a listing cached by one
# process would hide another process's new objects (shards of another rank, a finished manifest).
_DEFAULTS = {"s3": {"use_listings_cache": False}, "s3a": {"use_listings_cache": False}}


class CacheLocationError(ValueError):
    """The cache URL cannot be used: unknown scheme, missing package, unreachable or refused."""


def is_remote(path: Any) -> bool:
    """Whether ``path`` is a URL path (a UPath that is not a local file)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def cache_path(location: str | os.PathLike, check: bool = True) -> Path:
    """The cache root at ``location``: a local ``Path``, or a ``UPath`` for a URL.

    With ``check`` (a URL given by the user) the backend is asked for the root once, so that a
    missing package, a typo'd bucket or missing credentials fail here, with the fix.
    """
    if is_remote(location) or isinstance(location, Path):
        return location
    text = os.fspath(location)
    match = _SCHEME.match(text)
    if not match:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme in ("file", "local"):
        return Path(text[match.end():] if text[match.end():].startswith("/") else "/" + text[match.end():])
    import fsspec
    from upath import UPath

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = _PACKAGES.get(scheme, "the fsspec backend of that scheme")
        raise CacheLocationError(f"cache {text}: the {scheme}:// backend needs {package}, which is not installed "
                                 f"({exc}); fix: pip install {package}  (or pip install 'stegoscope[s3]')") from None
    except ValueError:
        raise CacheLocationError(f"cache {text}: unknown scheme {scheme}:// (fsspec knows no such filesystem); "
                                 f"fix: give a local folder, file:///abs/path, or a URL such as s3://bucket/prefix") from None
    path = UPath(text, **_DEFAULTS.get(scheme, {}))
    if check:
        _reachable(path)
    return path


def _reachable(path) -> None:
    """List the root's bucket (or parent) once; turn the backend's failure into an error with the fix."""
    try:
        path.exists()
        bucket = path.path.split("/", 1)[0]  # the URL without its protocol: bucket/prefix
        if path.protocol in ("s3", "s3a", "gs", "gcs") and not path.fs.exists(bucket):
            raise CacheLocationError(f"cache {path}: bucket {bucket!r} does not exist; fix: create it, or correct the URL")
    except CacheLocationError:
        raise
    except Exception as exc:  # botocore's NoCredentialsError, PermissionError, connection errors
        hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for a "
                "non-AWS endpoint (MinIO, Ceph)") if path.protocol in ("s3", "s3a") else "check the backend's credentials"
        raise CacheLocationError(f"cache {path}: cannot be reached ({type(exc).__name__}: {exc}); fix: {hint}") from None


def zarr_options(path) -> dict[str, Any] | None:
    """The ``storage_options`` zarr needs to open a store at ``path`` by its URL (None: local)."""
    return dict(path.storage_options) if is_remote(path) else None


def put(path, data: bytes) -> None:
    """One PUT of ``data`` at ``path`` (object storage: atomic by itself)."""
    path.fs.pipe_file(path.path, data)


def read_npy(path, mmap: bool = True):
    """A ``.npy`` file: memory-mapped when local, read whole from object storage."""
    import numpy as np

    if is_remote(path):
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def file_sizes(root) -> dict[str, int]:
    """Every file under ``root`` (relative POSIX path → bytes), from one listing on object storage."""
    if is_remote(root):
        base = root.path.rstrip("/") + "/"
        found = root.fs.find(root.path, detail=True) if root.exists() else {}
        return {name[len(base):]: int(info["size"]) for name, info in sorted(found.items())
                if info.get("type") == "file" and name.startswith(base)}
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def stamp(path) -> str:
    """What changes when the file at ``path`` is rewritten: its mtime locally, its ETag remotely."""
    if is_remote(path):
        info = path.fs.info(path.path)
        return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"))
    return str(path.stat().st_mtime_ns)


def make_dirs(path) -> None:
    """A local folder and its parents; nothing on object storage, which has no folders."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def remove_tree(path) -> None:
    """Delete a folder (a prefix of objects) and everything under it."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=False)


# -- leases: locks on object storage ---------------------------------------------------------------

LEASE_SECONDS = 60.0  # default lifetime of a lease; $STEGOSCOPE_LEASE_SECONDS overrides it


class LeaseHeld(RuntimeError):
    """Another process holds a live lease."""


class LeaseLost(RuntimeError):
    """This process's lease expired and another process took it over."""


class Lease:
    """A lock on object storage: objects under the prefix ``path``.

    An exclusive holder owns ``x-<generation>``, created with a conditional (create-only) PUT,
    so that of two processes creating the same generation exactly one succeeds. A shared holder
    (a stage reading an input that ``gc`` must keep) owns ``s-<uuid>``. Each object holds the
    holder, host, pid, start time and expiry; a thread renews it every third of ``seconds``.
    A lease past its expiry belongs to a dead (or hung) process: an exclusive taker creates the
    next generation, and a renewer that finds a newer generation (or another holder in its
    object) knows its lease is lost (``lost``): :meth:`check`, called through the stage's
    :class:`locks.LeaseLock` before a manifest or a store's completion is published, then stops it.

    On a backend without an atomic create-only PUT (see ``CONDITIONAL_PUT``) a lease is only
    checked, then written: it says so, and refuses to run when another live lease exists
    instead of waiting for it.
    """

    def __init__(self, path, shared: bool = False, seconds: float | None = None):
        self.path, self.shared = path, shared
        self.seconds = float(os.environ.get("STEGOSCOPE_LEASE_SECONDS", LEASE_SECONDS)) if seconds is None else seconds
        self.token = uuid.uuid4().hex
        self.mine = None  # the object this process owns
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.conditional = path.protocol in CONDITIONAL_PUT

    # -- objects --------------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.token, "host": socket.gethostname(), "pid": os.getpid(), "since": self._since,
                           "expires": now + self.seconds, "shared": self.shared}).encode()

    def leases(self) -> dict[str, dict]:
        """The lease objects under the prefix: name → record (unreadable or vanished ones left out)."""
        fs = self.path.fs
        try:
            names = [n.rsplit("/", 1)[1] for n in fs.ls(self.path.path, detail=False, refresh=True)]
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            try:
                out[name] = json.loads(fs.cat_file(f"{self.path.path}/{name}"))
            except (FileNotFoundError, ValueError):
                continue
        return out

    @staticmethod
    def live(records: dict[str, dict], kind: str) -> dict[str, dict]:
        now = time.time()
        return {n: r for n, r in records.items() if n.startswith(kind) and r.get("expires", 0) > now}

    @staticmethod
    def describe(record: dict) -> str:
        return (f"pid {record.get('pid')} on {record.get('host')} since {time.ctime(record.get('since', 0))} "
                f"(lease expires in {record.get('expires', 0) - time.time():.0f} s)")

    def _create(self, name: str) -> bool:
        key = f"{self.path.path}/{name}"
        if self.conditional:
            try:
                self.path.fs.pipe_file(key, self._record(), mode="create")
            except FileExistsError:
                return False
            return True
        if self.path.fs.exists(key):
            return False
        self.path.fs.pipe_file(key, self._record())
        return True

    # -- acquire / release -----------------------------------------------------------------
    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None, poll: float | None = None) -> None:
        poll = poll if poll is not None else min(5.0, self.seconds / 4)
        if not self.conditional:  # once per protocol: the message names it, and Python shows a message once
            warnings.warn(f"{self.path.protocol}:// has no conditional (create-only) put that stegoscope trusts: two runs "
                          "of one stage key starting at the same moment cannot be excluded, so run one writer per key "
                          "(a run that finds another's live lease refuses to start)", stacklevel=2)
        self._since = time.time()
        waited = False
        while True:
            records = self.leases()
            blocking = self.live(records, "x-")
            if not blocking:
                if self.shared:
                    name = f"s-{self.token}"
                    self._create(name)
                    blocking = self.live(self.leases(), "x-")  # a writer that came in between wins
                    if not blocking:
                        self.mine = name
                        break
                    self.path.fs.rm_file(f"{self.path.path}/{name}")
                else:
                    generations = [int(n[2:]) for n in records if n.startswith("x-") and n[2:].isdigit()]
                    name = f"x-{max(generations, default=-1) + 1:08d}"
                    if self._create(name):
                        self.mine = name
                        for stale, record in records.items():  # expired leases of dead runs (every x- here is)
                            if record.get("expires", 0) <= time.time():
                                self.path.fs.rm_file(f"{self.path.path}/{stale}")
                        self._start_renewing()
                        self._drain_readers(wait, on_wait, poll)
                        return
                    blocking = self.live(self.leases(), "x-")
            if blocking or not self.conditional:
                record = next(iter(blocking.values()), {})
                if not wait or not self.conditional:
                    why = "" if self.conditional else (f" ({self.path.protocol}:// has no conditional put, so two writers "
                                                       f"cannot be excluded: this run refuses instead of waiting)")
                    raise LeaseHeld(f"{self.path}: held by {self.describe(record)}{why}")
                if on_wait is not None and not waited:
                    on_wait(self.describe(record))
                waited = True
            time.sleep(poll)
        self._start_renewing()

    def _drain_readers(self, wait: bool, on_wait, poll: float) -> None:
        """An exclusive holder waits for the shared holders that came before it to leave."""
        waited = False
        while readers := self.live(self.leases(), "s-"):
            if not wait:
                self.release()
                raise LeaseHeld(f"{self.path}: read by {self.describe(next(iter(readers.values())))}")
            if on_wait is not None and not waited:
                on_wait(self.describe(next(iter(readers.values()))))
            waited = True
            time.sleep(poll)

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease {self.path.name}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception:  # a transient backend error: the next renewal tries again
                continue

    def renew(self) -> bool:
        """Extend this process's lease; False (and ``lost``) when another process took it over."""
        if self.mine is None:
            return True  # nothing held, nothing lost
        if self.lost:
            return False
        key = f"{self.path.path}/{self.mine}"
        records = self.leases()
        newer = [n for n in records if n.startswith("x-") and n > self.mine] if not self.shared else []
        if records.get(self.mine, {}).get("holder") != self.token or newer:
            self.lost = True
            return False
        self.path.fs.pipe_file(key, self._record())
        return True

    def check(self) -> None:
        """Renew this lease now; LeaseLost if another process took it over (called before
        anything is published under it: a manifest, a store's completion)."""
        if not self.renew():
            raise LeaseLost(f"{self.path}: this run's lease expired and another process took it over while it ran "
                            f"(it was paused or cut off for longer than the lease's {self.seconds:g} s); nothing more "
                            "is published: rerun the command, finished work is skipped")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        if self.mine is not None and not self.lost:
            try:
                if self.path.fs.exists(f"{self.path.path}/{self.mine}"):
                    record = json.loads(self.path.fs.cat_file(f"{self.path.path}/{self.mine}"))
                    if record.get("holder") == self.token:
                        self.path.fs.rm_file(f"{self.path.path}/{self.mine}")
            except (FileNotFoundError, ValueError):
                pass
        self.mine = None


def lease_held(path) -> bool:
    """Whether any process holds a live lease (shared or exclusive) under ``path``."""
    records = Lease(path).leases()
    return bool(Lease.live(records, "x-") or Lease.live(records, "s-"))


def as_path(location: str | os.PathLike) -> Path:
    """``location`` as a cache path (a URL stays a URL), without asking its backend."""
    return cache_path(location, check=False)
