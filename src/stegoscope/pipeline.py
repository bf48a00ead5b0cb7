"""The stage contract: content-hash keys, skip / force, locks, manifests.

A stage is ``deps + params + outs``: its key is the sha256 of the canonical JSON of
``{stage, stage_version, params, inputs}``, where ``inputs`` are upstream keys (or, for
extraction, the dataset fingerprint). A stage whose output for that key is complete is skipped.
This module knows no particular stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from . import cache_schema, storage
from .atomic import PARTIAL_SUFFIX, atomic_write_bytes, atomic_write_npz, atomic_write_text, remove_partials
from .locks import Lock, LockHeld, check_held, lock_at, lock_held  # noqa: F401 (LockHeld re-exported)
from .records import FileEntry, Manifest, R, Record, RecordError, canonical_json, experiment_id, without_seeds  # noqa: F401 (re-exported)
from .storage import as_path

MISSING, PARTIAL, COMPLETE = "missing", "partial", "complete"


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
    with path.open("rb") as fh:
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
    """Memoised per-file hashes, invalidated by any change of (size, mtime_ns, ctime_ns, inode):
    an edit that keeps the size and restores the mtime still changes the ctime, and a file
    replaced by another changes the inode. Stored as one JSON file."""

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
        identity = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        cached = self._entries.get(entry_key)
        if cached and cached[:-1] == identity:
            return cached[-1]
        value = sha256_file(path) if full else _fast_file_hash(path, stat.st_size)
        self._entries[entry_key] = [*identity, value]
        self._dirty = True
        return value

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        atomic_write_text(self.path, json.dumps(self._entries))
        self._dirty = False


def file_rows(root: Path, files: Iterable[Path], memo: FileHashMemo) -> list[list]:
    """Sorted (relative path, size, fast content hash) of a dataset's files."""
    root = Path(root)
    rows = []
    for path in files:
        path = Path(path)
        rows.append([path.relative_to(root).as_posix(), path.stat().st_size, memo.hash(path)])
    rows.sort()
    memo.save()
    return rows


def fingerprint_rows(rows: list[list]) -> str:
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


def fingerprint_files(root: Path, files: Iterable[Path], memo: FileHashMemo) -> str:
    """Dataset fingerprint: sha256 over sorted (relative path, size, fast content hash)."""
    return fingerprint_rows(file_rows(root, files, memo))


def diff_rows(old: list[list], new: list[list]) -> str:
    """What changed between two listings of :func:`file_rows`, in words."""
    before, after = {r[0]: r[1:] for r in old}, {r[0]: r[1:] for r in new}
    changes = {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "modified": sorted(k for k in before.keys() & after.keys() if before[k] != after[k]),
    }
    parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
             for what, names in changes.items() if names]
    return "; ".join(parts) or "no file differs"


# -- manifests ----------------------------------------------------------------------------------

MANIFEST = cache_schema.MANIFEST


def _artefact_files(directory: Path) -> list[Path]:
    return [directory / name for name in storage.file_sizes(directory)
            if name.rsplit("/", 1)[-1] != MANIFEST and not name.endswith(PARTIAL_SUFFIX)]


def write_manifest(directory: Path, manifest: Manifest, files: Iterable[Path] | None = None, held: Iterable[Lock] = ()) -> None:
    """Write the manifest last: it lists the artefact's files (default: all in ``directory``)
    with size and sha256, so a file that is later truncated or changed is noticed before it is read.
    ``held``: the locks the run holds; if one was taken over, nothing is published."""
    directory = as_path(directory)
    files = {p.relative_to(directory).as_posix(): FileEntry(p.stat().st_size, sha256_file(p))
             for p in (_artefact_files(directory) if files is None else map(as_path, files))}
    check_held(held)
    atomic_write_text(directory / MANIFEST, json.dumps(replace(manifest, files=files).to_dict(), indent=2, sort_keys=True))


