"""The on-disk contract of the cache: every path, array name, dtype and chunk layout.

No other module builds a cache path or names an array; they ask this one.

Layout under a cache root (a local folder or a URL, see :mod:`storage`)::

    features/<dataset>-<split>-<backbone>-<res>-<key12>.zarr/   one Zarr v3 group per extraction
    datasets/<name>/                                            generated datasets (synthetic)
    memo/                                                       memoised file hashes
    locks/<key>.lock                                            one lock per running stage key
    artefacts/<stage>/<name>-<key12>/                           later stages (manifest + payload)
    derived/<store>-by-<key12>.zarr                             stores projected by a reducer (h-NNE)
    studies/<preset>/experiments/<id>.json                      what each experiment of a study declared
    figures/<study>/                                            figures and tables drawn from those

A feature store holds, along a shared ``image`` axis that is cut into shards:

========  =========  =============================  ========================================
array     dtype      dims                           content
========  =========  =============================  ========================================
tokens    float16    (image, y, x, channel)         last block after the final LayerNorm, no CLS
tokens_flip float16  (image, y, x, channel)         the mirrored image's tokens, mirrored back (--flip)
pooled    float32    (image, channel)               mean of the patch tokens (kNN descriptor)
labels    int16      (image, pixel_y, pixel_x)      class ids at input resolution, -1 = ignore
images    uint8      (image, pixel_y, pixel_x, rgb) preprocessed pixels (val splits)
ids       string     (image,)                       source id of each row
written   bool       (shard,)                       shard complete (resume)
========  =========  =============================  ========================================

Completion is marked in three steps, each safe to be killed after: ``status=complete`` in the
attrs, consolidated metadata, and last ``inventory.json`` (every file's size). A store is
complete only with all three; opening a complete store checks the inventory, so a chunk file
that went missing or was truncated is named instead of being read as fill values.

Tokens live at patch resolution (``y, x``) and labels / images at pixel resolution
(``pixel_y, pixel_x``): distinct dimension names keep ``xarray.open_zarr`` consistent.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .atomic import PARTIAL_SUFFIX, atomic_write_bytes, atomic_write_text, fsync_paths, fsync_tree, remove_partials
from .locks import Lock, check_held
from .profiling import NULL_CLOCK
from .raw_shards import ShardLayout
from .records import RecordError, StoreAttrs, StudyRecord
from .storage import as_path, file_sizes, is_remote, read_npy, stamp, zarr_options

# Our own files beside a store's arrays (sources.json, inventory.json) are not zarr's business.
# zarr warns about each whenever a group's members are listed, from its event-loop thread, where
# a catch_warnings around our call does not reach: hence a filter for that message alone.
warnings.filterwarnings("ignore", category=UserWarning, message=r"Object at \S+\.json is not recognized as a component of a Zarr")

SCHEMA_VERSION = 1

TOKENS, POOLED, LABELS, IMAGES, IDS, WRITTEN = "tokens", "pooled", "labels", "images", "ids", "written"
TOKENS_FLIP = "tokens_flip"  # tokens of the horizontally mirrored image, mirrored back (flip TTA)
ATTENTION = "attention_neighbours"  # HP's local-positive weights: (image, y, x, 9) from the last block's attention
IGNORE_LABEL = -1

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

DEFAULT_SHARD_IMAGES = 128
CHUNK_BYTES = 16 << 20  # dask chunk of tokens for streamed analyses

# fp16 tokens barely compress (zstd + shuffle <= 8 % smaller, 3-5x slower writes): store them raw.
# Labels and pixels compress well and cheaply.
_PIXEL_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
# Every chunk carries a crc32c of its bytes, verified on every read (stores made before checksums have none).
CHECKSUM = "crc32c"


class StoreError(RuntimeError):
    """A store on disk is not what its attributes claim, or not a stegoscope store at all."""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)


def feature_store_path(cache_root: Path, dataset: str, split: str, backbone: str, res: int, key: str) -> Path:
    name = f"{_slug(dataset)}-{_slug(split)}-{_slug(backbone)}-{res}-{key[:12]}.zarr"
    return as_path(cache_root) / "features" / name


def sibling_stores(path: Path) -> list[Path]:
    """Other stores of the same dataset, split, backbone and resolution (other keys)."""
    path = as_path(path)
    prefix = path.name[: -len("-" + path.name.rsplit("-", 1)[1])]
    return sorted(p for p in path.parent.glob(f"{prefix}-*.zarr") if p != path and p.name.rsplit("-", 1)[0] == prefix)


def write_sources(path: Path, rows: list[list]) -> None:
    atomic_write_text(as_path(path) / SOURCES, json.dumps(rows))


def read_sources(path: Path) -> list[list] | None:
    try:
        return json.loads((as_path(path) / SOURCES).read_text())
    except (FileNotFoundError, ValueError):
        return None


# -- which command makes what: the one table ------------------------------------------------------

# stage name → the command that makes its output (train-<head> → train --method <head>; else its own
# name). Stages that only a study declares are remade by `study`.
COMMANDS = {"project": "reduce", "primaps-masks": "study", "cause-mediator": "study", "hierarchy": "study", "predictions": "study"}


def remake_command(stage: str, method: str | None = None) -> str:
    """The ``stegoscope`` command (without options) that makes the output of ``stage``, given by
    its name or its artefact folder (``train_stego``); ``method``: the method it fitted, if known."""
    stage = stage.replace("_", "-")
    if stage.startswith("train-"):
        return f"train --method {stage.removeprefix('train-')}"
    command = COMMANDS.get(stage, stage)
    return f"{command} --method {method}" if method and command == "reduce" else command


def force_command(path: Path) -> str:
    """The command that rebuilds the store at ``path`` from nothing: only its own split."""
    path = as_path(path)
    if path.parent.name == "derived":
        return f"the `stegoscope {remake_command('project')}` command that made it with --force"
    parts = path.name.split("-")  # <dataset>-<split>-<backbone>-<res>-<key12>.zarr; slugs hold no '-'
    split = f" --split {parts[1]}" if len(parts) == 5 else ""
    return f"`stegoscope {remake_command('extract')} --force{split}` (same preset and options)"


def derived_store_path(cache_root: Path, source: Path, reducer_key: str) -> Path:
    """A store of codes: ``source`` projected by the reducer ``reducer_key`` (e.g. h-NNE)."""
    return as_path(cache_root) / "derived" / f"{as_path(source).stem}-by-{reducer_key[:12]}.zarr"


def artefact_dir(cache_root: Path, stage: str, name: str, key: str) -> Path:
    """``<cache>/artefacts/<stage>/<name>-<key12>/``: manifest.json + payload (the folder of a
    stage is its name slugged: ``train-stego`` → ``train_stego``; :func:`remake_command` reads both)."""
    return as_path(cache_root) / "artefacts" / _slug(stage) / f"{_slug(name)}-{key[:12]}"


PAYLOAD = "payload.npz"  # an artefact's arrays (a reducer's fitted state, kNN rows)
MANIFEST = "manifest.json"  # written last: no manifest = not done
METRICS = "metrics.json"  # every validation of a probe or head, the best step, ± CRF
PROBES = "probes.pt"  # the best and final probes' weights
FINAL = "final.npz"  # a head's last state (payload.npz holds the best-by-val one)
LOG = "log.jsonl"  # a head's training log
NNS = "nns"  # the kNN artefact's array: (image, rank) neighbour rows
INVENTORY = "inventory.json"  # a feature store's completion marker: relative path → bytes
DAMAGE = "damage.json"  # shards of a complete store found damaged (by a reader or `verify`): rewritten by `extract`
SOURCES = "sources.json"  # the dataset files an extraction read: [relative path, size, hash]
MASK_IDS = "mask_ids"  # PriMaPs' proposals: (image, pixel_y, pixel_x) uint8 ids, 255 = none, in .npy chunks


def mask_ids_path(directory: Path, chunk: int) -> Path:
    """One chunk file of a ``primaps-masks`` artefact."""
    return as_path(directory) / f"{MASK_IDS}-{chunk:05d}.npy"


class ChunkedRows:
    """Rows of an array kept as consecutive ``.npy`` chunks, memory-mapped (on object storage:
    read whole): ``rows[i]`` reads only the rows asked for (any order); ``np.asarray`` gives the
    whole array."""

    def __init__(self, paths: list[Path]):
        self.parts = [read_npy(p) for p in paths]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for p in np.unique(part):
            mine = part == p
            out[mine] = self.parts[p][rows[mine] - self.starts[p]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)


def load_mask_ids(directory: Path) -> ChunkedRows:
    """The (N, H, W) uint8 mask ids of a ``primaps-masks`` artefact, read lazily from its chunks."""
    chunks = sorted(as_path(directory).glob(f"{MASK_IDS}-*.npy"))
    if not chunks:
        raise StoreError(f"{directory}: no mask proposals; rerun the study (stage primaps-masks)")
    return ChunkedRows(chunks)


def study_dir(cache_root: Path, name: str) -> Path:
    """``<cache>/studies/<preset>/``: the results table of a study."""
    return as_path(cache_root) / "studies" / _slug(name)


def sibling_artefacts(directory: Path) -> list[Path]:
    """Other artefacts of the same stage and name (other keys) as ``directory``."""
    directory = as_path(directory)
    prefix = directory.name.rsplit("-", 1)[0]
    return sorted(p for p in directory.parent.glob(f"{prefix}-*") if p != directory and p.name.rsplit("-", 1)[0] == prefix)


def study_experiments_dir(cache_root: Path, study: str) -> Path:
    """``<cache>/studies/<study>/experiments/``: one record per experiment (its overrides) of a
    study: the artefacts of its results and fits."""
    return study_dir(cache_root, study) / "experiments"


def experiment_record_path(cache_root: Path, study: str, experiment: str) -> Path:
    return study_experiments_dir(cache_root, study) / f"{experiment}.json"


def read_study_record(path: Path) -> StudyRecord | None:
    """The experiment record at ``path`` (None when there is none); StoreError naming the file
    when it is damaged."""
    try:
        return StudyRecord.from_dict(json.loads(as_path(path).read_text()), str(path))
    except FileNotFoundError:
        return None
    except (ValueError, RecordError) as exc:
        raise StoreError(f"{path}: not an experiment record ({exc}); delete it and rerun the `stegoscope study` "
                         "command that wrote it") from None


def study_records(cache_root: Path, study: str) -> list[StudyRecord]:
    """Every experiment record of ``study``, in file name order."""
    return [read_study_record(p) for p in sorted(study_experiments_dir(cache_root, study).glob("*.json"))]


def list_studies(cache_root: Path) -> list[str]:
    """Studies with a record, by name."""
    return sorted(p.parent.name for p in (as_path(cache_root) / "studies").glob("*/experiments") if any(p.glob("*.json")))


def figures_dir(cache_root: Path) -> Path:
    return as_path(cache_root) / "figures"


def reports_dir(cache_root: Path) -> Path:
    return as_path(cache_root) / "reports"


def features_dir(cache_root: Path) -> Path:
    return as_path(cache_root) / "features"


def dataset_dir(cache_root: Path, name: str) -> Path:
    """Where a generated dataset is written. Its readers open local files, so beside a URL cache
    it goes to ``$XDG_CACHE_HOME/stegoscope`` (default ``~/.cache/stegoscope``)."""
    root = as_path(cache_root)
    if is_remote(root):
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stegoscope"
    return root / "datasets" / _slug(name)


def memo_path(cache_root: Path, name: str) -> Path:
    return as_path(cache_root) / "memo" / f"{_slug(name)}.json"


def lock_path(cache_root: Path, key: str) -> Path:
    return as_path(cache_root) / "locks" / f"{key}.lock"


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of one feature store. ``grid`` is the token grid, ``pixels`` the input size."""

    n_images: int
    grid: tuple[int, int]
    channels: int
    pixels: tuple[int, int]
    labelled: bool
    with_images: bool
    shard_images: int = DEFAULT_SHARD_IMAGES
    token_dtype: str = "float16"
    flip: bool = False
    attention: bool = False

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_images)

    def shard_slice(self, shard: int) -> slice:
        start = shard * self.shard_images
        return slice(start, min(start + self.shard_images, self.n_images))

    def array_bytes(self) -> dict[str, int]:
        """Uncompressed bytes of each array (tokens are stored raw; labels and images compress)."""
        n, (h, w), (ph, pw) = self.n_images, self.grid, self.pixels
        token = n * h * w * self.channels * np.dtype(self.token_dtype).itemsize
        out = {TOKENS: token, POOLED: n * self.channels * 4}
        out |= {TOKENS_FLIP: token} if self.flip else {}
        out |= {ATTENTION: n * h * w * 9 * 2} if self.attention else {}
        out |= {LABELS: n * ph * pw * 2} if self.labelled else {}
        out |= {IMAGES: n * ph * pw * 3} if self.with_images else {}
        return out


