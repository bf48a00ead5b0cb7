"""One lock interface for a stage key, wherever the cache lives.

A :class:`Lock` is exclusive while a stage writes its key's output and ``shared`` while a stage
reads it (so a rewrite of a store waits for its readers, and a reader for the rewrite). On a
local cache it is a :class:`FileLock` (``flock``: the kernel drops it when its holder dies, so a
crashed process's lock is taken over at once; forked children do not keep it); on object
storage, where flock means nothing, a :class:`LeaseLock` (a :class:`storage.Lease`, taken over
once it expires). :func:`lock_at` is the one place that chooses. The runner hands a stage the
locks it took for it (``Stage.held``); the stage passes them to whatever publishes, which calls
:func:`check_held` first, so a run whose lease was taken over publishes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import storage


class LockHeld(RuntimeError):
    """Another process holds the lock of a stage key."""


class Lock(ABC):
    """A lock on ``path``; use ``with lock.taken(wait, on_wait): …``."""

    def __init__(self, path: Path, shared: bool = False):
        self.path, self.shared = path, shared

    @abstractmethod
    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        """Take it (waiting for the holder with ``wait``, telling ``on_wait`` who it is); LockHeld
        naming the holder when it is held and ``wait`` is False."""

    @abstractmethod
    def release(self) -> None:
        """Give it back."""

    def check(self) -> None:
        """Raise when another process took this lock over while it was held; called before
        anything is published under it. A flock cannot be taken from a live holder: nothing to do."""

    @contextmanager
    def taken(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[Lock]:
        self.acquire(wait, on_wait)
        try:
            yield self
        finally:
            self.release()


class FileLock(Lock):
    """``flock`` on a local file, which names its exclusive holder (pid, host, since when)."""

    open_fds: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        FileLock.open_fds.add(fd)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                if not self.shared:
                    holder += " or a stage reading its output"
                if not wait:
                    raise LockHeld(f"{path} is held by {holder}, which runs or reads the same stage key; "
                                   "wait for it to finish (run without --no-wait)") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, mode)
        except BaseException:
            self.release()
            raise
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)

    def release(self) -> None:
        FileLock.open_fds.discard(self.fd)
        os.close(self.fd)  # releases the flock

    @staticmethod
    def held(path: Path) -> bool:
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so that a
    lock is free as soon as the process that took it dies, whatever its children do."""
    for fd in list(FileLock.open_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    FileLock.open_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class LeaseLock(Lock):
    """A :class:`storage.Lease` on object storage."""

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        self.lease = storage.Lease(self.path, shared=self.shared)
        try:
            self.lease.acquire(wait, on_wait)
        except storage.LeaseHeld as exc:
            raise LockHeld(f"{exc}; it runs or reads the same stage key: wait for it to finish (run without "
                           f"--no-wait), or for its lease to expire if it died") from None

    def release(self) -> None:
        self.lease.release()

    def check(self) -> None:
        self.lease.check()  # storage.LeaseLost when it expired and was taken over

    @staticmethod
    def held(path: Path) -> bool:
        return storage.lease_held(path)


def check_held(held: Iterable[Lock]) -> None:
    """Before publishing: raise if any of the locks a run was handed has been taken over."""
    for lock in held:
        lock.check()


def lock_at(path: Path, shared: bool = False) -> Lock:
    """The lock of ``path``: a lease on object storage, else a file lock."""
    return (LeaseLock if storage.is_remote(path) else FileLock)(path, shared)


def lock_held(path: Path) -> bool:
    """Whether any process holds the lock at ``path`` (shared or exclusive)."""
    return (LeaseLock if storage.is_remote(path) else FileLock).held(path)
