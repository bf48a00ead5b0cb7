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
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from . import cache_schema
from . import methods as registry
from .atomic import atomic_write_text
from .compute import dask_scheduler
from .config import ConfigError, Preset, config_changes, describe, readable_names, short_value
from .data import declared_classes, write_synthetic
from .heads.base import HeadRun
from .models.backbone import RANDOM_PREFIX, parse_backbone
from .pipeline import (
    COMPLETE,
    MISSING,
    PARTIAL,
    Artefact,
    RunResult,
    Stage,
    canonical_json,
    read_manifest,
    run_group,
    stage_lock,
    without_seeds,
)
from .records import StudyNode, StudyRecord
from .stages.extract import ExtractParams, ExtractStage
from .stages.hierarchy import HierarchyStage
from .stages.import_stego import ImportStegoStage
from .stages.knn import KnnStage
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


@dataclass
class Node:
    """One stage of the study graph, the nodes it depends on, and where its result sits."""

    label: str
    stage: Stage
    deps: list[Node] = field(default_factory=list)
    method: str | None = None
    dim: int | None = None
    seed: int | None = None
    result: bool = False  # its artefact holds metrics (a probe or a head)

    def upstream_nodes(self) -> list[Node]:
        """Every node upstream of this one."""
        seen, todo, out = set(), list(self.deps), []
        while todo:
            node = todo.pop()
            if id(node) not in seen:
                seen.add(id(node))
                out.append(node)
                todo.extend(node.deps)
        return out

    def upstream(self) -> set[int]:
        return {id(node) for node in self.upstream_nodes()}


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
                flip=p.eval.flip and split != "train", attention=cfg.attention)
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
        """Whether this result is a row of Table 2: a Table 2 method (raw DINO; a head at its
        headline D)."""
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
            inputs = {name: ctx.head_input(name, params, train, seed) for name in spec.cls.inputs_of(params)}
            return TrainHeadStage(ctx.cache_root, method, params, run, train, ctx.extract("val"), knn, device=ctx.device,
                                  crf_workers=ctx.crf_workers, show_progress=ctx.show_progress, inputs=inputs)

        return self._build(("head", method, dim, seed, crf), f"train-{method} D={dim} seed {seed}", make, (method, dim, seed))

    def head_input(self, name: str, params: Any, train: Stage, seed: int) -> Stage:
        """A further artefact a head reads: PriMaPs' mask proposals of its train split, or the
        trained head its features come from (``base``, at that head's headline D)."""
        if name == "masks":
            return self._build(("primaps-masks", train.key, params.threshold, params.coverage, params.gain),
                               f"primaps-masks {train.p.split}", lambda ctx: PrimapsMasksStage(
                                   ctx.cache_root, train, params.threshold, params.coverage, params.gain, ctx.crf_workers,
                                   ctx.show_progress))
        if name == "base":
            return self.head(params.base, None, seed)
        raise ConfigError(f"no study stage provides a head's input {name!r}")

    def hierarchy(self, dim: int, seed: int = 0) -> HierarchyStage:
        """Every level of the hierarchy of the fit at ``dim`` (h-NNE's) as the clusterer."""
        method = registry.hierarchy_method()
        return self._build(("hierarchy", dim, seed), f"hierarchy {method} D={dim} seed {seed}", lambda ctx: HierarchyStage(
            ctx.cache_root, ctx.fit(method, dim, seed), ctx.extract("val"), ctx.n_classes, ctx.device, ctx.show_progress),
            (method, dim, seed))

    def future(self) -> list[tuple[StudyContext, list[Stage]]]:
        """The experiments of the preset's ``future`` section (the paper's open questions): for each
        configuration, its context and result stages. A configuration that is the preset's own is
        this context (its results are the study's); the others are variants marked with their family."""
        f, dims = self.preset.future, list(self.preset.sweep_dims())
        plan: list[tuple[StudyContext, list[Stage]]] = []

        def variant(family: str, overrides: dict[str, Any]) -> StudyContext:
            preset = self.preset.with_overrides(overrides)
            if _resolved(preset) == _resolved(self.preset):
                return self
            ctx = self.variant(preset)
            ctx.family = family  # differs from the preset: drawn by its family's figure, not Fig. 4
            return ctx

        for clusterer in f.clusterers:
            ctx = variant("clusterers", {"eval.clusterer": clusterer})
            plan.append((ctx, [ctx.probe(m, d) for m in f.clusterer_methods for d in dims]))
        for extra in f.extra_clusters:
            ctx = variant("over-clustering", {"eval.extra_clusters": extra})
            plan.append((ctx, [ctx.probe("dino")]))
        if f.hierarchy:
            method = registry.hierarchy_method()
            plan.append((self, [self.hierarchy(dims[0]), self.probe(method, dims[0])]))
            ctx = variant("hierarchy", {"eval.clusterer": "kmeans"})
            plan.append((ctx, [ctx.probe(method, dims[0])]))
        keys = list(f.loss_grid)
        for values in itertools.product(*f.loss_grid.values()):
            ctx = variant("loss-grid", dict(zip(keys, values)))
            plan.append((ctx, [ctx.head(keys[0].split(".")[0], d) for d in dims]))
        return plan

    def import_stego(self, checkpoint: Path, crf: bool = True) -> ImportStegoStage:
        """A released STEGO checkpoint evaluated on the preset's val store (flip TTA as ``eval.flip``)."""
        return self._build(("import-stego", str(checkpoint), crf), f"import-stego {Path(checkpoint).name}", lambda ctx: ImportStegoStage(
            ctx.cache_root, checkpoint, ctx.extract("val"), crf, ctx.preset.eval.flip, ctx.device, ctx.crf_workers, ctx.show_progress))

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
        return self.graph_of([self.extract("train"), self.extract("val")] + self.results(only, dims, seeds))

    def graph_of(self, targets: list[Stage]) -> list[Node]:
        """``targets`` and every stage upstream of them, as nodes in dependency order."""
        nodes: dict[int, Node] = {}

        def visit(stage: Stage) -> Node:
            if id(stage) not in nodes:
                deps = [visit(up) for up in stage.upstream().values() if not isinstance(up, Artefact)]
                method, dim, seed, result = self.coords.get(id(stage), (getattr(stage, "method", None), None, None, False))
                nodes[id(stage)] = Node(self.names.get(id(stage), stage.name), stage, deps, method, dim, seed, result)
            return nodes[id(stage)]

        for stage in targets:
            visit(stage)
        return list(nodes.values())

    def run(self, graph: list[Node], progress: Callable[[Node], None] | None = None, force: list[Stage] = (),
            wait: bool = True, on_wait: Callable[[Node, str], None] | None = None) -> list[tuple[Node, RunResult]]:
        """:func:`run_studies` of this context's ``graph`` alone."""
        return run_studies([(self, graph)], progress, force, wait, on_wait)[0]

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

    # -- what a run would do ----------------------------------------------------------------------
    def plan(self, graph: list[Node]) -> list[tuple[Node, str, str]]:
        """(node, ``run`` | ``cached``, why) for each node, without running anything."""
        runs: set[int] = set()
        out = []
        for node in graph:
            state = node.stage.state()
            upstream = [n for n in graph if id(n) in node.upstream() and id(n) in runs and not isinstance(n.stage, ExtractStage)]
            if state == COMPLETE and not upstream:
                out.append((node, "cached", ""))
                continue
            if state == COMPLETE:
                why = f"upstream reruns ({upstream[0].label})"
            elif state == PARTIAL:
                why = "partial: resumes"
            elif isinstance(node.stage, ExtractStage):
                why = node.stage.stale_reason() or "missing"
            else:
                why = previous_change(node.stage) or "missing"
            runs.add(id(node))
            out.append((node, "run", why))
        return out

    # -- the record of what the study declared ---------------------------------------------------
    @property
    def experiment(self) -> str:
        """This context's experiment within its study: its overrides, hashed (``base`` without)."""
        overrides = self.preset.overrides
        return hashlib.sha256(canonical_json(overrides).encode()).hexdigest()[:12] if overrides else "base"

    def record(self, graph: list[Node]) -> Path:
        """Add ``graph``'s nodes to this experiment's record: its results (what the figures draw),
        its fits (Fig. 3) and the inputs they read (what `gc` keeps). A record made from other
        preset content is started afresh (its artefacts stay in the cache)."""
        path = cache_schema.experiment_record_path(self.cache_root, self.preset.name, self.experiment)
        content = hashlib.sha256(canonical_json(self.preset.source).encode()).hexdigest()
        with stage_lock(cache_schema.lock_path(self.cache_root, f"study-{self.preset.name}-{self.experiment}")):
            old = cache_schema.read_study_record(path)
            nodes = dict(old.nodes) if old is not None and old.preset_sha256 == content else {}
            for node in graph:
                kind = "result" if node.result else "fit" if isinstance(node.stage, ReduceStage) else "input"
                nodes[node.label] = StudyNode(
                    key=node.stage.key, output=_relative(node.stage.output, self.cache_root), stage=node.stage.name, kind=kind,
                    method=node.method, dim=node.dim, seed=node.seed, result=node.result, label=node.stage.label,
                    headline=bool(node.result and self.headline(node.method, node.dim)), family=self.family)
            record = StudyRecord(study=self.preset.name, experiment=self.experiment, preset_sha256=content, updated=time.time(),
                                 nodes=nodes, label=self.preset.label(), overrides=self.preset.overrides,
                                 preset=None if self.preset.path is None else str(self.preset.path))
            atomic_write_text(path, json.dumps(record.to_dict(), indent=1, sort_keys=True))
        return path


