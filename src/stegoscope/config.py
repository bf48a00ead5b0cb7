"""Study presets: the whole protocol of a study, typed, read from YAML (``configs/*.yaml``,
``configs/paper/*.yaml``), with ``--set`` overrides and sweeps.

A preset declares the dataset and backbone, how each split is extracted, the methods and dims
of the sweep, each method's parameters (``reduce.<method>`` for reducers, ``<method>`` for heads,
with per-D overrides), the probes, the evaluation protocol, the seeds, where the work runs, and
optionally a ``sweep`` grid that expands it into several experiments. Any key can be overridden
by a dotted path: ``stego.lambda_rand=0.5``, ``reduce.pca.max_images=5000``,
``stego.per_dim.16.b_rand=0.3``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

import yaml

from . import methods as registry

PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # wheel installs (force-included)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # editable installs
CRF_WHERE = ("table2", "all", "none")
KEEP_PREDICTIONS = ("none", "headline", "all")
DEFAULT_HEAD_DIM = 70
CONFIG_STRUCTURE = {"params", "inputs"}  # levels of a stage's config tree, left out of labels
EXTRACT_KEYS = ("splits", "interpolation", "batch_size", "shard_images")  # live under ``extract:``
SECTIONS = {"probe", "eval", "train", "future", "reduce", "sweep"}  # checked by their own parsers
DATASET_FACTS = ("n_classes",)  # overrides that say what the data is: a preset's base() keeps them


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SplitConfig:
    """Extraction settings of one split."""

    res: int
    store_images: bool = False
    crop: str = "none"  # "five": five-crop 0.5 of the full-resolution image (STEGO's train splits)
    attention: bool = False  # HP's local-positive weights from the last block's attention (train)
    split: str | None = None  # the dataset split it reads (default: its name), e.g. a second train split for PriMaPs-EM
    # a fixed, seeded random fraction of the split's samples (crops), in their order: a declared deviation
    # that makes a second resolution affordable (CAUSE-TR's 320 px COCO crops: 610 GB whole, 152 GB at 0.25)
    fraction: float = 1.0
    fraction_seed: int = 0

    def __post_init__(self):
        if self.res < 1 or self.crop not in ("none", "five") or not 0 < self.fraction <= 1:
            raise ValueError(f"res must be positive, crop 'none' or 'five' and fraction in (0, 1]: {self}")


@dataclass(frozen=True)
class ProbeConfig:
    """Linear and cluster probes trained on frozen codes (paper Table 1, supplementary Table 1)."""

    steps: int = 5000
    batch_size: int = 16
    linear_lr: float = 5e-3
    cluster_lr: float = 5e-3

    def __post_init__(self):
        if min(self.steps, self.batch_size) < 1 or min(self.linear_lr, self.cluster_lr) <= 0:
            raise ValueError(f"steps, batch_size and the learning rates must be positive: {self}")


@dataclass(frozen=True)
class TrainConfig:
    """How a study trains its probes and heads. ``group``: the probes (and the heads) that read
    the same train store on the same batch schedule train together in one pass — every member
    bit for bit what it is alone; false runs each alone (``study --no-group``)."""

    group: bool = True

    def __post_init__(self):
        if not isinstance(self.group, bool):
            raise ValueError(f"train.group must be true or false, not {self.group!r}")


@dataclass(frozen=True)
class EvalConfig:
    """How every probe and head is evaluated on the val split.

    ``flip``: the val split is also extracted mirrored and the codes of both are averaged (flip
    TTA, as STEGO). ``crf``: where the dense CRF is added: ``table2`` (raw DINO and the heads at
    their headline D, as the paper's Table 2), ``all`` or ``none``. ``extra_clusters``: cluster
    probe with K + extra clusters; their pixels are dropped before matching [QUIRK, STEGO's], or
    counted as errors with ``extra_as_errors`` (every result also reports both other mappings:
    ``cluster_extra_as_errors/…`` and ``cluster_many_to_one/…``). ``clusterer``: the probes'
    cluster probe (``ops.kmeans.CLUSTERERS``; heads always train STEGO's cosine one). ``val_every``:
    validation interval in steps. ``keep_predictions``: which results keep their per-image
    predictions over val for ``stegoscope report`` (``headline``: the Table 2 rows, i.e. raw DINO
    and the heads at their headline D; ``all``; ``none``).
    """

    flip: bool = False
    crf: str = "table2"
    extra_clusters: int = 0
    extra_as_errors: bool = False
    val_every: int = 100
    clusterer: str = "cosine"
    keep_predictions: str = "headline"

    def __post_init__(self):
        if self.crf not in CRF_WHERE:
            raise ValueError(f"crf must be one of {CRF_WHERE}, not {self.crf!r}")
        if self.keep_predictions not in KEEP_PREDICTIONS:
            raise ValueError(f"keep_predictions must be one of {KEEP_PREDICTIONS}, not {self.keep_predictions!r}")
        from .ops.kmeans import CLUSTERERS

        if self.clusterer not in CLUSTERERS:
            raise ValueError(f"clusterer must be one of {', '.join(CLUSTERERS)}, not {self.clusterer!r}")
        if self.extra_clusters < 0 or self.val_every < 1:
            raise ValueError(f"extra_clusters must be ≥ 0 and val_every ≥ 1: {self}")


@dataclass(frozen=True)
class FutureConfig:
    """The paper's open questions (its §5 and supplementary §2) as experiments, run by
    ``stegoscope study <preset> --only future`` and drawn by ``figures``.

    ``clusterers``: cluster probes (``ops.kmeans.CLUSTERERS``) compared on the codes of
    ``clusterer_methods`` at every D. ``extra_clusters``: over-clustering with K' = K + each, probed
    on raw DINO; every result is evaluated three ways (Hungarian dropping the extra clusters, as
    STEGO [QUIRK]; Hungarian counting them as errors; many-to-one). ``hierarchy``: every level of
    h-NNE's partition hierarchy (its fit at the first D) as the clusterer, beside k-means on its
    codes. ``loss_grid``: dotted keys of a head's section → values: one head per grid point at
    every D (heatmaps over the first two keys).
    """

    clusterers: tuple[str, ...] = ()
    clusterer_methods: tuple[str, ...] = field(default_factory=lambda: tuple(registry.fig4_fits()))
    extra_clusters: tuple[int, ...] = ()
    hierarchy: bool = False
    loss_grid: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("clusterers", "clusterer_methods", "extra_clusters"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "loss_grid", {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in self.loss_grid.items()})
        from .ops.kmeans import CLUSTERERS

        unknown = [c for c in self.clusterers if c not in CLUSTERERS]
        if unknown:
            raise ValueError(f"clusterers {unknown} unknown; known: {', '.join(CLUSTERERS)}")
        if any(e < 0 for e in self.extra_clusters):
            raise ValueError(f"extra_clusters must be ≥ 0: {self.extra_clusters}")
        for method in self.clusterer_methods:
            registry.get(method)
        heads = {key.split(".")[0] for key in self.loss_grid}
        if any(registry.get(h).kind != registry.HEAD for h in heads) or len(heads) > 1:
            raise ValueError(f"loss_grid keys must be of one head's section (e.g. stego.lambda_rand), not {sorted(self.loss_grid)}")

    @property
    def families(self) -> list[str]:
        return [name for name, on in (("clusterers", self.clusterers), ("over-clustering", self.extra_clusters),
                                      ("hierarchy", self.hierarchy), ("loss-grid", self.loss_grid)) if on]


@dataclass(frozen=True)
class Preset:
    """A study preset, resolved: every section parsed and validated. Build with
    :meth:`from_dict` / :func:`load_preset`; derive variants with :meth:`with_overrides`."""

    name: str
    dataset: str
    backbone: str
    splits: dict[str, SplitConfig]
    data_root: str | None = None
    weights: str | None = None
    seed: int = 0  # of a random: backbone
    n_classes: int | None = None
    interpolation: str = "nearest"
    batch_size: int = 32
    shard_images: int = 128
    synthetic: dict[str, Any] = field(default_factory=dict)
    dims: tuple[int, ...] = ()  # the sweep's embedding dimensions
    methods: tuple[str, ...] | None = None  # None: every registered method
    seeds: tuple[int, ...] = (0,)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reduce: dict[str, Any] = field(default_factory=dict)  # reducer name → its parameters
    heads: dict[str, Any] = field(default_factory=dict)  # head name → its parameters
    head_dims: dict[str, int] = field(default_factory=dict)  # head name → its headline D (Table 2)
    per_dim: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # head → D → overrides
    scheduler: str = "threads"
    device: str = "auto"
    sweep: dict[str, tuple] = field(default_factory=dict)  # dotted path → values (a grid)
    future: FutureConfig = field(default_factory=FutureConfig)  # the paper's open questions
    path: Path | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False)  # the file's content
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted path → value, applied to it

    @classmethod
    def from_dict(cls, source: dict[str, Any], path: Path | None = None, overrides: dict[str, Any] | None = None) -> Preset:
        """Parse ``source`` (a preset file's content) with ``overrides`` applied."""
        overrides = dict(overrides or {})
        where = path or "preset"
        raw = copy.deepcopy(source)
        extract = raw.setdefault("extract", {}) or {}
        raw["extract"] = extract
        for key in EXTRACT_KEYS:  # one place for extraction settings, so overrides find them
            if key in raw:
                if key in extract:
                    raise ConfigError(f"{where}: {key} is given both at the top level and under extract; keep one")
                extract[key] = raw.pop(key)
        for key, value in overrides.items():
            set_path(raw, f"extract.{key}" if key.split(".")[0] in EXTRACT_KEYS else key, value, where)
        extract = dict(raw.pop("extract"))
        splits = extract.pop("splits", None)
        if not splits:
            raise ConfigError(f"{where}: extract.splits is missing (e.g. train: {{res: 224}})")
        twice = sorted(set(raw) & set(extract))
        if twice:
            raise ConfigError(f"{where}: {twice} given both at the top level and under extract; keep one")
        merged = {**raw, **extract}
        head_names = registry.names(registry.HEAD)
        known = {f.name for f in fields(cls)} - {"splits", "path", "source", "overrides", "heads", "head_dims", "per_dim"}
        unknown = sorted(set(merged) - known - set(head_names))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known | set(head_names))}")
        check_types(cls, {k: v for k, v in merged.items() if k in known - SECTIONS}, "", where)
        try:
            kwargs: dict[str, Any] = {k: v for k, v in merged.items() if k in known}
            kwargs["splits"] = {name: _section(SplitConfig, cfg, f"extract.splits.{name}", where) for name, cfg in splits.items()}
            kwargs["probe"] = _section(ProbeConfig, merged.get("probe"), "probe", where)
            kwargs["eval"] = _section(EvalConfig, merged.get("eval"), "eval", where)
            kwargs["train"] = _section(TrainConfig, merged.get("train"), "train", where)
            kwargs["future"] = _section(FutureConfig, merged.get("future"), "future", where)
            kwargs["reduce"] = _reducer_sections(merged.get("reduce") or {}, where)
            kwargs["heads"], kwargs["head_dims"], kwargs["per_dim"] = _head_sections(merged, where)
            for key in ("dims", "methods", "seeds"):
                if kwargs.get(key) is not None:
                    kwargs[key] = tuple(kwargs[key])
            kwargs["sweep"] = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in (merged.get("sweep") or {}).items()}
            preset = cls(path=path, source=copy.deepcopy(source), overrides=overrides, **kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{where}: {exc}") from exc
        return preset

    def __post_init__(self):
        if self.methods is None:
            object.__setattr__(self, "methods", tuple(registry.names()))
        for name in self.methods:
            registry.get(name)
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if "train" not in self.splits or "val" not in self.splits:
            raise ValueError(f"extract.splits needs a train and a val split, not {sorted(self.splits)}")

    # -- derived presets ------------------------------------------------------------------------
    def with_overrides(self, overrides: dict[str, Any]) -> Preset:
        """This preset's file with ``overrides`` (dotted path → value) applied over its own."""
        return Preset.from_dict(self.source, self.path, {**self.overrides, **overrides})

    def base(self) -> Preset:
        """The preset as its file declares it, without overrides, except those that say what the
        data is (``n_classes``), not what an experiment changes."""
        if not self.overrides:
            return self
        facts = {key: value for key, value in self.overrides.items() if key in DATASET_FACTS}
        return Preset.from_dict({**self.source, **facts}, self.path)

    def experiments(self, sweep: dict[str, tuple] | None = None) -> list[Preset]:
        """One preset per point of the sweep grid (the preset's ``sweep`` and ``sweep``), or itself."""
        grid = {**self.sweep, **(sweep or {})}
        if not grid:
            return [self]
        return [self.with_overrides(dict(zip(grid, values))) for values in itertools.product(*grid.values())]

    # -- what the stages are built from ----------------------------------------------------------
    def method_params(self, method: str, dim: int | None = None) -> Any:
        """The parameters of ``method`` (its section, or its defaults) at ``dim``."""
        spec = registry.get(method)
        if spec.kind == registry.HEAD:
            params = self.heads.get(method) or spec.params(**spec.with_defaults({}))
            return replace(params, **self.per_dim.get(method, {}).get(dim, {}))
        return self.reduce.get(method) or spec.params()

    def head_dim(self, method: str) -> int:
        """The headline D of a head, where Table 2 reports it: ``<head>.dim`` (default 70, STEGO's)."""
        return self.head_dims.get(method, DEFAULT_HEAD_DIM)

    def sweep_dims(self) -> list[int]:
        """``dims``, or else the headline D of each head."""
        heads = [m for m in self.methods if registry.get(m).kind == registry.HEAD]
        return list(self.dims) or sorted({self.head_dim(m) for m in heads}) or [DEFAULT_HEAD_DIM]

    def label(self) -> str:
        """What this preset changes relative to its file, e.g. ``λ_rand=0.5``."""
        return describe({tuple(k.split(".")): v for k, v in self.overrides.items()})

    def experiment(self) -> str:
        """Its experiment within its study: its overrides, hashed (``base`` without)."""
        from .records import canonical_json  # records reads presets' types from here

        return hashlib.sha256(canonical_json(self.overrides).encode()).hexdigest()[:12] if self.overrides else "base"


def _section(cls, values, name: str, where) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {name} must be a mapping, not {values!r}")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        hint = " (flip TTA is eval.flip)" if "flip" in unknown else ""
        raise ConfigError(f"{where}: unknown keys {unknown} in {name}{hint}; known: {sorted(f.name for f in fields(cls))}")
    check_types(cls, values, f"{name}.", where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}: {exc}") from exc


def check_types(cls, values: dict[str, Any], prefix: str, where) -> None:
    """Each value against its field's annotation in ``cls``; the first that does not conform is a
    ConfigError naming the file, the key, the value and the type expected."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key, Any)
        if not conforms(value, hint):
            raise ConfigError(f"{where}: {prefix}{key}: {value!r} ({type(value).__name__}), expected {type_name(hint)}")


def conforms(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits an annotation: an int is a float (not a bool), a list is a tuple,
    and a bare ``tuple`` takes one value or a list (a grid's values)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is tuple:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis or origin is list else args
        return isinstance(value, (list, tuple)) and all(conforms(v, items[0] if len(items) == 1 else t)
                                                        for v, t in zip(value, items * len(value)))
    if origin is dict or hint is dict:
        key_hint, value_hint = args or (Any, Any)
        return isinstance(value, dict) and all(conforms(k, key_hint) and conforms(v, value_hint) for k, v in value.items())
    return not isinstance(hint, type) or isinstance(value, hint)


def type_name(hint: Any) -> str:
    """An annotation as a preset's author reads it: ``true or false``, ``an integer``, ``a list of
    integers``, ``a string or nothing (null)``."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "nothing (null)",
             dict: "a mapping"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin in (tuple, list):
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _reducer_sections(sections: dict[str, Any], where) -> dict[str, Any]:
    out = {}
    for name, values in sections.items():
        spec = registry.get(name)
        if spec.kind != registry.REDUCER:
            raise ConfigError(f"{where}: reduce.{name}: {name} is a {spec.kind}, its section is top-level `{name}:`")
        out[name] = _section(spec.params, values, f"reduce.{name}", where)
    return out


def _head_sections(merged: dict[str, Any], where) -> tuple[dict, dict, dict]:
    heads, dims, per_dim = {}, {}, {}
    for name in registry.names(registry.HEAD):
        values = dict(merged.get(name) or {})
        if name not in merged:
            continue
        spec = registry.get(name)
        if "dim" in values:
            dims[name] = int(values.pop("dim"))
        overrides = {int(d): dict(o or {}) for d, o in (values.pop("per_dim", None) or {}).items()}
        heads[name] = params = _section(spec.params, spec.with_defaults(values), name, where)
        for d, changes in overrides.items():
            _section(spec.params, {**_as_dict(params), **changes}, f"{name}.per_dim.{d}", where)
        per_dim[name] = overrides
    return heads, dims, per_dim


def _as_dict(params) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in fields(params)}


# -- dotted paths, overrides, sweeps, labels ---------------------------------------------------


def parse_value(text: str) -> Any:
    """A YAML scalar or list: ``0.5`` → 0.5, ``true`` → True, ``[3, 6]`` → [3, 6], ``none`` → 'none'."""
    return yaml.safe_load(text) if text.strip() else ""


def parse_assignment(text: str) -> tuple[str, Any]:
    """``stego.lambda_rand=0.5`` → ("stego.lambda_rand", 0.5)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text!r}: expected KEY=VALUE with a dotted key, e.g. stego.lambda_rand=0.5")
    return key.strip(), parse_value(value)


def parse_sweep(text: str) -> tuple[str, tuple]:
    """``stego.lambda_rand=0.3,0.5`` → ("stego.lambda_rand", (0.3, 0.5))."""
    key, sep, values = text.partition("=")
    if not sep or not values.strip():
        raise ConfigError(f"{text!r}: expected KEY=V1,V2,… e.g. stego.lambda_rand=0.3,0.5")
    return key.strip(), tuple(parse_value(v) for v in values.split(","))


def set_path(raw: dict, dotted: str, value: Any, where="preset") -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``; numeric components address integer keys."""
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys):
        key = int(key) if key.isdigit() and key not in node else key
        if i == len(keys) - 1:
            node[key] = value
            return
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"{where}: cannot set {dotted}: {'.'.join(keys[: i + 1])} is {node[key]!r}, not a mapping")
        node = node[key]


def flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Leaves of nested dicts by their key paths (lists are leaves)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, prefix + (str(key),)))
        return out
    return {prefix: tree}


def config_changes(config: dict[str, Any], reference: dict[str, Any]) -> dict[tuple, Any]:
    """The leaves of ``config`` that differ from ``reference``, by readable path (the config tree's
    structural levels and stage names left out)."""
    mine, theirs = flatten(config), flatten(reference)
    return {tuple(k for k in path if k not in CONFIG_STRUCTURE): value for path, value in mine.items()
            if path[-1] != "stage" and theirs.get(path, object()) != value}


def readable_names(paths) -> dict[tuple, str]:
    """Each key path by its shortest suffix that tells it from the others, λ for lambda:
    ``("inputs", "reducer", "standardize")`` → ``standardize`` unless another path ends so too."""
    paths = list(paths)
    names = {}
    for path in paths:
        n = next(n for n in range(1, len(path) + 1) if sum(other[-n:] == path[-n:] for other in paths) == 1 or n == len(path))
        names[path] = ".".join(path[-n:]).replace("lambda_", "λ_")
    return names


def describe(changes: dict[tuple, Any]) -> str:
    """``{("stego", "lambda_rand"): 0.5}`` → ``λ_rand=0.5`` (names as :func:`readable_names`,
    floats in short form), sorted."""
    names = readable_names(changes)
    return ", ".join(sorted(f"{names[path]}={short_value(value)}" for path, value in changes.items()))


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(short_value(v) for v in value) + "]"
    return str(value)


def preset_candidates(name: str) -> list[Path]:
    rel = [f"{name}.yaml", f"paper/{name}.yaml"]
    return [Path(name)] + [root / r for root in (PACKAGE_CONFIGS, REPO_CONFIGS) for r in rel]


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Preset:
    """A preset by file path or by name (``demo``, ``directory``, ``potsdam`` …), with ``overrides``."""
    for path in preset_candidates(str(name_or_path)):
        if path.is_file():
            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: a preset is a YAML mapping")
            return Preset.from_dict(raw, path, overrides)
    raise ConfigError(f"no preset {name_or_path!r}; available: {', '.join(available_presets())}")


def available_presets() -> list[str]:
    names = set()
    for root in (PACKAGE_CONFIGS, REPO_CONFIGS):
        names.update(p.stem for p in root.glob("*.yaml"))
        names.update(p.stem for p in root.glob("paper/*.yaml"))
    return sorted(names)
