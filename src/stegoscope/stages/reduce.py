"""Fit a registered reducer (PCA, random projection, h-NNE, …) on a train token store; project
whole stores through reducers whose transform is too slow to run per batch (h-NNE).

``reduce`` writes one artefact per fit: ``payload.npz`` (the reducer's fitted arrays), then
``manifest.json`` last. A reducer that serves every D (PCA keeps every component) leaves D out
of its key, so one fit serves every D. ``project`` writes the codes of whole train and val
stores once, shard by shard (resumable; each shard a dask task on the study's scheduler), into
derived stores keyed by the fit.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import dask
import numpy as np

from .. import cache_schema
from .. import methods as registry
from ..cache_schema import IDS, POOLED, TOKENS, FeatureStore, StoreLayout, open_complete_store
from ..compute import distributed_workers
from ..models import resolve_device
from ..pipeline import Stage, artefact_state, package_versions, store_state
from ..probing import load_reducer
from ..progress import progress_bar
from ..records import StoreAttrs
from ..reducers import Reducer
from ..storage import as_path, stamp


class ReduceStage(Stage):
    """One fit of the registered reducer ``method`` with ``params`` (its dataclass) on the train
    store of ``train``; ``dim`` is ignored by reducers that serve every D, ``seed`` by those whose
    fit it does not change (unless a ``max_images`` subset is drawn)."""

    name = "reduce"
    recorded_as = "fit"
    version = 2

    def __init__(self, cache_root: Path, train: Stage, method: str, params: Any, dim: int | None = None, seed: int = 0,
                 device: str = "auto"):
        super().__init__(cache_root)
        self.method, self.p, self.train, self.device = method, params, train, device
        self.cls: type[Reducer] = registry.get(method).cls
        if not self.cls.needs_fit:
            raise ValueError(f"{method} needs no fit")
        if not self.cls.serves_every_dim and not dim:
            raise ValueError(f"a dimension D is required for {method} (--dim)")
        self.dim = None if self.cls.serves_every_dim else dim
        self.max_images = getattr(params, "max_images", None)
        self.seed = seed if self.cls.seeded or self.max_images else None

    def params(self) -> dict[str, Any]:
        return {"method": self.method, "dim": self.dim, "seed": self.seed, **asdict(self.p), **self.cls.fit_info()}

    def upstream(self) -> dict[str, Stage]:
        return {"train": self.train}

    @property
    def output(self) -> Path:
        label = self.method if self.dim is None else f"{self.method}{self.dim}"
        return cache_schema.artefact_dir(self.cache_root, self.name, label, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> Reducer:
        started = time.time()
        store = open_complete_store(self.train.output)
        device = resolve_device(self.device).type
        images = None
        if self.max_images and self.max_images < len(store):
            images = np.random.default_rng(self.seed).choice(len(store), self.max_images, replace=False)
        reducer = self.cls.from_params(self.p, self.dim, self.seed or 0, device).fit(store.token_matrix(images))
        self.publish(started, {cache_schema.PAYLOAD: reducer.state_dict()}, method=self.method, reducer_class=self.cls.method,
                     reducer=reducer.params(), store=str(store.path), dataset=store.attrs.dataset,
                     versions=package_versions(("stegoscope", "numpy", "dask", *self.cls.packages)))
        return reducer


class ProjectStage(Stage):
    """A store's tokens mapped through a fitted reducer into a derived store of codes."""

    name = "project"
    version = 1

    def __init__(self, cache_root: Path, fit: ReduceStage, source: Stage, show_progress: bool = True):
        super().__init__(cache_root)
        self.fit, self.source, self.show_progress = fit, source, show_progress

    def params(self) -> dict[str, Any]:
        return {}

    def upstream(self) -> dict[str, Stage]:
        return {"reducer": self.fit, "source": self.source}

    @property
    def output(self) -> Path:
        return cache_schema.derived_store_path(self.cache_root, self.source.output, self.fit.key)

    def state(self) -> str:
        return store_state(self.output, self.key)

    @cached_property
    def source_store(self) -> FeatureStore:
        return open_complete_store(self.source.output)

    def execute(self, force: bool):
        reducer = load_reducer(self.fit.output)
        source = self.source_store
        src = source.layout
        store = None if force else cache_schema.resume_store(self.output, self.key)
        if store is None:
            width = reducer.n_components or reducer.transform(source[TOKENS][0:1]).shape[-1]  # PCA of every D: all components
            layout = StoreLayout(src.n_images, src.grid, width, src.pixels, False, False, src.shard_images, "float32")
            given = source.attrs
            attrs = StoreAttrs(key=self.key, stage=self.name, stage_version=self.version,
                               params={"reducer": self.fit.key}, inputs=self.inputs(), dataset=given.dataset, split=given.split,
                               source_store=str(source.path), method=self.fit.method, versions=package_versions())
            store = cache_schema.create_feature_store(self.output, layout, attrs)
        pending = store.pending_shards()
        # Each shard is a dask task on the active scheduler (threads, a local or remote cluster):
        # it reads its rows and the fit by their paths and writes and flags its shard itself.
        group = distributed_workers() or dask.config.get("num_workers", None) or os.cpu_count() or 1
        with progress_bar("img", self.show_progress) as bar:
            task = bar.add_task(f"project {source.attrs.split}", total=src.n_images)
            bar.advance(task, src.n_images - sum(_rows(src, s) for s in pending))
            for start in range(0, len(pending), group):
                shards = pending[start : start + group]
                dask.compute(*[dask.delayed(project_shard)(str(source.path), str(self.output), str(self.fit.output), shard)
                               for shard in shards])
                bar.advance(task, sum(_rows(src, s) for s in shards))
        store = cache_schema.open_feature_store(self.output, mode="r+", verify=False)
        store.mark_complete(self.held)
        return store


def project_shard(source: str, output: str, fit: str, shard: int) -> int:
    """Project one shard of the ``source`` store through the fit at ``fit`` into ``output`` (a task)."""
    fitted = _fitted(fit, stamp(as_path(fit) / cache_schema.MANIFEST))  # a refit at the same path is another fit
    store, reducer = cache_schema.open_feature_store(as_path(output), mode="r+", verify=False), fitted
    rows = store.layout.shard_slice(shard)
    tokens = cache_schema.open_feature_store(as_path(source), verify=False)
    codes = reducer.transform(tokens[TOKENS][rows])
    store.write_shard(shard, {TOKENS: codes, POOLED: codes.mean(axis=(1, 2)), IDS: tokens[IDS][rows]})
    return shard


@lru_cache(maxsize=4)
def _fitted(fit: str, stamp: str) -> Reducer:
    """A worker loads each fit once."""
    return load_reducer(as_path(fit))


def _rows(layout: StoreLayout, shard: int) -> int:
    sl = layout.shard_slice(shard)
    return sl.stop - sl.start