def _parse_manifest(directory: Path) -> tuple[Manifest | None, str | None]:
    """(manifest, problem): (None, None) when there is no manifest, i.e. the run did not finish.
    Its shape is checked before any of it is used, so a damaged or hostile one is an error, not a traceback."""
    path = as_path(directory) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"{path} does not parse ({exc})"
    try:
        return Manifest.from_dict(data, str(path)), None
    except RecordError as exc:
        return None, f"{path} is a damaged manifest ({str(exc).removeprefix(f'{path}: ')})"


def _fix_hint(directory: Path, manifest: Manifest | None, force: bool = False) -> str:
    """The command that recomputes the artefact in ``directory`` (its stage: from the manifest,
    else from the folder it is in: ``artefacts/<stage>/…``)."""
    stage = manifest.stage if manifest is not None else as_path(directory).parent.name
    command = cache_schema.remake_command(stage)
    if force:  # sizes match, so the stage looks complete: only --force recomputes it
        return f"rerun the `stegoscope {command}` command that made it with --force"
    return f"rerun the `stegoscope {command}` command that made it (or `study`); it recomputes this artefact"


def _inspect(directory: Path, hashes: Iterable[str] = ()) -> tuple[Manifest | None, str | None]:
    """(manifest, problem) of an artefact: an unparsable manifest, a listed file that is missing
    or has another size, or one of the files named in ``hashes`` whose sha256 changed."""
    directory = as_path(directory)
    manifest, problem = _parse_manifest(directory)
    if problem or manifest is None:
        return manifest, problem
    files = manifest.files
    sizes = storage.file_sizes(directory)  # one listing (object storage: no request per file)
    for name, entry in files.items():
        path, size = directory / name, sizes.get(name)
        if size is None:
            return manifest, f"{path} is missing"
        if size != entry.bytes:
            return manifest, f"{path} has {size} bytes, its manifest says {entry.bytes} (truncated or rewritten)"
    for name in hashes:
        if name in files and sha256_file(directory / name) != files[name].sha256:
            return manifest, f"{directory / name} does not match the sha256 in its manifest (changed after it was written)"
    return manifest, None


def artefact_problem(directory: Path, hashes: Iterable[str] = ()) -> str | None:
    """What is wrong with a finished artefact, None when nothing. Sizes are cheap to check on
    every look; the sha256 of the files in ``hashes`` is checked when they are read."""
    return _inspect(directory, hashes)[1]


def verify_artefact(directory: Path) -> str | None:
    """What is wrong with a finished artefact when every file is checked against the sha256 in
    its manifest (None when nothing, or when it has no manifest: it never finished)."""
    manifest, problem = _parse_manifest(directory)
    return problem or (artefact_problem(directory, hashes=manifest.files) if manifest else None)


def read_manifest(directory: Path, hashes: Iterable[str] = ()) -> Manifest | None:
    """The manifest of a finished stage, or None when there is none (not done).

    A manifest that does not parse, or files that do not match it (sizes; sha256 of ``hashes``),
    raise StoreError with the fix.
    """
    manifest, problem = _inspect(directory, hashes)
    if problem:
        raise cache_schema.StoreError(f"{problem}; {_fix_hint(directory, manifest, force='sha256' in problem)}")
    return manifest


def artefact_file(directory: Path, name: str) -> Path:
    """The path of a file of a finished artefact, checked against its manifest (size and sha256)."""
    if read_manifest(directory, hashes=[name]) is None:
        raise cache_schema.StoreError(f"{directory}: no manifest, so the run that makes it did not finish; run it (again)")
    return as_path(directory) / name


