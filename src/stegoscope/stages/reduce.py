"""Fit PCA / random projection / h-NNE on a train token store; project stores with h-NNE.

``reduce`` writes one artefact per fit: ``payload.npz`` (the reducer's fitted arrays), then
``manifest.json`` last. A PCA fit keeps every component, so its key leaves out D and one fit
serves every D. h-NNE's transform is expensive, so ``project`` writes the codes of whole train
and val stores once, shard by shard (resumable), into derived stores keyed by the fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import cache_schema
from ..cache_schema import IDS, POOLED, TOKENS, StoreError, StoreLayout
from ..models import resolve_device
from ..atomic import atomic_write_npz
from ..pipeline import Stage, artefact_state, begin_artefact, load_npz, package_versions, read_manifest, store_state, write_manifest
from ..progress import progress_bar
from ..reducers import HNNE, PCA, REDUCERS, RandomProjection, Reducer, hnne_version

METHODS = ("pca", "rp", "hnne")


@dataclass(frozen=True)
class ReduceParams:
    method: str
    dim: int | None = None  # not part of a PCA fit
    standardize: str = "train"
    max_images: int | None = None  # seeded subset of train images (the study: 5000)
    seed: int = 0
    rp: str = "gaussian"
    fit_tokens: int = 1_000_000  # h-NNE sample

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, not {self.method!r}")
        if self.method != "pca" and not self.dim:
            raise ValueError(f"--dim is required for {self.method}")


def open_complete_store(path: Path):
    store = cache_schema.open_feature_store(path)
    if not store.complete:
        raise StoreError(f"{path}: extraction is not complete; rerun `stegoscope extract` for it")
    return store


def load_reducer(artefact: Path, n_components: int | None = None) -> Reducer:
    """A fitted reducer from its artefact directory (``n_components`` truncates a PCA)."""
    manifest = read_manifest(artefact)
    if manifest is None:
        raise StoreError(f"{artefact}: no manifest, so the fit did not finish; rerun `stegoscope reduce`")
    state = load_npz(artefact)
    reducer = REDUCERS[manifest["method"]].from_state(manifest["reducer"], state)
    if n_components is not None and isinstance(reducer, PCA):
        reducer = reducer.with_components(n_components)
    return reducer


class ReduceStage(Stage):
    name = "reduce"
    version = 1

    def __init__(self, cache_root: Path, train_store: Path, params: ReduceParams, device: str = "auto"):
        super().__init__(cache_root)
        self.store = open_complete_store(train_store)
        self.p = params
        self.device = device

    def params(self) -> dict[str, Any]:
        p = self.p
        out: dict[str, Any] = {"method": p.method, "standardize": p.standardize}
        if p.method == "pca":
            out |= {"max_images": p.max_images, "seed": p.seed if p.max_images else None}
        elif p.method == "rp":
            out |= {"dim": p.dim, "kind": p.rp, "seed": p.seed}
        else:
            out |= {"dim": p.dim, "fit_tokens": p.fit_tokens, "seed": p.seed, "max_images": p.max_images,
                    "hnne": hnne_version(), "algorithm": "v1", "metric": "cosine", "radius": 0.4, "ann_threshold": 40_000}
        return out

    def inputs(self) -> list[str]:
        return [self.store.key]

    @property
    def output(self) -> Path:
        label = self.p.method if self.p.method == "pca" else f"{self.p.method}{self.p.dim}"
        return cache_schema.artefact_dir(self.cache_root, self.name, label, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def make_reducer(self, device: str) -> Reducer:
        p = self.p
        if p.method == "pca":
            return PCA(standardize=p.standardize, device=device)
        if p.method == "rp":
            return RandomProjection(p.dim, kind=p.rp, seed=p.seed, standardize=p.standardize, device=device)
        return HNNE(p.dim, fit_tokens=p.fit_tokens, seed=p.seed, standardize=p.standardize)

    def execute(self, force: bool) -> Reducer:
        started = time.time()
        device = resolve_device(self.device).type
        images = None
        if self.p.max_images and self.p.max_images < len(self.store):
            images = np.random.default_rng(self.p.seed).choice(len(self.store), self.p.max_images, replace=False)
        reducer = self.make_reducer(device).fit(self.store.token_matrix(images))
        begin_artefact(self.output)
        atomic_write_npz(self.output / cache_schema.PAYLOAD, reducer.state_dict())
        write_manifest(self.output, {
            "key": self.key, "stage": self.name, "stage_version": self.version, "method": self.p.method,
            "params": self.params(), "inputs": self.inputs(), "train_store": str(self.store.path),
            "dataset": self.store.attrs["params"]["dataset"],
            "reducer": reducer.params(), "started": started, "finished": time.time(),
            "seconds": time.time() - started, "versions": package_versions(("stegoscope", "numpy", "dask", "hnne")),
        })
        return reducer


class ProjectStage(Stage):
    """A store's tokens mapped through a fitted reducer into a derived store of codes."""

    name = "project"
    version = 1

    def __init__(self, cache_root: Path, reducer: ReduceStage, source_store: Path, show_progress: bool = True):
        super().__init__(cache_root)
        self.artefact, self.reducer_key = reducer.output, reducer.key
        self.source = open_complete_store(source_store)
        self.show_progress = show_progress

    def params(self) -> dict[str, Any]:
        return {}

    def inputs(self) -> list[str]:
        return [self.reducer_key, self.source.key]

    @property
    def output(self) -> Path:
        return cache_schema.derived_store_path(self.cache_root, self.source.path, self.reducer_key)

    def state(self) -> str:
        return store_state(self.output, self.key)

    def execute(self, force: bool):
        reducer = load_reducer(self.artefact)
        src = self.source.layout
        store = None if force else cache_schema.resume_store(self.output, self.key)
        if store is None:
            layout = StoreLayout(src.n_images, src.grid, reducer.n_components, src.pixels, False, False, src.shard_images, "float32")
            attrs = {"key": self.key, "stage": self.name, "stage_version": self.version, "spec": {"reducer": self.reducer_key},
                     "inputs": self.inputs(), "source_store": str(self.source.path), "versions": package_versions()}
            store = cache_schema.create_feature_store(self.output, layout, attrs)
        pending = store.pending_shards()
        with progress_bar("img", self.show_progress) as bar:
            task = bar.add_task(f"project {self.source.attrs['params']['split']}", total=src.n_images)
            bar.advance(task, src.n_images - sum(_rows(src, s) for s in pending))
            for shard in pending:
                sl = src.shard_slice(shard)
                codes = reducer.transform(self.source[TOKENS][sl])
                store.write_shard(shard, {TOKENS: codes, POOLED: codes.mean(axis=(1, 2)), IDS: self.source[IDS][sl]})
                bar.advance(task, sl.stop - sl.start)
        store.mark_complete()
        return store


def _rows(layout: StoreLayout, shard: int) -> int:
    sl = layout.shard_slice(shard)
    return sl.stop - sl.start
