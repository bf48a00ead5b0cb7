"""kNN pairs: cosine top-k neighbours of each train image's pooled descriptor (reference §3).

With five-crop stores the neighbours are found among crops, as STEGO. Descriptors are the
pre-dropout tokens' mean (STEGO left dropout on while computing them [QUIRK]; the cache holds the
clean feature).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import cache_schema
from ..cache_schema import POOLED
from ..models import resolve_device
from ..ops.knn import knn_blocked
from ..atomic import atomic_write_npz
from ..pipeline import Stage, artefact_state, begin_artefact, load_npz, package_versions, write_manifest
from .reduce import open_complete_store

NNS = "nns"


class KnnStage(Stage):
    name = "knn"
    version = 1

    def __init__(self, cache_root: Path, store: Path, k: int = 30, block: int = 1024, device: str = "auto"):
        super().__init__(cache_root)
        self.store, self.k, self.block, self.device = open_complete_store(store), k, block, device

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "descriptor": "mean_patch_token_l2", "similarity": "cosine"}

    def inputs(self) -> list[str]:
        return [self.store.key]

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, f"knn{self.k}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> np.ndarray:
        started = time.time()
        nns = knn_blocked(self.store[POOLED][:], self.k, self.block, resolve_device(self.device).type)
        begin_artefact(self.output)
        atomic_write_npz(self.output / cache_schema.PAYLOAD, ({NNS: nns}))
        write_manifest(self.output, {"key": self.key, "stage": self.name, "stage_version": self.version,
                                     "params": self.params(), "inputs": self.inputs(), "store": str(self.store.path),
                                     "started": started, "finished": time.time(), "versions": package_versions()})
        return nns


def load_knn(artefact: Path) -> np.ndarray:
    return load_npz(artefact)[NNS]
