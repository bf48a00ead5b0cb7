"""PriMaPs' principal mask proposals, computed once per train image (``successors/primaps.md`` §2).

Each image's raw tokens give class-agnostic masks (first principal direction of the uncovered
tokens, nearest-token anchor, cosine ≥ ``threshold``, until ``coverage`` of the grid is covered),
median-filtered and refined by the dense CRF on the image; the result is a uint8 map of mask ids
(255: no mask) at the store's pixel size. The train store must hold its images (``store_images``).

Images run in worker processes (the CRF is CPU work), ``CHUNK`` images to a file, each written
atomically: a rerun after a crash computes only the chunks that are missing. The ids are read
back as one memory-mapped (N, H, W) array.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import cache_schema
from ..atomic import atomic_write_npy
from ..cache_schema import IMAGES, TOKENS, StoreError, load_mask_ids, mask_ids_path, open_complete_store
from ..pipeline import Stage, artefact_state, begin_artefact
from ..probing import CRFPool
from ..progress import progress_bar
from ..records import MaskSummary
from ..storage import read_npy

CHUNK = 64  # images per file


def proposal_job(job: tuple[np.ndarray, np.ndarray, float, float, float]) -> np.ndarray:
    """(tokens (h, w, C), image (H, W, 3) uint8, threshold, coverage, gain) → (H, W) uint8 ids,
    in a worker process (one torch thread: the pool is the parallelism)."""
    import torch

    from ..ops.primaps import proposal_masks_for_image

    torch.set_num_threads(1)
    tokens, image, threshold, coverage, gain = job
    feats = torch.from_numpy(np.ascontiguousarray(tokens)).float().permute(2, 0, 1)
    return proposal_masks_for_image(feats, image, threshold, coverage=coverage, gain=gain)


class PrimapsMasksStage(Stage):
    name = "primaps-masks"
    version = 1

    def __init__(self, cache_root: Path, train: Stage, threshold: float = 0.4, coverage: float = 0.95, gain: float = 10.0,
                 workers: int = 2, show_progress: bool = True):
        super().__init__(cache_root)
        if not 0 < threshold <= 1 or not 0 < coverage <= 1 or gain <= 0:
            raise ValueError(f"threshold and coverage must be in (0, 1] and gain positive: {threshold}, {coverage}, {gain}")
        self.train, self.threshold, self.coverage, self.gain = train, threshold, coverage, gain
        self.workers, self.show_progress = workers, show_progress

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "coverage": self.coverage, "gain": self.gain, "direction": "exact_pca_signed",
                "median": 3, "crf": "stego_constants"}

    def upstream(self) -> dict[str, Stage]:
        return {"train": self.train}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, "masks", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> np.ndarray:
        started = time.time()
        store = open_complete_store(self.train.output)
        if IMAGES not in store:
            raise StoreError(f"{store.path}: PriMaPs' mask proposals need the train images; declare the split with "
                             "store_images: true (e.g. extract.splits.train_primaps: {split: train, res: 320, store_images: true})")
        begin_artefact(self.output)
        n = len(store)
        pool = CRFPool(self.workers, timeout=600.0)
        counts = []
        try:
            with progress_bar("img", self.show_progress) as bar:
                task = bar.add_task("PriMaPs mask proposals", total=n)
                for chunk, start in enumerate(range(0, n, CHUNK)):
                    rows = slice(start, min(start + CHUNK, n))
                    path = mask_ids_path(self.output, chunk)
                    if path.exists() and not force:  # written atomically by an earlier run
                        ids = read_npy(path, mmap=False)
                    else:
                        tokens, images = store[TOKENS][rows], store[IMAGES][rows]
                        ids = np.stack(pool.run(proposal_job, [(t, i, self.threshold, self.coverage, self.gain)
                                                               for t, i in zip(tokens, images)]))
                        atomic_write_npy(path, ids)
                    counts += [len(np.setdiff1d(np.unique(m), [255])) for m in ids]
                    bar.advance(task, rows.stop - rows.start)
        finally:
            pool.close()
        summary = MaskSummary(n, float(np.mean(counts)), int(np.sum(np.array(counts) == 0)))
        self.publish(started, {cache_schema.METRICS: summary}, store=str(store.path))
        return load_mask_ids(self.output)
