"""Typed records: what a stage writes about its output, and what later stages, figures and
``status`` read back.

Each record is a frozen dataclass with ``from_dict`` / ``to_dict`` (zarr v3's metadata classes
are the model). ``from_dict`` checks every field against its annotation, so a damaged or
hostile file is a :class:`RecordError` that names the field, never a ``KeyError`` later; and
it refuses fields it does not know. All records share one :data:`RECORD_VERSION`; files
written before typed records existed (version 1, no ``record_version``) are read through
:func:`upgraded`, the one place that knows their shapes.

=================  =======================================  ==================================
record             file                                     written by
=================  =======================================  ==================================
:class:`Manifest`  ``artefacts/<stage>/<name>/manifest.json``  every artefact stage, last
:class:`StoreAttrs` a feature store's Zarr attributes        extract, reduce (projected stores)
:class:`EvalResult` ``metrics.json`` of an artefact          probe, train, import-stego, hierarchy
:class:`ResultRow`  one row of ``results.csv``               figures (from the above)
:class:`StudyRecord` ``studies/<study>/experiments/<id>.json`` study
=================  =======================================  ==================================

An evaluation row keeps its flat on-disk form (``"cluster/mIoU"``, as STEGO logs it):
:class:`StepScores` reads it into probes and their :class:`Scores`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .config import conforms, type_name

RECORD_VERSION = 2  # 1: written before typed records (no "record_version" field)
VERSION_FIELD = "record_version"

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A file whose content does not have its record's shape."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def without_seeds(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved configuration without its run seeds: those of every stage after extraction (an
    extraction's seed is its random backbone's)."""
    params = config.get("params", {})
    if config.get("stage") != "extract":
        params = {k: v for k, v in params.items() if k != "seed"}
    return {**config, "params": params, "inputs": {role: without_seeds(up) for role, up in config.get("inputs", {}).items()}}


def experiment_id(config: dict[str, Any]) -> str:
    """sha256 of a resolved configuration without its run seeds: results of one experiment id
    differ only by seed, so only they are averaged."""
    return hashlib.sha256(canonical_json(without_seeds(config)).encode()).hexdigest()


# -- the machinery ------------------------------------------------------------------------------


class Record:
    """Base of the records: fields declared once, checked when read, written back as they are.
    ``versioned`` records carry :data:`RECORD_VERSION`; their nested parts do not."""

    versioned: ClassVar[bool] = True

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "") -> R:
        """The record in ``data`` (parsed JSON); RecordError naming ``where`` and the field
        when it does not have this shape."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise RecordError(f"{where}: a {cls.__name__} is a mapping, not {type(data).__name__}")
        if cls.versioned:
            data = upgraded(cls, data, where)
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecordError(f"{where}: a {cls.__name__} has no field {unknown[0]!r}")
        hints, values = _hints(cls), {}
        for name, spec in known.items():
            if name in data:
                values[name] = _parsed(data[name], hints[name], f"{where}: {name}")
            elif spec.default is MISSING and spec.default_factory is MISSING:
                raise RecordError(f"{where}: {name} is missing")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form that :meth:`from_dict` reads back equal (``None`` fields left out)."""
        out = {VERSION_FIELD: RECORD_VERSION} if self.versioned else {}
        for spec in fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            if value is not None:
                out[spec.name] = _dumped(value)
        return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolved once per class: stores read their attributes often


def _record_type(hint: Any) -> type[Record] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Record) else None