def run_studies(plans: list[tuple[StudyContext, list[Node]]], progress: Callable[[Node], None] | None = None,
                force: list[Stage] = (), wait: bool = True,
                on_wait: Callable[[Node, str], None] | None = None) -> list[list[tuple[Node, RunResult]]]:
    """Run the graphs of several contexts (the experiments of a sweep, the ``future`` families)
    as one: every stage once, groups across them (:func:`run_order`); then record each study.

    A node runs when it is not complete, is in ``force``, or is complete but its upstream reran
    (a re-extraction rewrites the same key's tokens, so it forces nothing). Returns each
    graph's (node, result) in its order; a stage two graphs share counts as run in the first."""
    nodes: dict[str, Node] = {}  # one node per stage key, the first graph's
    for _, graph in plans:
        for node in graph:
            nodes.setdefault(node.stage.key, node)
    upstream = {key: {up.stage.key for up in node.upstream_nodes()} for key, node in nodes.items()}
    forced, ran, results = {stage.key for stage in force}, set(), {}
    group = all(ctx.group for ctx, _ in plans)
    with dask_scheduler(plans[0][0].scheduler):
        for batch in run_order(list(nodes.values()), group):
            again = {n.stage.key for n in batch if n.stage.key in forced
                     or (n.stage.state() == COMPLETE and upstream[n.stage.key] & ran)}
            for node in batch:
                if progress is not None:
                    progress(node)
            for members in ([n for n in batch if n.stage.key in again], [n for n in batch if n.stage.key not in again]):
                if not members:
                    continue
                waiting = None if on_wait is None else lambda holder, node=members[0]: on_wait(node, holder)
                for node, result in zip(members, run_group([n.stage for n in members], force=members[0].stage.key in again,
                                                           wait=wait, on_wait=waiting)):
                    if not result.skipped and not isinstance(node.stage, ExtractStage):
                        ran.add(node.stage.key)
                    results[node.stage.key] = result
    out, reported = [], set()
    for ctx, graph in plans:
        ctx.record(graph)
        rows = []
        for node in graph:
            result = results[node.stage.key]
            if node.stage.key in reported and not result.skipped:
                result = RunResult(node.stage, True, 0.0)  # it ran for an earlier graph
            reported.add(node.stage.key)
            rows.append((node, result))
        out.append(rows)
    return out


