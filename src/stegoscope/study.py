"""The study's stage graph built from a preset: the only place that composes stages."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import cache_schema
from .config import ConfigError, Preset
from .data import write_synthetic
from .pipeline import canonical_json
from .pipeline import COMPLETE
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
    stages = []
    for split in splits or list(preset.splits):
        if split not in preset.splits:
            raise ConfigError(f"preset {preset.name!r} has no split {split!r}; it has {list(preset.splits)}")
        cfg = preset.splits[split]
        if res and split in res:
            cfg = replace(cfg, res=res[split])
        params = ExtractParams(
            dataset=preset.dataset, split=split, res=cfg.res, backbone=preset.backbone, weights=preset.weights,
            seed=preset.seed, interpolation=preset.interpolation, n_classes=preset.n_classes,
            store_images=cfg.store_images, crop=cfg.crop, skip_bad=skip_bad,
            flip=cfg.flip or (flip and split != "train"),
        )
        run_options = {"batch_size": preset.batch_size, "shard_images": preset.shard_images, **options}
        stages.append(ExtractStage(cache_root, root, params, **run_options))
    return stages


def complete_store(stage: ExtractStage) -> Path:
    """The store of an extraction stage, which must have finished."""
    if stage.state() != COMPLETE:
        raise ConfigError(
            f"{stage.p.dataset}/{stage.p.split} tokens are not extracted yet ({stage.output}); "
            "run `stegoscope extract` with the same preset and options first"
        )
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
        if fit[0].state() != COMPLETE:
            raise ConfigError(f"no {reducer} fit in the cache yet; run `stegoscope reduce --method {reducer}` first")
        artefact = fit[0].output
        if reducer == "hnne":
            derived = tuple(s.output for s in fit[1:])
            if any(s.state() != COMPLETE for s in fit[1:]):
                raise ConfigError("the h-NNE projections are not complete; rerun `stegoscope reduce --method hnne`")
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


def train_stego_stage(
    preset: Preset, cache_root: Path, data_root: Path | None = None, dim: int | None = None, steps: int | None = None,
    seed: int = 0, readd_global_mean: bool = True, knn_options: dict | None = None, **options: Any,
) -> tuple[KnnStage, TrainStegoStage]:
    """The kNN stage and the STEGO head training on the preset's stores (Table 1 parameters)."""
    extract = {s.p.split: s for s in feature_stages(preset, cache_root, data_root, show_progress=False)}
    knn = KnnStage(cache_root, complete_store(extract["train"]), **(knn_options or {}))
    val = complete_store(extract["val"])
    cfg = preset.stego
    params = TrainStegoParams(
        n_classes=len(cache_schema.open_feature_store(val).attrs["class_names"]), dim=dim or cfg.dim,
        steps=steps or cfg.steps, batch_size=cfg.batch_size, lambda_self=cfg.lambda_self, lambda_knn=cfg.lambda_knn,
        lambda_rand=cfg.lambda_rand, b_self=cfg.b_self, b_knn=cfg.b_knn, b_rand=cfg.b_rand, pointwise=cfg.pointwise,
        zero_clamp=cfg.zero_clamp, readd_global_mean=readd_global_mean, lr=cfg.lr, probe_lr=preset.probe.linear_lr,
        dropout=cfg.dropout, feature_samples=cfg.feature_samples, neg_samples=cfg.neg_samples,
        knn_neighbors=cfg.knn_neighbors, extra_clusters=preset.probe.extra_clusters, val_every=preset.probe.val_every, seed=seed,
    )
    return knn, TrainStegoStage(cache_root, complete_store(extract["train"]), val, knn, params, **options)
