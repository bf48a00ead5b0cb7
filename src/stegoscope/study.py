"""The study's stage graph built from a preset: the only place that composes stages."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import cache_schema
from .config import ConfigError, Preset
from .data import write_synthetic
from .pipeline import canonical_json
from .models.backbone import RANDOM_PREFIX, parse_backbone
from .pipeline import COMPLETE, MISSING
from .stages.extract import ExtractParams, ExtractStage
from .stages.knn import KnnStage
from .stages.probe import ProbeParams, ProbeStage
from .stages.train_stego import TrainStegoParams, TrainStegoStage
from .stages.reduce import ProjectStage, ReduceParams, ReduceStage


def resolve_data_root(preset: Preset, cache_root: Path, data_root: Path | None = None) -> Path:
    """The dataset folder: given, from the preset, or (synthetic) generated once into the cache."""
    if data_root is not None:
        return Path(data_root)
    if preset.data_root:
        return Path(preset.data_root)
    if preset.dataset == "synthetic":
        options = {"seed": 0, "n_train": 64, "n_val": 32, "size": [128, 96], **preset.synthetic}
        tag = hashlib.sha256(canonical_json(options).encode()).hexdigest()[:8]
        root = cache_schema.dataset_dir(cache_root, f"synthetic-{tag}")
        return write_synthetic(root, options["seed"], options["n_train"], options["n_val"], tuple(options["size"]))
    raise ConfigError(f"preset {preset.name!r} needs its data: pass --data-root DIR (make: DATA_ROOT=DIR)")


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


def feature_stages(
    preset: Preset,
    cache_root: Path,
    data_root: Path | None = None,
    splits: list[str] | None = None,
    res: dict[str, int] | None = None,
    skip_bad: bool = False,
    flip: bool = False,
    **options: Any,
) -> list[ExtractStage]:
    """One extraction stage per split of the preset.

    ``res`` overrides a split's resolution; ``options`` are ExtractStage run options
    (batch_size, workers, shard_images, device, show_progress).
    """
    root = resolve_data_root(preset, cache_root, data_root)
    weights = preset.weights or official_weights(preset.backbone)
    stages = []
    for split in splits or list(preset.splits):
        if split not in preset.splits:
            raise ConfigError(f"preset {preset.name!r} has no split {split!r}; it has {list(preset.splits)}")
        cfg = preset.splits[split]
        if res and split in res:
            cfg = replace(cfg, res=res[split])
        params = ExtractParams(
            dataset=preset.dataset, split=split, res=cfg.res, backbone=preset.backbone, weights=weights,
            seed=preset.seed, interpolation=preset.interpolation, n_classes=preset.n_classes,
            store_images=cfg.store_images, crop=cfg.crop, skip_bad=skip_bad,
            flip=cfg.flip or (flip and split != "train"),
        )
        run_options = {"batch_size": preset.batch_size, "shard_images": preset.shard_images, **options}
        stages.append(ExtractStage(cache_root, root, params, **run_options))
    return stages


def require_complete(stage: Any, command: str) -> None:
    """Stop with what is wrong and the command that fixes it unless ``stage`` has finished."""
    if stage.state() != COMPLETE:
        problem = stage.note() or f"{stage.output} is not computed yet"
        raise ConfigError(f"{problem}; run `{command}` (same preset and options) first")


def complete_store(stage: ExtractStage) -> Path:
    """The store of an extraction stage, which must have finished."""
    require_complete(stage, "stegoscope extract")
    return stage.output


def reduce_stages(
    preset: Preset, cache_root: Path, params: ReduceParams, data_root: Path | None = None,
    device: str = "auto", show_progress: bool = True,
) -> list:
    """The fit on the train store, and for h-NNE the projections of the train and val stores."""
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, show_progress=False)}
    fit = ReduceStage(cache_root, complete_store(extract["train"]), params, device=device)
    if params.method != "hnne":
        return [fit]
    return [fit] + [ProjectStage(cache_root, fit, complete_store(s), show_progress) for s in extract.values()]


def probe_stage(
    preset: Preset, cache_root: Path, reducer: str = "identity", dim: int | None = None, data_root: Path | None = None,
    crf: bool = True, seed: int = 0, steps: int | None = None, flip: bool = False, **options: Any,
) -> ProbeStage:
    """Probes on the codes of ``reducer``: ``identity`` (raw DINO), ``pca`` / ``rp`` / ``hnne`` (the
    preset's cached fit of that method; ``dim`` required) or the path of a reduce artefact."""
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, flip=flip, show_progress=False)}
    train, val = complete_store(extract["train"]), complete_store(extract["val"])
    artefact, derived = None, None
    if reducer in ("pca", "rp", "hnne"):
        if not dim:
            raise ConfigError(f"--dim is required with --reducer {reducer}")
        fit = reduce_stages(preset, cache_root, ReduceParams(reducer, None if reducer == "pca" else dim, seed=seed), data_root)
        command = f"stegoscope reduce --method {reducer}" + ("" if reducer == "pca" else f" --dim {dim}")
        for stage in fit:
            require_complete(stage, command)
        artefact = fit[0]
        if reducer == "hnne":
            derived = tuple(fit[1:])
    elif reducer != "identity":
        artefact = Path(reducer)
    n_classes = len(cache_schema.open_feature_store(val).attrs["class_names"])
    params = ProbeParams(
        n_classes=n_classes, steps=steps or preset.stego.steps, batch_size=preset.stego.batch_size,
        linear_lr=preset.probe.linear_lr, cluster_lr=preset.probe.cluster_lr, extra_clusters=preset.probe.extra_clusters,
        val_every=preset.probe.val_every, seed=seed, crf=crf,
    )
    return ProbeStage(cache_root, train, val, params, artefact, dim if reducer != "identity" else None, derived, **options)