def load_npz(directory: Path, name: str = cache_schema.PAYLOAD, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The arrays of an artefact's ``.npz`` (those of ``keys`` that it has, else all), after
    checking it against the manifest."""
    import numpy as np

    with artefact_file(directory, name).open("rb") as fh, np.load(fh, allow_pickle=False) as payload:
        return {key: payload[key] for key in payload.files if keys is None or key in keys}


def read_json(directory: Path, name: str) -> Any:
    """A JSON file of a finished, intact artefact."""
    return json.loads(artefact_file(directory, name).read_text())


def read_record(directory: Path, name: str, kind: type[R]) -> R:
    """A record (:mod:`records`) in a JSON file of a finished, intact artefact."""
    path = as_path(directory) / name
    try:
        return kind.from_dict(read_json(directory, name), str(path))
    except RecordError as exc:
        raise cache_schema.StoreError(f"{exc}; {_fix_hint(directory, None, force=True)}") from None


def artefact_state(directory: Path) -> str:
    """Complete once the manifest exists (it is written last) and every file has its size."""
    if (as_path(directory) / MANIFEST).exists() and artefact_problem(directory) is None:
        return COMPLETE
    return PARTIAL if as_path(directory).exists() else MISSING


def store_state(path: Path, key: str) -> str:
    """A Zarr store is complete when it says so for this key and its files are intact; else partial."""
    return MISSING if not as_path(path).exists() else (COMPLETE if store_problem(path, key) is None else PARTIAL)


def store_problem(path: Path, key: str) -> str | None:
    """Why the store at ``path`` is not a complete store of ``key`` (None when it is)."""
    try:
        store = cache_schema.open_feature_store(path)
    except cache_schema.StoreError as exc:
        return str(exc)
    if store.key != key:
        return f"{path} was made for another key"
    if not store.complete:
        pending = store.pending_shards()
        return f"{path} is not complete ({store.layout.n_shards - len(pending)} of {store.layout.n_shards} shards written)"
    return None


def begin_artefact(directory: Path) -> None:
    """Create the artefact directory and drop any old manifest, so a crash leaves it incomplete."""
    directory = as_path(directory)
    storage.make_dirs(directory)
    (directory / MANIFEST).unlink(missing_ok=True)
    remove_partials(directory)


# -- what the cache keeps -----------------------------------------------------------------------


def _tree_size(path: Path) -> int:
    return sum(storage.file_sizes(path).values())


def unreachable(cache_root: Path, roots: set[str]) -> list[tuple[Path, int]]:
    """(path, bytes) of every store and artefact of the cache that no key in ``roots`` reaches
    through the inputs its manifest or its store attrs name. Outputs whose key lock is held
    (a stage is writing or reading them) are never listed, nor unfinished ones while any stage
    of this cache runs (their key is not known yet)."""
    made: dict[str, tuple[Path, list[str]]] = {}
    for path in cache_schema.list_stores(cache_root):
        try:
            attrs = cache_schema.open_feature_store(path, verify=False).attrs
        except cache_schema.StoreError:
            made[f"unreadable:{path}"] = (path, [])  # unreadable: nothing can reach it
            continue
        made[attrs.key] = (path, attrs.inputs)
    for path in cache_schema.list_artefacts(cache_root):
        try:
            manifest = read_manifest(path)
        except cache_schema.StoreError:
            manifest = None
        key = manifest.key if manifest is not None and manifest.key else f"unfinished:{path}"
        made[key] = (path, manifest.inputs if manifest is not None else [])
    reached, todo = set(), [key for key in roots if key in made]
    while todo:
        key = todo.pop()
        if key not in reached:
            reached.add(key)
            todo.extend(k for k in made[key][1] if k in made)
    busy = any(lock_held(lock) for lock in (as_path(cache_root) / "locks").glob("*.lock"))
    garbage = []
    for key, (path, _) in sorted(made.items(), key=lambda item: str(item[1][0])):
        unfinished = key.startswith(("unfinished:", "unreadable:"))
        if key in reached or (unfinished and busy) or (not unfinished and lock_held(cache_schema.lock_path(cache_root, key))):
            continue
        garbage.append((path, _tree_size(path)))
    return garbage


def stage_lock(path: Path, wait: bool = True, on_wait=None, shared: bool = False):
    """``with stage_lock(path): …``: the :class:`locks.Lock` of ``path`` taken (a flock, or a
    lease on object storage), exclusive, or ``shared`` while a stage reads what it guards."""
    return lock_at(path, shared).taken(wait, on_wait)


# -- the stage contract -------------------------------------------------------------------------


class Stage(ABC):
    """One unit of cached work: ``params`` and ``inputs`` give the key, ``output`` the artefact.

    A constructor does no disk IO: upstream stages are held as stages, and their keys (and the
    stores they make) are only read when needed, so a whole study graph is known before anything
    runs. ``label`` says what this stage's configuration changes relative to its preset; it goes
    into the manifest, not into the key.
    """

    name: str
    version: int
    label: str = ""
    recorded_as = "input"  # what a study record calls it when it is not a result ("fit": drawn by Fig. 3)
    remade_in_place = False  # remade under the same key (a re-extraction), so nothing downstream reruns

    def __init__(self, cache_root: Path):
        self.cache_root = as_path(cache_root)
        self.held: tuple[Lock, ...] = ()  # the locks the runner took for this run (see run_group), checked before publishing

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Every parameter that changes the output."""

    def upstream(self) -> dict[str, Stage]:
        """The stages whose outputs this one reads, by role."""
        return {}

    def inputs(self) -> list[str]:
        """Upstream keys or content fingerprints."""
        return [stage.key for stage in self.upstream().values()]

    @cached_property
    def key(self) -> str:
        return stage_key(self.name, self.version, self.params(), self.inputs())

    def config(self) -> dict[str, Any]:
        """The fully resolved configuration: this stage's parameters and, by role, those of every
        stage upstream. Unlike the key it names no content hash, so equal settings read equal."""
        return {"stage": self.name, "params": self.params(), "inputs": {role: s.config() for role, s in self.upstream().items()}}

    def manifest(self, started: float, **about: Any) -> Manifest:
        """What every manifest holds: key, parameters, inputs, resolved configuration, its
        experiment id and label, timings, versions; ``about``: the fields of :class:`Manifest`
        that say what the output is (dataset, method, code_dim …)."""
        config = self.config()
        finished = time.time()
        return Manifest(**{"key": self.key, "stage": self.name, "stage_version": self.version, "params": self.params(),
                           "inputs": self.inputs(), "config": config, "experiment": experiment_id(config), "label": self.label,
                           "started": started, "finished": finished, "seconds": finished - started, "versions": package_versions(),
                           **about})

    def publish(self, started: float, files: dict[str, Any], **about: Any) -> Manifest:
        """Save this stage's artefact, the one way every stage does: each of ``files`` (a record
        as JSON, a dict of arrays as ``.npz``, bytes as they are), then the manifest, last.
        ``about``: what the output is (see :meth:`manifest`). Files written while computing
        (a log, resumable chunks) stay; they are listed in the manifest too."""
        begin_artefact(self.output)
        for name, content in files.items():
            path = self.output / name
            if isinstance(content, Record):
                atomic_write_text(path, json.dumps(content.to_dict(), indent=1))
            elif isinstance(content, dict):
                atomic_write_npz(path, content)
            else:
                atomic_write_bytes(path, content)
        manifest = self.manifest(started, **about)
        write_manifest(self.output, manifest, held=self.held)
        return manifest

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

    def group_key(self) -> tuple | None:
        """Stages with equal group keys may run together in one :meth:`execute_group` (they read
        the same inputs on the same schedule); None: this stage runs alone."""
        return None

    @classmethod
    def execute_group(cls, stages: list[Stage], force: bool) -> list[Any]:
        """Do the work of ``stages`` (equal group keys) together; each writes its own output, and
        the result of each is what its :meth:`execute` gives alone."""
        return [stage.execute(force) for stage in stages]

    def stale_reason(self) -> str | None:
        """Why an output made from other inputs exists in place of this one's (None: none does)."""
        return None

    def note(self) -> str:
        """Why the output is not complete, when that can be told (shown by ``status``)."""
        out = self.output
        if not out.exists():
            return ""
        problem = store_problem(out, self.key) if out.suffix == ".zarr" else artefact_problem(out)
        return problem or ""


class Artefact(Stage):
    """A finished artefact given by its folder (e.g. ``probe --reducer <artefact>``): an input
    whose key, method and configuration come from its manifest."""

    def __init__(self, directory: Path):
        super().__init__(as_path(directory).parents[2])
        self.directory = as_path(directory)

    @cached_property
    def _manifest(self) -> Manifest:
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise cache_schema.StoreError(f"{self.directory}: no manifest, so the run that makes it did not finish; "
                                          "run its stage (again) first")
        return manifest

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._manifest.stage

    @property
    def version(self) -> int:  # type: ignore[override]
        return self._manifest.stage_version

    @property
    def method(self) -> str | None:
        return self._manifest.method

    @cached_property
    def key(self) -> str:
        return self._manifest.key

    def params(self) -> dict[str, Any]:
        return self._manifest.params

    def config(self) -> dict[str, Any]:
        return self._manifest.config or {"stage": self.name, "params": self.params(), "artefact": str(self.directory)}

    @property
    def output(self) -> Path:
        return self.directory

    def state(self) -> str:
        return artefact_state(self.directory)

    def execute(self, force: bool) -> Any:
        raise cache_schema.StoreError(f"{self.directory} was given as a finished artefact; it is not recomputed here")


@dataclass
class RunResult:
    stage: Stage
    skipped: bool
    seconds: float
    detail: Any = None


def run_stage(stage: Stage, force: bool = False, wait: bool = True, on_wait=None) -> RunResult:
    """Skip a complete stage; otherwise run it under the lock of its key, holding a shared lock
    on every upstream feature store it reads, so that no rewrite of one can run under it."""
    return run_group([stage], force, wait, on_wait)[0]


def run_group(stages: list[Stage], force: bool = False, wait: bool = True, on_wait=None) -> list[RunResult]:
    """:func:`run_stage` for stages of one group key: the complete ones are skipped, the others
    run in one :meth:`Stage.execute_group` under all their locks (taken in key order, so two
    runs of overlapping groups cannot deadlock). A group killed before it finished publishes no
    member that had not finished; the next run redoes only those."""
    start = time.perf_counter()
    skipped = {id(s): RunResult(s, True, 0.0) for s in stages if not force and s.state() == COMPLETE}
    todo = sorted((s for s in stages if id(s) not in skipped), key=lambda s: s.key)
    done: dict[int, RunResult] = {}
    if todo:
        with ExitStack() as held:
            take = lambda key, root, shared=False: held.enter_context(  # noqa: E731
                stage_lock(cache_schema.lock_path(root, key), wait=wait, on_wait=on_wait, shared=shared))
            locks = [take(stage.key, stage.cache_root) for stage in todo]
            # Whoever held a lock before us may have finished the same work.
            for stage in [s for s in todo if not force and s.state() == COMPLETE]:
                skipped[id(stage)] = RunResult(stage, True, time.perf_counter() - start)
            todo = [s for s in todo if id(s) not in skipped]
            read = {up.key: up for stage in todo for up in stage.upstream().values() if up.output.suffix == ".zarr"}
            locks += [take(key, read[key].cache_root, shared=True) for key in sorted(read)]
            for stage in todo:
                stage.held = tuple(locks)
            try:
                details = type(todo[0]).execute_group(todo, force) if todo else []
            finally:
                for stage in todo:
                    stage.held = ()
            seconds = time.perf_counter() - start
            done = {id(stage): RunResult(stage, False, seconds, detail) for stage, detail in zip(todo, details)}
    return [skipped.get(id(s)) or done[id(s)] for s in stages]