def run_order(graph: list[Node], group: bool = True) -> list[list[Node]]:
    """The nodes in the order they run, nodes that run together in one list. Without ``group``:
    each alone, in graph order. With it: whatever runs alone runs as soon as its upstream is done;
    a node with a group key waits until nothing else is ready, then runs with every ready node
    of its key (so the probes of every reducer wait for every fit, and train as one group)."""
    if not group:
        return [[node] for node in graph]
    order, remaining = [], list(graph)
    keys = {id(node): node.stage.group_key() for node in graph}
    while remaining:
        pending = {node.stage.key for node in remaining}
        ready = [n for n in remaining if not any(d.stage.key in pending for d in n.deps)]
        alone = [n for n in ready if keys[id(n)] is None]
        nodes = alone[:1] or [n for n in ready if keys[id(n)] == keys[id(ready[0])]]
        order.append(nodes)
        taken = {id(n) for n in nodes}
        remaining = [n for n in remaining if id(n) not in taken]
    return order


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the cache root (``..`` for an artefact given from another local cache)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.path.relpath(path, root)


def _resolved(preset: Preset) -> Preset:
    """The preset's parsed settings alone (not how they were given)."""
    return replace(preset, path=None, source={}, overrides={})


def recorded_keys(cache_root: Path) -> set[str]:
    """The key of every stage that any experiment of any study recorded."""
    keys = set()
    for study in cache_schema.list_studies(cache_root):
        for record in cache_schema.study_records(cache_root, study):
            keys.update(node.key for node in record.nodes.values())
    return keys


def previous_change(stage: Stage) -> str | None:
    """What changed since the closest earlier artefact of the same node (same name, another key):
    ``λ_rand 0.63 → 0.3``; None when there is none."""
    config, best = stage.config(), None
    for other in cache_schema.sibling_artefacts(stage.output):
        try:
            manifest = read_manifest(other)
        except cache_schema.StoreError:
            continue
        if not manifest or not manifest.config:
            continue
        now, before = config_changes(config, manifest.config), config_changes(manifest.config, config)
        if best is None or len(now) + len(before) < best[0]:
            best = (len(now) + len(before), now, before)
    if best is None:
        return None
    _, now, before = best
    names = readable_names(set(now) | set(before))
    missing = "—"
    parts = sorted(f"{names[p]} {short_value(before.get(p, missing))} → {short_value(now.get(p, missing))}" for p in names)
    return "changed: " + "; ".join(parts) if parts else None


def node_states(graph: list[Node]) -> dict[int, str]:
    """complete / partial / missing per node; ``stale`` when complete but something upstream is
    not, or (extraction) when only a store made from other inputs exists."""
    own = {id(n): n.stage.state() for n in graph}
    states = {}
    for node in graph:
        state = own[id(node)]
        if state == COMPLETE and any(own.get(u) != COMPLETE for u in node.upstream()):
            state = "stale"
        elif state == MISSING and isinstance(node.stage, ExtractStage) and node.stage.stale_reason():
            state = "stale"
        states[id(node)] = state
    return states


def require_complete(stage: Stage, command: str) -> None:
    """Stop with what is wrong and the command that fixes it unless ``stage`` has finished."""
    if stage.state() != COMPLETE:
        problem = stage.note() or f"{stage.output} is not computed yet"
        raise ConfigError(f"{problem}; run `{command}` (same options) first")