def knn_stage(preset: Preset, cache_root: Path, data_root: Path | None = None, **options: Any) -> KnnStage:
    """kNN pairs of the preset's train store."""
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, show_progress=False)}
    return KnnStage(cache_root, complete_store(extract["train"]), **options)


def stego_params(preset: Preset, n_classes: int, dim: int | None = None, steps: int | None = None, seed: int = 0,
                 readd_global_mean: bool = True, crf: bool = False) -> TrainStegoParams:
    """The preset's Table 1 / supplementary parameters for one STEGO head."""
    cfg = preset.stego
    return TrainStegoParams(
        n_classes=n_classes, dim=dim or cfg.dim, steps=steps or cfg.steps, batch_size=cfg.batch_size,
        lambda_self=cfg.lambda_self, lambda_knn=cfg.lambda_knn, lambda_rand=cfg.lambda_rand, b_self=cfg.b_self,
        b_knn=cfg.b_knn, b_rand=cfg.b_rand, pointwise=cfg.pointwise, zero_clamp=cfg.zero_clamp,
        readd_global_mean=readd_global_mean, lr=cfg.lr, probe_lr=preset.probe.linear_lr, dropout=cfg.dropout,
        feature_samples=cfg.feature_samples, neg_samples=cfg.neg_samples, knn_neighbors=cfg.knn_neighbors,
        extra_clusters=preset.probe.extra_clusters, val_every=preset.probe.val_every, seed=seed, crf=crf,
    )


def train_stego_stage(
    preset: Preset, cache_root: Path, data_root: Path | None = None, dim: int | None = None, steps: int | None = None,
    seed: int = 0, readd_global_mean: bool = True, knn_options: dict | None = None, crf: bool = False, **options: Any,
) -> tuple[KnnStage, TrainStegoStage]:
    """The kNN stage and the STEGO head training on the preset's stores (Table 1 parameters)."""
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, show_progress=False)}
    train, val = complete_store(extract["train"]), complete_store(extract["val"])
    knn = KnnStage(cache_root, train, **(knn_options or {}))
    params = stego_params(preset, extract["val"].dataset.n_classes, dim, steps, seed, readd_global_mean, crf)
    return knn, TrainStegoStage(cache_root, train, val, knn, params, **options)


# -- the whole study --------------------------------------------------------------------------

STUDY_METHODS = ("dino", "pca", "rp", "hnne", "stego")


@dataclass
class Node:
    """One stage of the study graph and the nodes it depends on."""

    label: str
    stage: Any
    deps: list[Node] = field(default_factory=list)

    def upstream(self) -> set[int]:
        seen: set[int] = set()
        todo = list(self.deps)
        while todo:
            node = todo.pop()
            if id(node) not in seen:
                seen.add(id(node))
                todo.extend(node.deps)
        return seen


