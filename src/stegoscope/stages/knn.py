"""kNN pairs: cosine top-k neighbours of each train image's pooled descriptor (reference §3).

On a GPU the row blocks run there in this process; otherwise as dask tasks on the study's
scheduler (``--scheduler threads|local-cluster|tcp://…``): a task per block of similarities and
a tree reduction of the top-k, the same neighbours on every scheduler.

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
from ..cache_schema import NNS, POOLED, open_complete_store
from ..models import resolve_device
from ..ops.knn import knn_blocked, knn_tree
from ..pipeline import Stage, artefact_state
from ..storage import as_path


class KnnStage(Stage):
    name = "knn"
    version = 1

    def __init__(self, cache_root: Path, train: Stage, k: int = 30, block: int = 1024, device: str = "auto"):
        super().__init__(cache_root)
        self.train, self.k, self.block, self.device = train, k, block, device

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "descriptor": "mean_patch_token_l2", "similarity": "cosine"}

    def upstream(self) -> dict[str, Stage]:
        return {"train": self.train}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, f"knn{self.k}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> np.ndarray:
        started = time.time()
        store = open_complete_store(self.train.output)
        device = resolve_device(self.device)
        if device.type == "cuda":  # one process, row blocks on the GPU
            nns = knn_blocked(store[POOLED][:], self.k, self.block, device.type)
        else:  # dask tasks on the active scheduler, each reading its rows from the store by its path
            nns = knn_tree(_pooled_blocks(store, self.block), self.k, self.block)
        self.publish(started, {cache_schema.PAYLOAD: {NNS: nns}}, store=str(store.path))
        return nns



def _pooled_blocks(store, block: int):
    """The store's pooled descriptors as a dask array whose blocks are read by the store's path,
    through its checked reads (a damaged chunk is named, with its fix, and recorded)."""
    import dask
    import dask.array as da

    n, c = store[POOLED].shape
    read = dask.delayed(_pooled_rows, pure=True)
    return da.concatenate([da.from_delayed(read(str(store.path), start, min(start + block, n)), (min(start + block, n) - start, c),
                                           np.float32) for start in range(0, n, block)])


def _pooled_rows(path: str, start: int, stop: int) -> np.ndarray:
    return cache_schema.open_feature_store(as_path(path), verify=False)[POOLED][start:stop]
