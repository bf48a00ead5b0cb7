"""The study: a preset (with ``--set`` overrides and sweep points) turned into stages — the only
place that composes them.

A :class:`StudyContext` holds the preset, the cache, the data root and the run options. Its
builders make each stage of the study from the preset (memoised, so shared stages are shared),
and label each with what its configuration changes relative to the preset's file. The graph of
a study is known before anything runs: stage constructors do no IO and keys are computed from
upstream keys. Every stage a context runs or finds cached is recorded under
``<cache>/studies/<preset>/experiments/``, which is what ``figures --study`` draws.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from . import cache_schema
from . import methods as registry
from .config import ConfigError, Preset, config_changes, describe
from .data import declared_classes, write_synthetic
from .graph import Node, graph_of
from .heads.base import HeadRun
from .models.backbone import RANDOM_PREFIX, parse_backbone
from .pipeline import (
    Artefact,
    Stage,
    canonical_json,
    without_seeds,
)
from .stages.cause_mediator import CauseMediatorStage
from .stages.extract import ExtractParams, ExtractStage
from .stages.hierarchy import HierarchyStage
from .stages.import_stego import ImportStegoStage
from .stages.knn import KnnStage
from .stages.predictions import PredictionsStage
from .stages.primaps_masks import PrimapsMasksStage
from .stages.probe import ProbeParams, ProbeStage
from .stages.reduce import ProjectStage, ReduceStage
from .stages.train_head import TrainHeadStage
from .storage import as_path


def official_weights(backbone: str) -> str | None:
    """The official DINO file of a backbone in ``$STEGOSCOPE_WEIGHTS`` (a folder), if it is there.

    Set it once and every command (extract, reduce, probe, study …) keys its stores by the same
    weights; otherwise the preset's ``weights`` or timm's hub copy is used.
    """
    folder = os.environ.get("STEGOSCOPE_WEIGHTS")
    if not folder or backbone.startswith(RANDOM_PREFIX):
        return None
    spec, _ = parse_backbone(backbone)
    path = Path(folder) / (spec.dino_file or "")
    return str(path) if spec.dino_file and path.is_file() else None


class StudyContext:
    """A preset, the cache, the data root and the run options; builds every stage of the study.

    Parameters
    ----------
    preset : the resolved preset (with its overrides).
    cache_root : the cache.
    data_root : the dataset folder (default: the preset's; a synthetic dataset is generated).
    device, scheduler : override the preset's.
    show_progress, workers, crf_workers, extract_options : run options of the stages.
    """

    def __init__(self, preset: Preset, cache_root: Path, data_root: Path | None = None, *, device: str | None = None,
                 scheduler: str | None = None, show_progress: bool = True, workers: int | None = None, crf_workers: int = 2,
                 extract_options: dict[str, Any] | None = None, group: bool | None = None):
        self.preset, self.cache_root, self._data_root = preset, as_path(cache_root), data_root
        self.device, self.scheduler = device or preset.device, scheduler or preset.scheduler
        self.group = preset.train.group if group is None else group
        self.show_progress, self.workers, self.crf_workers = show_progress, workers, crf_workers
        self.extract_options = dict(extract_options or {})
        self._built: dict[tuple, Stage] = {}
        self.names: dict[int, str] = {}  # stage → its node's name
        self.coords: dict[int, tuple] = {}  # result stage → (method, dim, seed, True)
        self.family: str | None = None  # the `future` experiment family this variant belongs to

    def variant(self, preset: Preset) -> StudyContext:
        """The same cache, data and options for another preset (a sweep point, the base)."""
        return StudyContext(preset, self.cache_root, self._data_root, device=self.device, scheduler=self.scheduler,
                            show_progress=self.show_progress, workers=self.workers, crf_workers=self.crf_workers,
                            extract_options=self.extract_options, group=self.group)

    @cached_property
    def base(self) -> StudyContext:
        """The context of the preset as its file declares it: labels say what differs from it."""
        return self if not self.preset.overrides else self.variant(self.preset.base())

    @cached_property
    def data_root(self) -> Path:
        """The dataset folder: given, from the preset, or (synthetic) generated once into the cache."""
        preset = self.preset
        if self._data_root is not None:
            return Path(self._data_root)
        if preset.data_root:
            return Path(preset.data_root)
        if preset.dataset == "synthetic":
            options = {"seed": 0, "n_train": 64, "n_val": 32, "size": [128, 96], **preset.synthetic}
            tag = hashlib.sha256(canonical_json(options).encode()).hexdigest()[:8]
            root = cache_schema.dataset_dir(self.cache_root, f"synthetic-{tag}")
            return write_synthetic(root, options["seed"], options["n_train"], options["n_val"], tuple(options["size"]))
        raise ConfigError(f"preset {preset.name!r} needs its data: pass --data-root DIR (make: DATA_ROOT=DIR)")

    @cached_property
    def n_classes(self) -> int:
        """The dataset's classes, from its reader's class names or the preset, without opening any
        file; else (a directory dataset without n_classes) from its val split, whose reader says what is missing."""
        return declared_classes(self.preset.dataset, self.preset.n_classes) or self.extract("val").dataset.n_classes

    # -- stage builders ---------------------------------------------------------------------------
    def _build(self, what: tuple, name: str, make: Callable[[StudyContext], Stage], result: tuple | None = None) -> Stage:
        """Memoised stage ``make(self)``, labelled with what it changes relative to the base;
        ``result``: its (method, dim, seed) when it is a result of the study."""
        if what not in self._built:
            stage = make(self)
            if self.base is not self:
                stage.label = describe(config_changes(without_seeds(stage.config()), without_seeds(make(self.base).config())))
            self._built[what] = stage
            self.names[id(stage)] = name
            if result is not None:
                self.coords[id(stage)] = (*result, True)
        return self._built[what]

    def extract(self, split: str) -> ExtractStage:
        """The extraction of one split of the preset (flip TTA on the val splits when ``eval.flip``)."""
        if split not in self.preset.splits:
            raise ConfigError(f"preset {self.preset.name!r} has no split {split!r}; it has {list(self.preset.splits)}")

        def make(ctx: StudyContext) -> ExtractStage:
            p, cfg = ctx.preset, ctx.preset.splits[split]
            params = ExtractParams(
                dataset=p.dataset, split=cfg.split or split, res=cfg.res, backbone=p.backbone,
                weights=p.weights or official_weights(p.backbone),
                seed=p.seed, interpolation=p.interpolation, n_classes=p.n_classes, store_images=cfg.store_images, crop=cfg.crop,
                flip=p.eval.flip and (cfg.split or split) != "train", attention=cfg.attention, fraction=cfg.fraction,
                fraction_seed=cfg.fraction_seed)
            options = {"batch_size": p.batch_size, "shard_images": p.shard_images, "workers": ctx.workers, "device": ctx.device,
                       "show_progress": ctx.show_progress, **ctx.extract_options}
            return ExtractStage(ctx.cache_root, ctx.data_root, params, **options)

        return self._build(("extract", split), f"extract {split}", make)

    def knn(self, k: int = 30, block: int = 1024) -> KnnStage:
        return self._build(("knn", k, block), "knn", lambda ctx: KnnStage(
            ctx.cache_root, ctx.extract("train"), k=k, block=block, device=ctx.device))

    def fit(self, method: str, dim: int | None, seed: int = 0) -> ReduceStage:
        """The fit of reducer ``method`` (one for every D when it serves every D)."""
        cls = registry.get(method).cls
        params = self.preset.method_params(method)
        dim = None if cls.serves_every_dim else dim
        seeded = cls.seeded or getattr(params, "max_images", None)
        seed = seed if seeded else 0
        name = f"reduce {method}" + (f" D={dim}" if dim else "") + (f" seed {seed}" if seeded else "")
        return self._build(("fit", method, dim, seed), name, lambda ctx: ReduceStage(
            ctx.cache_root, ctx.extract("train"), method, ctx.preset.method_params(method), dim, seed, ctx.device))

    def projections(self, method: str, dim: int | None, seed: int = 0) -> tuple[ProjectStage, ProjectStage]:
        """The train and val stores projected by a fit whose transform is too slow per batch (h-NNE)."""
        return tuple(self._build(("project", split, method, dim, seed), f"project {split} {method} D={dim} seed {seed}",
                                 lambda ctx, split=split: ProjectStage(ctx.cache_root, ctx.fit(method, dim, seed), ctx.extract(split),
                                                                       ctx.show_progress))
                     for split in ("train", "val"))  # type: ignore[return-value]

    def headline(self, method: str, dim: int | None) -> bool:
        """Whether this result is a row of Table 2 (raw DINO; a Table 2 head at its headline D)."""
        spec = registry.get(method)
        return spec.table2 and (spec.kind == registry.REDUCER or spec.cls.fixed_dim or dim == self.preset.head_dim(method))

    def crf_at(self, method: str, dim: int | None) -> bool:
        """Whether ``eval.crf`` evaluates this result with the dense CRF too."""
        where = self.preset.eval.crf
        return self.headline(method, dim) if where == "table2" else where == "all"

    def probe_params(self, seed: int, crf: bool) -> ProbeParams:
        p, e = self.preset.probe, self.preset.eval
        return ProbeParams(n_classes=self.n_classes, steps=p.steps, batch_size=p.batch_size, linear_lr=p.linear_lr,
                           cluster_lr=p.cluster_lr, extra_clusters=e.extra_clusters, val_every=e.val_every, seed=seed, crf=crf,
                           extra_as_errors=e.extra_as_errors, flip_tta=e.flip, clusterer=e.clusterer)

    def probe(self, method: str, dim: int | None = None, seed: int = 0, crf: bool | None = None) -> ProbeStage:
        """Probes on the codes of ``method`` at ``dim``: a registered reducer (its preset fit) or
        the folder of a finished reduce / head artefact."""
        if as_path(method).is_dir():
            artefact = Artefact(as_path(method))
            crf = self.crf_at(artefact.method, dim) if crf is None else crf
            return self._build(("probe", method, dim, seed, crf), f"probe {as_path(method).name} seed {seed}", lambda ctx: ProbeStage(
                ctx.cache_root, ctx.extract("train"), ctx.extract("val"), ctx.probe_params(seed, crf), artefact, dim,
                device=ctx.device, crf_workers=ctx.crf_workers, show_progress=ctx.show_progress), (artefact.method, dim, seed))
        spec = registry.get(method)
        if spec.kind != registry.REDUCER:
            raise ConfigError(f"{method} is a {spec.kind}: its probes train with it (`stegoscope train --method {method}`); "
                              f"pass its artefact folder to probe its codes afresh")
        cls = spec.cls
        if cls.needs_fit and not dim:
            raise ConfigError(f"--dim is required with --reducer {method}")
        dim = dim if cls.needs_fit else None
        crf = self.crf_at(method, dim) if crf is None else crf

        def make(ctx: StudyContext) -> ProbeStage:
            fit = ctx.fit(method, dim, seed) if cls.needs_fit else None
            derived = ctx.projections(method, dim, seed) if cls.precompute_codes else None
            return ProbeStage(ctx.cache_root, ctx.extract("train"), ctx.extract("val"), ctx.probe_params(seed, crf), fit, dim,
                              derived, method, device=ctx.device, crf_workers=ctx.crf_workers, show_progress=ctx.show_progress)

        name = f"probe {method}" + (f" D={dim}" if dim else "") + f" seed {seed}"
        return self._build(("probe", method, dim, seed, crf), name, make, (method, dim, seed))

    def head(self, method: str, dim: int | None = None, seed: int = 0, crf: bool | None = None) -> TrainHeadStage:
        """Head ``method`` trained at ``dim`` (default: its headline D) with its per-D parameters;
        a head whose D follows from its inputs (PriMaPs-EM) trains at that D only."""
        spec = registry.get(method)
        if spec.kind != registry.HEAD:
            raise ConfigError(f"{method} is a {spec.kind}, not a head; heads: {', '.join(registry.names(registry.HEAD))}")
        if spec.cls.fixed_dim:
            channels = parse_backbone(self.preset.backbone)[0].embed_dim
            dim = spec.cls.code_dim(self.preset.method_params(method), channels, self.preset.head_dim)
        dim = dim or self.preset.head_dim(method)
        crf = self.crf_at(method, dim) if crf is None else crf

        def make(ctx: StudyContext) -> TrainHeadStage:
            e, params = ctx.preset.eval, ctx.preset.method_params(method, dim)
            run = HeadRun(n_classes=ctx.n_classes, dim=dim, probe_lr=ctx.preset.probe.linear_lr, extra_clusters=e.extra_clusters,
                          val_every=e.val_every, seed=seed, crf=crf, extra_as_errors=e.extra_as_errors)
            knn = ctx.knn() if spec.cls.uses_knn else None
            train = ctx.extract(getattr(params, "train_split", "train"))
            inputs = spec.cls.input_stages(params, ctx, train, seed)
            return TrainHeadStage(ctx.cache_root, method, params, run, train, ctx.extract("val"), knn, device=ctx.device,
                                  crf_workers=ctx.crf_workers, show_progress=ctx.show_progress, inputs=inputs)

        return self._build(("head", method, dim, seed, crf), f"train-{method} D={dim} seed {seed}", make, (method, dim, seed))

    def primaps_masks(self, train: ExtractStage, threshold: float, coverage: float, gain: float) -> PrimapsMasksStage:
        """PriMaPs' mask proposals of a train split."""
        return self._build(("primaps-masks", train.key, threshold, coverage, gain), f"primaps-masks {train.p.split}",
                           lambda ctx: PrimapsMasksStage(ctx.cache_root, train, threshold, coverage, gain, ctx.crf_workers,
                                                         ctx.show_progress))

    def cause_mediator(self, train: ExtractStage, params: Any, seed: int = 0) -> CauseMediatorStage:
        """CAUSE's clusterbook fitted on a train split (shared by the heads that agree on it)."""
        p = params
        settings = (p.clusters, p.mediator_steps, p.batch_size, p.mediator_lr, p.modularity_temperature, p.window, seed)
        return self._build(("cause-mediator", train.key, *settings), f"cause-mediator {train.p.split} K={p.clusters} seed {seed}",
                           lambda ctx: CauseMediatorStage(ctx.cache_root, train, *settings, device=ctx.device,
                                                          show_progress=ctx.show_progress))

    def hierarchy(self, dim: int, seed: int = 0) -> HierarchyStage:
        """Every level of the hierarchy of the fit at ``dim`` (h-NNE's) as the clusterer."""
        method = registry.hierarchy_method()
        return self._build(("hierarchy", dim, seed), f"hierarchy {method} D={dim} seed {seed}", lambda ctx: HierarchyStage(
            ctx.cache_root, ctx.fit(method, dim, seed), ctx.extract("val"), ctx.n_classes, ctx.device, ctx.show_progress),
            (method, dim, seed))

    def import_stego(self, checkpoint: Path, crf: bool = True) -> ImportStegoStage:
        """A released STEGO checkpoint evaluated on the preset's val store (flip TTA as ``eval.flip``)."""
        return self._build(("import-stego", str(checkpoint), crf), f"import-stego {Path(checkpoint).name}", lambda ctx: ImportStegoStage(
            ctx.cache_root, checkpoint, ctx.extract("val"), crf, ctx.preset.eval.flip, ctx.device, ctx.crf_workers, ctx.show_progress))

    def predictions(self, results: list[Stage]) -> list[PredictionsStage]:
        """Per-image predictions over val of the probes and heads ``eval.keep_predictions`` keeps."""
        keep = self.preset.eval.keep_predictions
        kept = [r for r in results if isinstance(r, (ProbeStage, TrainHeadStage)) and keep != "none"
                and (keep == "all" or self.headline(*self.coords[id(r)][:2]))]
        return [self._build(("predictions", r.key), f"predictions {self.names[id(r)]}", lambda ctx, r=r: PredictionsStage(
            ctx.cache_root, r, ctx.device, ctx.crf_workers, ctx.show_progress)) for r in kept]

    # -- the graph --------------------------------------------------------------------------------
    def results(self, only: list[str] | None = None, dims: list[int] | None = None,
                seeds: list[int] | None = None) -> list[Stage]:
        """The study's results: for each seed and method, a probe (reducers) or a trained head at
        each D (once for reducers that need no fit)."""
        methods = list(only or self.preset.methods)
        for name in methods:
            registry.get(name)
        dims, seeds = list(dims or self.preset.sweep_dims()), list(seeds or self.preset.seeds)
        out: list[Stage] = []
        for seed in seeds:
            for method in methods:
                spec = registry.get(method)
                if spec.kind == registry.HEAD and spec.cls.fixed_dim:
                    out.append(self.head(method, None, seed))
                elif spec.kind == registry.HEAD:
                    out += [self.head(method, dim, seed) for dim in dims]
                elif not spec.cls.needs_fit:
                    out.append(self.probe(method, None, seed))
                else:
                    out += [self.probe(method, dim, seed) for dim in dims]
        return out

    def graph(self, only: list[str] | None = None, dims: list[int] | None = None, seeds: list[int] | None = None) -> list[Node]:
        """Every node of the study in dependency order: the extraction of the train and val
        splits, the :meth:`results` and all they read (further splits only where a result does)."""
        results = self.results(only, dims, seeds)
        return self.graph_of([self.extract("train"), self.extract("val")] + results + self.predictions(results))

    def graph_of(self, targets: list[Stage]) -> list[Node]:
        """``targets`` and every stage upstream of them, as nodes in dependency order."""
        return graph_of(targets, self.names, self.coords, self.preset.experiment())

    def command_for(self, stage: Stage) -> str:
        """The command that makes ``stage`` with this context's preset."""
        preset = f"--preset {self.preset.path or self.preset.name}"
        if isinstance(stage, ExtractStage):
            return f"stegoscope {cache_schema.remake_command(stage.name)} {preset} --{'flip' if self.preset.eval.flip else 'no-flip'}"
        if isinstance(stage, (ReduceStage, ProjectStage)):
            fit = stage if isinstance(stage, ReduceStage) else stage.fit
            dim = f" --dim {fit.dim}" if fit.dim else ""
            return f"stegoscope {cache_schema.remake_command(fit.name, fit.method)}{dim} {preset}"
        if isinstance(stage, TrainHeadStage):
            return f"stegoscope {cache_schema.remake_command(stage.name)} --dim {stage.run.dim} {preset}"
        return f"stegoscope {cache_schema.remake_command(stage.name)} {preset}"