def study_graph(
    preset: Preset, cache_root: Path, data_root: Path | None = None, only: list[str] | None = None,
    dims: list[int] | None = None, seeds: list[int] | None = None, device: str = "auto",
) -> tuple[list[Node], bool]:
    """The study's nodes in dependency order, and whether the graph is whole.

    Nodes after extraction need the token stores to exist (their keys include the stores'), so
    until both splits are extracted only the extraction nodes are returned (whole = False).
    """
    methods = [m for m in (only or preset.methods) if m in STUDY_METHODS]
    unknown = set(only or []) - set(STUDY_METHODS)
    if unknown:
        raise ConfigError(f"unknown methods {sorted(unknown)}; choose from {STUDY_METHODS}")
    dims = dims or preset.dims or [preset.stego.dim]
    seeds = seeds or [0]
    quiet = {"show_progress": False}
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, show_progress=False, device=device)}
    nodes = {split: Node(f"extract {split}", stage) for split, stage in extract.items()}
    graph = list(nodes.values())
    if any(stage.state() != COMPLETE for stage in extract.values()):
        return graph, False
    train, val = extract["train"].output, extract["val"].output
    base = [nodes["train"], nodes["val"]]
    n_classes = extract["val"].dataset.n_classes
    probe_args = dict(n_classes=n_classes, steps=preset.stego.steps, batch_size=preset.stego.batch_size,
                      linear_lr=preset.probe.linear_lr, cluster_lr=preset.probe.cluster_lr,
                      extra_clusters=preset.probe.extra_clusters, val_every=preset.probe.val_every)

    def probe(label, deps, reducer=None, dim=None, derived=None, seed=0, crf=False):
        params = ProbeParams(seed=seed, crf=crf, **probe_args)
        stage = ProbeStage(cache_root, train, val, params, reducer, dim, derived, device=device, **quiet)
        graph.append(Node(label, stage, base + deps))

    pca_node = knn_node = None
    for seed in seeds:
        if "dino" in methods:
            probe(f"probe dino seed {seed}", [], seed=seed, crf=True)
        for dim in dims:
            if "pca" in methods:
                if pca_node is None:
                    pca_node = Node("reduce pca", ReduceStage(cache_root, train, ReduceParams("pca"), device=device), [nodes["train"]])
                    graph.append(pca_node)
                probe(f"probe pca D={dim} seed {seed}", [pca_node], pca_node.stage, dim, seed=seed)
            if "rp" in methods:
                fit = Node(f"reduce rp D={dim} seed {seed}", ReduceStage(cache_root, train, ReduceParams("rp", dim, seed=seed), device=device), [nodes["train"]])
                graph.append(fit)
                probe(f"probe rp D={dim} seed {seed}", [fit], fit.stage, dim, seed=seed)
            if "hnne" in methods:
                fit_stage = ReduceStage(cache_root, train, ReduceParams("hnne", dim, seed=seed), device=device)
                fit = Node(f"reduce hnne D={dim} seed {seed}", fit_stage, [nodes["train"]])
                projections = [Node(f"project {split} hnne D={dim} seed {seed}", ProjectStage(cache_root, fit_stage, store, False), [fit, nodes[split]])
                               for split, store in (("train", train), ("val", val))]
                graph.extend([fit, *projections])
                probe(f"probe hnne D={dim} seed {seed}", projections, fit_stage, dim, tuple(p.stage for p in projections), seed=seed)
        if "stego" in methods:
            if knn_node is None:
                knn_node = Node("knn", KnnStage(cache_root, train, device=device), [nodes["train"]])
                graph.append(knn_node)
            for dim in dims:
                # With CRF at D_STEGO only, where the paper reports it (Table 2).
                params = stego_params(preset, n_classes, dim, seed=seed, crf=dim == preset.stego.dim)
                stage = TrainStegoStage(cache_root, train, val, knn_node.stage, params, device=device, **quiet)
                graph.append(Node(f"train-stego D={dim} seed {seed}", stage, base + [knn_node]))
    return graph, True


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


def run_study(preset: Preset, cache_root: Path, data_root: Path | None = None, only=None, dims=None, seeds=None,
              device: str = "auto", progress=None) -> dict[str, Any]:
    """Run what is not cached (and what depends on anything recomputed); write the results table."""
    from .pipeline import run_stage
    from .stages.figures import collect_results, results_csv

    ran: set[int] = set()
    counts = {"ran": 0, "cached": 0}
    for phase in range(2):  # extraction first; then the nodes that need the stores
        graph, whole = study_graph(preset, cache_root, data_root, only, dims, seeds, device)
        todo = [n for n in graph if phase == 1 or n.label.startswith("extract")]
        for node in todo:
            if id(node) in ran or (phase == 1 and node.label.startswith("extract")):
                continue
            force = node.stage.state() == COMPLETE and any(u in ran for u in node.upstream())
            if progress is not None:
                progress(node, len(todo))
            result = run_stage(node.stage, force=force)
            counts["cached" if result.skipped else "ran"] += 1
            if not result.skipped:
                ran.add(id(node))
        # Rebuilt stores keep their keys (same inputs, same tokens), so later nodes stay valid.
        ran = set() if phase == 0 else ran
    keys = {n.stage.key for n in graph}
    rows = [r for r in collect_results(cache_root) if r["key"] in keys]
    out = cache_schema.study_dir(cache_root, preset.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.csv").write_text(results_csv(rows))
    return {"graph": graph, "rows": rows, "results": out / "results.csv", **counts}