def _parsed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint``; nested records (alone, optional, in a list or a dict)
    are built with their own ``from_dict``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if (kind := _record_type(hint)) is not None:
        return kind.from_dict(value, where)
    if origin in (typing.Union, types.UnionType) and any(_record_type(a) for a in args):
        return None if value is None else _parsed(value, next(a for a in args if _record_type(a)), where)
    if origin is list and args and _record_type(args[0]):
        if not isinstance(value, list):
            raise RecordError(f"{where}: {value!r:.80} is not a list")
        return [args[0].from_dict(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and args and _record_type(args[1]):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: {value!r:.80} is not a mapping")
        return {str(k): args[1].from_dict(v, f"{where}[{k!r}]") for k, v in value.items()}
    if not conforms(value, hint):
        raise RecordError(f"{where}: {value!r:.80} ({type(value).__name__}), expected {type_name(hint)}")
    return value


def _dumped(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_dumped(v) for v in value]
    if isinstance(value, dict):
        return {k: _dumped(v) for k, v in value.items()}
    return value


# -- manifests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry(Record):
    """One file of an artefact, as its manifest lists it."""

    versioned: ClassVar[bool] = False
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest(Record):
    """What a finished artefact is: written last, so no manifest means not done.

    The first group is every stage's (key, parameters, inputs, resolved configuration, timings,
    versions, the files with size and sha256); the second says what the output is, where the
    stage knows it."""

    key: str
    stage: str
    stage_version: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    experiment: str = ""  # experiment_id(config): results that differ only by seed share it
    label: str = ""  # what the configuration changes relative to its preset
    started: float = 0.0
    finished: float = 0.0
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    dataset: str | None = None
    method: str | None = None  # the registry's name of what was fitted or trained
    code_dim: int | None = None
    seed: int | None = None
    reducer_class: str | None = None  # the registry's name of the class that reads the payload
    reducer: dict[str, Any] | None = None  # its parameters (JSON)
    store: str | None = None  # the feature store it read
    checkpoint: str | None = None  # import-stego: the released checkpoint
    resident: bool | None = None  # a head: its train tokens were held on the device
    studies: list[str] | None = None  # figures: the studies drawn

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Manifest:
        manifest = super().from_dict(data, where)
        for name in manifest.files:
            if name.startswith("/") or ".." in name.split("/"):
                raise RecordError(f"{where or 'Manifest'}: it lists {name!r}, outside its folder")
        return manifest


# -- feature store attributes -----------------------------------------------------------------


@dataclass(frozen=True)
class SkippedSample(Record):
    versioned: ClassVar[bool] = False
    id: str
    reason: str


@dataclass(frozen=True)
class StoreAttrs(Record):
    """The attributes of a feature store (extracted, or projected by a reducer). ``status`` is
    the one that changes after creation (writing → complete)."""

    key: str
    stage: str
    schema_version: int = 0  # the store layout's (cache_schema.SCHEMA_VERSION, set at creation), not the record's
    stage_version: int = 1
    params: dict[str, Any] = field(default_factory=dict)  # the stage's key parameters
    inputs: list[str] = field(default_factory=list)
    status: str = "writing"
    pixels: list[int] = field(default_factory=list)
    checksums: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    split: str | None = None
    extraction: dict[str, Any] | None = None  # extract: its full parameters (data root, device, …)
    dataset_root: str | None = None
    class_names: list[str] | None = None
    skipped: list[SkippedSample] = field(default_factory=list)  # samples left out (--skip-bad)
    bad_samples_checked: bool = False  # every sample was decoded once before the rows were laid out
    pretrained: bool | None = None
    started: float | None = None
    extracted_with: dict[str, str] | None = None  # device and decoder (not in the key)
    source_store: str | None = None  # a projected store: the store it projects
    method: str | None = None  # a projected store: the method of the fit that projects it

    def extracted_arrays(self) -> ExtractedArrays | None:
        """What an extraction's key parameters say its arrays are (None for a projected store)."""
        p = self.params
        if "res" not in p:
            return None
        return ExtractedArrays(p["res"], p["backbone"]["patch_size"], p["backbone"]["embed_dim"], bool(p.get("store_images")),
                               bool(p.get("flip")), bool(p.get("attention")))


@dataclass(frozen=True)
class ExtractedArrays:
    """The arrays an extraction writes, as its key parameters give them: tokens of a
    ``grid × grid × width`` grid (``res // patch``), and the optional arrays it was asked for."""

    res: int
    patch: int
    width: int
    images: bool
    flip: bool
    attention: bool

    @property
    def grid(self) -> int:
        return self.res // self.patch


# -- evaluations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores(Record):
    """One probe's scores over the val split, in %."""

    versioned: ClassVar[bool] = False
    mIoU: float
    Accuracy: float
    per_class_iou: list[float] | None = None
    per_class_precision: list[float] | None = None
    per_class_recall: list[float] | None = None
    assignment: list[int] | None = None  # cluster → class (the probe's mapping)


@dataclass(frozen=True)
class StepScores(Record):
    """One validation: every probe's :class:`Scores` and the losses at ``step``. On disk it is
    one flat row, ``{"step": 300, "cluster/mIoU": 41.2, …, "loss_linear": 0.7}``."""

    versioned: ClassVar[bool] = False
    step: int | None
    probes: dict[str, Scores]
    losses: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> StepScores:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise RecordError(f"{where}: a validation row is a mapping, not {type(data).__name__}")
        nested: dict[str, dict[str, Any]] = {}
        for name, value in data.items():
            if "/" in name:
                probe, metric = name.split("/", 1)
                nested.setdefault(probe, {})[metric] = value
        losses = {k: v for k, v in data.items() if "/" not in k and k != "step"}
        return super().from_dict({"step": data.get("step"), "probes": nested, "losses": losses}, where)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {} if self.step is None else {"step": self.step}
        for probe, scores in self.probes.items():
            row |= {f"{probe}/{k}": v for k, v in scores.to_dict().items()}
        return row | self.losses

    def score(self, probe: str, metric: str) -> float:
        """``metric`` (``mIoU`` or ``Accuracy``) of ``probe``; NaN when this row has no such probe."""
        scores = self.probes.get(probe)
        return math.nan if scores is None else getattr(scores, metric)


@dataclass(frozen=True)
class LevelScores(Record):
    """One level of a cluster hierarchy: its cluster count and its scores under each mapping."""

    versioned: ClassVar[bool] = False
    level: int
    clusters: int
    errors: Scores
    many_to_one: Scores


@dataclass(frozen=True)
class EvalResult(Record):
    """``metrics.json``, one shape for every evaluator: the validation step kept (``best``, by
    cluster mIoU) with and without the CRF, the last one, the history, or a hierarchy's levels."""

    best: StepScores | None = None
    best_crf: StepScores | None = None
    final: StepScores | None = None
    history: list[StepScores] = field(default_factory=list)
    levels: list[LevelScores] = field(default_factory=list)
    n_classes: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None  # import-stego: the released checkpoint's settings

    @classmethod
    def of_training(cls, history: list[dict[str, Any]], best: dict[str, Any], best_crf: dict[str, Any] | None,
                    seconds: dict[str, float], n_classes: int | None = None) -> EvalResult:
        """A training's result from its validation rows: every one, the best (± CRF) and the last."""
        rows = [StepScores.from_dict(row) for row in history]
        return cls(best=StepScores.from_dict(best), best_crf=None if best_crf is None else StepScores.from_dict(best_crf),
                   final=rows[-1], history=rows, n_classes=n_classes, seconds=seconds)

    def kept(self) -> list[tuple[str, StepScores]]:
        """The reported validations, with whether the CRF refined them: (``no``, best), (``yes``, best_crf)."""
        return [(crf, row) for crf, row in (("no", self.best), ("yes", self.best_crf)) if row is not None]


@dataclass(frozen=True)
class MaskSummary(Record):
    """``metrics.json`` of PriMaPs' mask proposals."""

    images: int
    masks_per_image: float
    images_without_masks: int


@dataclass(frozen=True)
class ClusterbookSummary(Record):
    """``metrics.json`` of CAUSE's clusterbook (the ``cause-mediator`` stage)."""

    clusters: int
    channels: int
    steps: int
    losses: list[float]  # the modularity loss every 10 steps, and at the last
    concepts_used: int  # distinct nearest concepts of the tokens of the first 64 train images


# -- studies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyNode(Record):
    """One stage of an experiment's graph: its key and output, and what it is in the study."""

    versioned: ClassVar[bool] = False
    key: str
    output: str  # relative to the cache root
    kind: str  # input (an artefact given by its folder), fit, or result
    stage: str = ""
    method: str | None = None
    dim: int | None = None
    seed: int | None = None
    result: bool = False
    label: str = ""
    headline: bool = False  # the method's Table 2 row
    family: str | None = None  # a ``future`` family, None for the paper's study


@dataclass(frozen=True)
class StudyRecord(Record):
    """What one experiment of a study declared: its preset, label, overrides and every node."""

    study: str
    experiment: str
    preset_sha256: str
    updated: float
    nodes: dict[str, StudyNode]
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None


@dataclass(frozen=True)
class ResultRow:
    """One result that figures and tables draw: an artefact's probe at one step, ± CRF."""

    FIELDS: ClassVar[tuple[str, ...]] = ("study", "dataset", "method", "label", "experiment", "family", "dim", "probe", "crf",
                                         "seed", "step", "mIoU", "Accuracy", "key")
    study: str
    dataset: str | None
    method: str
    label: str
    experiment: str
    family: str | None
    dim: int
    probe: str
    crf: str  # "yes" / "no"
    seed: int
    step: int | None
    mIoU: float
    Accuracy: float
    key: str
    stage: str
    headline: bool = False
    clusters: int | None = None  # hierarchy rows: the level's cluster count
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def csv_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


# -- old files ----------------------------------------------------------------------------------


def upgraded(cls: type[Record], data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` in the current shape of ``cls``: the one place that reads files written by an
    earlier stegoscope (version 1: before typed records). A newer version is refused."""
    version = data.get(VERSION_FIELD, 1)
    data = {k: v for k, v in data.items() if k != VERSION_FIELD}
    if version == RECORD_VERSION:
        return data
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise RecordError(f"{where}: record version {version!r}, this stegoscope reads up to {RECORD_VERSION}; "
                          "upgrade stegoscope to read it")
    if cls is Manifest:
        if "train_store" in data:  # reduce named the store it read so
            data["store"] = data.pop("train_store")
        for summary in ("images", "masks_per_image", "images_without_masks"):  # PriMaPs' masks: in metrics.json
            data.pop(summary, None)
        if data.get("stage") == "figures":  # figures' manifests had no key
            data.setdefault("key", "")
        config = data.get("config")
        if not data.get("experiment") and isinstance(data.get("key"), str):
            data["experiment"] = experiment_id(config) if isinstance(config, dict) and config else data["key"]
    elif cls is StoreAttrs:  # "spec" held the key parameters, "params" an extraction's full ones
        extraction = data.pop("params", None)
        data["params"] = data.pop("spec", {})
        if isinstance(extraction, dict):
            data |= {"extraction": extraction, "dataset": extraction.get("dataset"), "split": extraction.get("split")}
    elif cls is StudyRecord and isinstance(data.get("nodes"), dict):  # nodes said only whether they were results
        data["nodes"] = {name: {"kind": "result" if node.get("result") else "fit", **node} if isinstance(node, dict) else node
                         for name, node in data["nodes"].items()}
    elif cls is EvalResult and ("no_crf" in data or "crf" in data):  # import-stego: one evaluation, ± CRF
        data["best"], data["best_crf"] = data.pop("no_crf", None), data.pop("crf", None)
    return data