class CheckedArray:
    """A store array whose reads, when bytes on disk fail their checksum (or cannot be decoded),
    find the damaged shards, record them in the store and raise a StoreError that names the
    store, the array, the shards and the command that rewrites them. Otherwise a zarr array."""

    def __init__(self, store: FeatureStore, name: str):
        self.store, self.name, self.array = store, name, store.group[name]

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or attribute in ("store", "name", "array"):
            raise AttributeError(attribute)  # not set yet (unpickling): no delegation
        return getattr(self.array, attribute)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, selection) -> np.ndarray:
        rows = self.store.raw_rows(self.name, selection)
        if rows is not None:  # numpy's decoder, zarr's bytes (raw_shards)
            return self._read(lambda: self.store.read_rows(self.name, rows), selection)
        return self._read(lambda: self.array[selection], selection)

    def get_orthogonal_selection(self, selection) -> np.ndarray:
        return self._read(lambda: self.array.get_orthogonal_selection(selection), selection)

    def _read(self, read, selection):
        try:
            return read()
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception:
            shards = self._shards_of(selection)
            damaged = {shard: error for shard in shards if (error := self.store.checked_read(self.name, shard)) is not None}
            if not damaged:
                raise
            self.store.record_damage({f: "fails its checksum" for shard in damaged for f in self.store.shard_files(self.name, shard)})
            first = next(iter(damaged.values()))
            raise StoreError(
                f"{self.store.path}: {self.name} shard{'s' if len(damaged) > 1 else ''} {sorted(damaged)} "
                f"cannot be read back as written ({type(first).__name__}: {first}). The damage is recorded; "
                f"{self.store.fix_hint}: it rewrites only the damaged shards"
            ) from None

    def _shards_of(self, selection) -> list[int]:
        """The shards a read touched (along the image axis); every shard when that is unclear."""
        n_shards = self.store.layout.n_shards
        rows = selection[0] if isinstance(selection, tuple) and selection else selection
        if self.name == WRITTEN:
            return list(range(n_shards))
        size = self.store.layout.shard_images
        if isinstance(rows, slice):
            return sorted({r // size for r in range(*rows.indices(self.array.shape[0]))})
        if isinstance(rows, (int, np.integer, list, np.ndarray)):
            return sorted({int(r) // size for r in np.atleast_1d(rows)})
        return list(range(n_shards))


class StoreFiles:
    """A store's Zarr group and files: its attributes and layout, the raw shard files of its
    token arrays, and which of its files still match what was written (integrity)."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = as_path(path)
        self._raw_layouts: dict[str, ShardLayout | None] = {}

    # -- attributes ----------------------------------------------------------------------------
    @property
    def attrs(self) -> StoreAttrs:
        """The store's attributes, checked (read again on each call: ``status`` changes)."""
        try:
            return StoreAttrs.from_dict(self.group.attrs.asdict(), f"{self.path} (attributes)")
        except RecordError as exc:
            raise StoreError(f"{exc}; rerun {force_command(self.path)}") from None

    @property
    def key(self) -> str:
        return self.attrs.key

    @property
    def status(self) -> str:
        return self.attrs.status

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE and (self.path / INVENTORY).exists()

    @property
    def fix_hint(self) -> str:
        """The command that rebuilds this store."""
        attrs = self.attrs
        return f"rerun the `stegoscope {remake_command(attrs.stage, attrs.method)}` command that made it (or `study`)"

    @property
    def layout(self) -> StoreLayout:
        tokens = self.group[TOKENS]
        n, h, w, c = tokens.shape
        shard = tokens.shards[0] if tokens.shards else tokens.chunks[0]
        pixels = tuple(self.group[LABELS].shape[1:]) if LABELS in self.group else tuple(self.attrs.pixels)
        return StoreLayout(n, (h, w), c, pixels, LABELS in self.group, IMAGES in self.group, shard, str(tokens.dtype),
                           TOKENS_FLIP in self.group, ATTENTION in self.group)

    # -- shards --------------------------------------------------------------------------------
    def pending_shards(self) -> list[int]:
        """Shards whose ``written`` flag is not set; a partly written shard is rewritten whole."""
        return [int(i) for i in np.flatnonzero(~self.group[WRITTEN][:])]

    # -- whole shards of the raw token arrays, without zarr's per-chunk pipeline (raw_shards) -----
    def _raw_layout(self, name: str) -> ShardLayout | None:
        if name not in self._raw_layouts:
            self._raw_layouts[name] = ShardLayout.of(self.group[name])
        return self._raw_layouts[name]

    def _shard_path(self, name: str, shard: int) -> Path:
        return self.path / name / self._raw_layout(name).shard_key(shard)

    # -- integrity -----------------------------------------------------------------------------
    def damage(self) -> dict[str, str]:
        """Files of a complete store that no longer match its inventory, or whose shard failed its
        checksum when read (:meth:`record_damage`): relative path → what."""
        try:
            inventory = json.loads((self.path / INVENTORY).read_text())["files"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            return {INVENTORY: f"does not parse ({exc})"}
        damaged = {name: what for name, what in self.recorded_damage().items() if name in inventory}
        sizes = file_sizes(self.path)  # one listing (object storage: no request per file)
        for name, size in inventory.items():
            actual = sizes.get(name)
            if actual is None:
                damaged[name] = "missing"
            elif actual != size:
                damaged[name] = f"truncated or rewritten: {actual} bytes, {size} expected"
        return damaged

    def recorded_damage(self) -> dict[str, str]:
        """Chunk files of shards that failed their checksum when read: relative path → what."""
        try:
            return json.loads((self.path / DAMAGE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def record_damage(self, files: dict[str, str]) -> None:
        """Remember damaged chunk files, so that status shows them and `extract` rewrites them."""
        atomic_write_text(self.path / DAMAGE, json.dumps({**self.recorded_damage(), **files}, indent=1, sort_keys=True))

    def shard_files(self, name: str, shard: int) -> list[str]:
        """The chunk files of one shard of array ``name``, relative to the store."""
        return sorted(p.relative_to(self.path).as_posix() for p in (self.path / name / "c").glob(f"{shard}/**/*")
                      if p.is_file()) + ([f"{name}/c/{shard}"] if (self.path / name / "c" / str(shard)).is_file() else [])

    def scrub(self, progress=None) -> dict[str, str]:
        """Read every shard of every array, checking every checksum; record and return the
        chunk files of shards that fail (relative path → what). ``progress(n)`` counts shards."""
        found = {}
        for name in sorted(self.group.array_keys()):
            for shard in range(self.layout.n_shards):
                if self.checked_read(name, shard) is not None:
                    found.update(dict.fromkeys(self.shard_files(name, shard), "fails its checksum (verify)"))
                if progress is not None:
                    progress(1)
        if found:
            self.record_damage(found)
        return found

    def checked_read(self, name: str, shard: int) -> Exception | None:
        """The error reading one shard of array ``name`` raises (None when its bytes are good)."""
        sl = slice(shard, shard + 1) if name == WRITTEN else self.layout.shard_slice(shard)
        try:
            self.group[name][sl]
        except Exception as exc:  # zarr raises ValueError for checksums, others for unreadable bytes
            return exc
        return None


class StoreWriter(StoreFiles):
    """Writing a store: whole shards, made durable and flagged (group commit), completion, and
    reopening an unfinished or damaged store so that only what is missing is written again."""

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], commit: bool = True, clock=NULL_CLOCK) -> None:
        """Write every array of one shard; then, with ``commit``, make it durable and flag it
        (writers that batch several shards into one :meth:`commit` pass False). ``clock``: where
        the encoding (join, crc32c) and the writing go (``extract --profile``)."""
        sl = self.layout.shard_slice(shard)
        for name, value in arrays.items():
            expected = sl.stop - sl.start
            if len(value) != expected:
                raise ValueError(f"shard {shard} of {name}: {len(value)} rows, expected {expected}")
            raw = self._raw_layout(name)
            if raw is None:
                with clock.busy("write"):  # zarr encodes and writes in one call
                    self.group[name][sl] = value
                continue
            with clock.busy("encode"):
                data = raw.encode(value)
            path = self._shard_path(name, shard)
            with clock.busy("write"):
                if data is None:
                    path.unlink(missing_ok=True)  # all fill: zarr keeps no file
                else:
                    atomic_write_bytes(path, data, durable=False)  # commit() flushes it
        if commit:
            self.commit([shard])

    def commit(self, shards: list[int]) -> None:
        """Flush the files of written ``shards`` and the folders that name them to disk, then set
        and flush their ``written`` flags: after a power cut a flag is never found without its
        shard. One call for several shards costs one round of flushes (group commit)."""
        if not shards:
            return
        local = not is_remote(self.path)  # a PUT that returned is durable: nothing to flush
        arrays = [name for name in self.group.array_keys() if name != WRITTEN] if local else []
        fsync_paths([self.path / f for name in arrays for shard in shards for f in self.shard_files(name, shard)], self.path)
        for shard in shards:
            self.group[WRITTEN][shard] = True
        if local:
            fsync_paths([self.path / f for shard in shards for f in self.shard_files(WRITTEN, shard)], self.path)

    def mark_complete(self, held: Iterable[Lock] = ()) -> None:
        """Flush everything to disk, then mark complete; the inventory is written last.
        ``held``: the locks the run holds; if one was taken over, nothing is published."""
        pending = self.pending_shards()
        if pending:
            raise StoreError(f"{self.path}: shards {pending[:8]} are not written; cannot mark complete")
        check_held(held)
        (self.path / DAMAGE).unlink(missing_ok=True)  # every damaged shard was rewritten
        fsync_tree(self.path)
        self.group.attrs["status"] = STATUS_COMPLETE
        with warnings.catch_warnings():  # "not part of the v3 spec": xarray reads it all the same
            warnings.filterwarnings("ignore", category=UserWarning, message=".*[Cc]onsolidated metadata")
            zarr.consolidate_metadata(self.group.store)
        atomic_write_text(self.path / INVENTORY, json.dumps({"files": _file_sizes(self.path)}, sort_keys=True))

    def reopen_for_writing(self, owns=None) -> list[int]:
        """Prepare an unfinished or damaged store for the rest of its shards.

        Drops the temporaries of a killed writer and the completion marker, unflags damaged
        shards, and deletes every chunk file of every unflagged shard, so that each is written
        again from nothing (zarr would read a damaged shard file back before rewriting it).
        Returns the damaged shards. ``owns(shard)``: only those shards are touched (one of
        several processes writing the store; the others' shards may be in flight).
        """
        if owns is None:
            remove_partials(self.path)  # alone: every temporary is a killed writer's
        owns = owns or (lambda shard: True)
        damage = self.damage()
        shards_of = {name: shard_of(name) for name in damage}
        if None in shards_of.values():
            raise StoreError(f"{self.path}: metadata files {sorted(damage)} are damaged; rerun {force_command(self.path)}")
        shards = sorted(s for s in set(shards_of.values()) if owns(s))
        (self.path / INVENTORY).unlink(missing_ok=True)
        for shard in shards:
            self.group[WRITTEN][shard] = False
        if shards:
            self.group.attrs["status"] = STATUS_WRITING
        pending = {s for s in self.pending_shards() if owns(s)}
        for name in file_sizes(self.path):
            if not name.startswith(f"{WRITTEN}/") and shard_of(name) in pending:
                (self.path / name).unlink()  # with a killed writer's temporaries of those shards
        return shards


class FeatureStore(StoreWriter):
    """A Zarr v3 group of extracted tokens, read with checks (its attributes, writing and
    integrity checks are its bases'). Create with :func:`create_feature_store`,
    open with :func:`open_feature_store`."""

    # -- arrays --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> CheckedArray:
        """An array whose reads name the store, array and shard of bytes that fail their checksum."""
        return CheckedArray(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __len__(self) -> int:
        return self.group[TOKENS].shape[0]

    @property
    def ids(self) -> list[str]:
        return [str(s) for s in self.group[IDS][:]]

    def token_matrix(self, images: np.ndarray | None = None, images_per_chunk: int | None = None):
        """The tokens as a dask array (n_tokens, channel), chunked by whole images.

        ``images`` selects (sorted) image rows, e.g. a seeded subset. By default a chunk holds
        about 16 MiB of tokens, which bounds memory by (threads × a few chunks).
        """
        import dask.array as da

        tokens = self.group[TOKENS]
        n, h, w, c = tokens.shape
        if images_per_chunk is None:
            images_per_chunk = max(1, CHUNK_BYTES // (h * w * c * tokens.dtype.itemsize))
        inventory = self.path / INVENTORY
        # named by this store (its path, key and completion), so that one scan's results can be reused
        completed = stamp(inventory) if inventory.exists() else "writing"
        where = hashlib.sha256(str(self.path if is_remote(self.path) else self.path.resolve()).encode()).hexdigest()[:16]
        name = f"tokens-{where}-{self.key}-{completed}-{images_per_chunk}"
        x = da.from_array(self[TOKENS], chunks=(images_per_chunk, h, w, c), name=name, asarray=True, lock=False, fancy=False)
        if images is not None:
            x = x[np.sort(np.asarray(images))]
            x = x.rechunk((images_per_chunk, h, w, c))
        return x.reshape(-1, c)

    def raw_rows(self, name: str, selection) -> slice | None:
        """The rows of a selection (a step-1 slice of rows, all columns) of a raw array, which
        :meth:`read_rows` reads; None for other selections and arrays (zarr reads those)."""
        rows, rest = (selection[0], selection[1:]) if isinstance(selection, tuple) and selection else (selection, ())
        raw = self._raw_layout(name) if isinstance(rows, slice) else None
        if raw is None or len(rest) > len(raw.chunk_shape) or not all(
                isinstance(r, slice) and r.indices(n) == (0, n, 1) for r, n in zip(rest, raw.chunk_shape)):
            return None  # not whole rows (dask asks for whole rows as a tuple of full slices)
        start, stop, step = rows.indices(raw.rows)
        return slice(start, stop) if step == 1 and stop > start else None

    def read_rows(self, name: str, rows: slice) -> np.ndarray:
        """Rows of a raw array, each shard's index and the rows' bytes read and checked with numpy."""
        raw = self._raw_layout(name)
        size = raw.slots
        out = np.empty((rows.stop - rows.start, *raw.chunk_shape), raw.dtype)
        for shard in range(rows.start // size, -(-rows.stop // size)):
            lo, hi = max(rows.start, shard * size), min(rows.stop, (shard + 1) * size)
            part, path = out[lo - rows.start : hi - rows.start], self._shard_path(name, shard)
            try:
                raw.read(path, lo - shard * size, hi - shard * size, part)
            except FileNotFoundError:
                part[...] = 0  # zarr reads a missing shard as the fill value
        return out


def _file_sizes(path: Path) -> dict[str, int]:
    return {name: size for name, size in file_sizes(path).items()
            if name.rsplit("/", 1)[-1] not in (INVENTORY, DAMAGE) and not name.endswith(PARTIAL_SUFFIX)}


def shard_of(name: str) -> int | None:
    """The shard a chunk file belongs to (``<array>/c/<shard>/...``); None for metadata.

    Every array is chunked along ``image`` by whole shards (``written`` by one shard per
    chunk), so the first chunk coordinate is the shard index.
    """
    parts = name.split("/")
    return int(parts[2]) if len(parts) >= 3 and parts[1] == "c" and parts[2].isdigit() else None


def create_feature_store(path: Path, layout: StoreLayout, attrs: StoreAttrs, checksums: bool = True) -> FeatureStore:
    """Create an empty store (``status=writing``), replacing whatever was at ``path``. With
    ``checksums`` every chunk ends in a crc32c of its bytes, checked whenever it is read."""
    attrs = replace(attrs, schema_version=SCHEMA_VERSION, status=STATUS_WRITING, pixels=list(layout.pixels),
                    checksums=CHECKSUM if checksums else None)
    group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs.to_dict(), storage_options=zarr_options(path))
    crc = [Crc32cCodec()] if checksums else []
    n, s = layout.n_images, layout.shard_images
    (h, w), c, (ph, pw) = layout.grid, layout.channels, layout.pixels
    tokens = dict(shape=(n, h, w, c), dtype=layout.token_dtype, chunks=(1, h, w, c), shards=(s, h, w, c),
                  compressors=crc or None, fill_value=0, dimension_names=("image", "y", "x", "channel"))
    group.create_array(TOKENS, **tokens)
    if layout.flip:
        group.create_array(TOKENS_FLIP, **tokens)
    if layout.attention:
        group.create_array(ATTENTION, **{**tokens, "shape": (n, h, w, 9), "chunks": (1, h, w, 9), "shards": (s, h, w, 9),
                                         "dimension_names": ("image", "y", "x", "neighbour")})
    group.create_array(
        POOLED, shape=(n, c), dtype="float32", chunks=(s, c), compressors=crc or None, fill_value=0,
        dimension_names=("image", "channel"),
    )
    if layout.labelled:
        group.create_array(
            LABELS, shape=(n, ph, pw), dtype="int16", chunks=(1, ph, pw), shards=(s, ph, pw),
            compressors=[_PIXEL_CODEC, *crc], fill_value=IGNORE_LABEL, dimension_names=("image", "pixel_y", "pixel_x"),
        )
    if layout.with_images:
        group.create_array(
            IMAGES, shape=(n, ph, pw, 3), dtype="uint8", chunks=(1, ph, pw, 3), shards=(s, ph, pw, 3),
            compressors=[_PIXEL_CODEC, *crc], fill_value=0, dimension_names=("image", "pixel_y", "pixel_x", "rgb"),
        )
    group.create_array(IDS, shape=(n,), dtype=str, chunks=(s,), compressors=crc or "auto", dimension_names=("image",))
    group.create_array(
        WRITTEN, shape=(layout.n_shards,), dtype="bool", chunks=(1,), compressors=crc or None, fill_value=False,
        dimension_names=("shard",),
    )
    fsync_tree(path)  # its metadata survives a power cut, so that flushed shards can be resumed
    return FeatureStore(group, path)


def open_feature_store(path: Path, mode: str = "r", verify: bool = True) -> FeatureStore:
    """Open an existing store and check that it is one this version understands, that its
    arrays agree with each other and with its attrs, and (``verify``, complete stores) that no
    chunk file is missing or truncated."""
    path = as_path(path)
    if not path.exists():
        raise StoreError(f"{path}: no feature store here; run `stegoscope extract` first")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3, storage_options=zarr_options(path))
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise StoreError(f"{path}: not a readable Zarr v3 group ({exc}); rerun {force_command(path)}") from exc
    version = group.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version!r}, this stegoscope reads {SCHEMA_VERSION}; "
            f"rerun {force_command(path)}"
        )
    missing = [name for name in (TOKENS, POOLED, IDS, WRITTEN) if name not in group]
    if missing:
        raise StoreError(f"{path}: arrays {missing} are missing; rerun {force_command(path)}")
    store = FeatureStore(group, path)
    disagreement = _disagreement(store, store.attrs)
    if disagreement:
        raise StoreError(f"{path}: {disagreement}, so it cannot be trusted; rerun {force_command(path)}")
    if verify and store.complete:
        damage = store.damage()
        if damage:
            listed = "; ".join(f"{name} {what}" for name, what in sorted(damage.items())[:3])
            more = f" (and {len(damage) - 3} more)" if len(damage) > 3 else ""
            if any(shard_of(name) is None for name in damage):
                raise StoreError(f"{path}: {listed}{more}; metadata is damaged: rerun {force_command(path)}")
            raise StoreError(f"{path}: {listed}{more}; {store.fix_hint}: it rewrites only the damaged shards")
    return store


def _disagreement(store: FeatureStore, attrs: StoreAttrs) -> str | None:
    """How the arrays disagree with each other or with the attrs (None when they agree)."""
    group = store.group
    tokens = group[TOKENS]
    n, h, w, c = tokens.shape
    for name in (POOLED, IDS, LABELS, IMAGES, TOKENS_FLIP, ATTENTION):
        if name in group and group[name].shape[0] != n:
            return f"{name} has {group[name].shape[0]} rows but tokens has {n}"
    if TOKENS_FLIP in group and group[TOKENS_FLIP].shape != tokens.shape:
        return f"tokens_flip has shape {group[TOKENS_FLIP].shape}, tokens {tokens.shape}"
    if group[POOLED].shape[1] != c:
        return f"pooled has {group[POOLED].shape[1]} channels, tokens {c}"
    shard = tokens.shards[0] if tokens.shards else tokens.chunks[0]
    if group[WRITTEN].shape[0] != -(-n // shard):
        return f"written has {group[WRITTEN].shape[0]} flags for {-(-n // shard)} shards"
    pixels = tuple(attrs.pixels)
    for name in (LABELS, IMAGES):
        if name in group and tuple(group[name].shape[1:3]) != pixels:
            return f"{name} is {tuple(group[name].shape[1:3])} pixels, the attrs say {pixels}"
    extracted = attrs.extracted_arrays()
    if extracted is not None:  # an extraction store: the grid and width follow from res and the backbone
        e, grid = extracted, extracted.grid
        if (h, w, c) != (grid, grid, e.width):
            return f"tokens are {h}×{w}×{c} but the attrs say res {e.res}, patch {e.patch}, width {e.width} ({grid}×{grid}×{e.width})"
        for flag, name, said in ((e.images, IMAGES, "store_images"), (e.flip, TOKENS_FLIP, "flip"), (e.attention, ATTENTION, "attention")):
            if flag != (name in group):
                return f"the attrs say {said}={flag} but {name} is {'' if name in group else 'not '}there"
    return None


def open_complete_store(path: Path) -> FeatureStore:
    """A feature store that must be complete (else StoreError with the fix)."""
    store = open_feature_store(path)
    if not store.complete:
        raise StoreError(f"{path}: extraction is not complete; rerun `stegoscope extract` for it")
    return store


def resume_store(path: Path, key: str, owns=None) -> FeatureStore | None:
    """The store at ``path`` ready to continue writing for ``key`` (see
    :meth:`FeatureStore.reopen_for_writing`; ``owns``: the shards of this process), or None when
    there is nothing of that key to resume."""
    if not as_path(path).exists():
        return None
    try:
        store = open_feature_store(path, mode="r+", verify=False)
    except StoreError:
        return None  # remains of a crash before the metadata was written: start again
    if store.key != key:
        return None
    store.reopen_for_writing(owns)
    return store


def list_artefacts(cache_root: Path) -> list[Path]:
    """Every artefact folder of the cache (``artefacts/<stage>/<name>-<key12>``)."""
    return sorted(p for p in (as_path(cache_root) / "artefacts").glob("*/*") if p.is_dir())


def list_stores(cache_root: Path) -> list[Path]:
    """Every feature store of the cache: extracted, then derived (projected by a reducer)."""
    return list_feature_stores(cache_root) + sorted((as_path(cache_root) / "derived").glob("*.zarr"))


def list_feature_stores(cache_root: Path) -> list[Path]:
    root = features_dir(cache_root)
    return sorted(root.glob("*.zarr")) if root.exists() else []
