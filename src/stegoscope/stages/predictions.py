"""Per-image predictions of a result (a probe or a trained head) over the val split, kept to be
looked at (``stegoscope report``).

The result's best validation is rebuilt from its artefact (``rebuilt``: its reducer or exported
head, and the best probes of ``probes.pt``), so nothing is retrained and results made before
predictions were kept get theirs too. Each val batch is predicted by ``probing.predict``, the
code the evaluation counts with, without and (where the result was refined) with the CRF. The
cluster prediction is mapped to classes by the assignment the result's ``metrics.json`` was
scored with (255: a pixel of an unmatched cluster).

Payload (``payload.npz``), at label resolution, one row per val image: ``cluster``, ``linear``
(and ``cluster_crf``, ``linear_crf``) as uint8 class maps, and ``<map>_scores`` (N, 2): each
image's mIoU over its present classes and its pixel accuracy, in % (``ops.metrics.image_scores``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from ..cache_schema import LABELS, METRICS, PAYLOAD
from ..models import resolve_device
from ..ops.metrics import image_scores
from ..pipeline import Stage, artefact_state, read_record
from ..probing import CRFPool, Evaluation, predict
from ..progress import console, progress_bar
from ..records import EvalResult, StepScores

UNMATCHED = 255  # a pixel of a cluster the Hungarian matching left without a class
MAPS = ("cluster", "linear")


class PredictionsStage(Stage):
    name = "predictions"
    version = 1

    def __init__(self, cache_root: Path, result: Stage, device: str = "auto", crf_workers: int = 2, show_progress: bool = True,
                 batch: int = 8):
        super().__init__(cache_root)
        self.result, self.method = result, result.method
        self.device, self.crf_workers, self.show_progress, self.batch = device, crf_workers, show_progress, batch

    def params(self) -> dict[str, Any]:
        return {}

    def upstream(self) -> dict[str, Stage]:
        return {"result": self.result}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, self.result.output.name.rsplit("-", 1)[0], self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> dict[str, np.ndarray]:
        started = time.time()
        metrics = read_record(self.result.output, METRICS, EvalResult)
        evaluation = self.result.rebuilt(resolve_device(self.device))
        arrays = evaluation.source.arrays
        n, (h, w) = len(arrays), arrays.store[LABELS].shape[1:3]
        kept = [("", metrics.best)] + ([("_crf", metrics.best_crf)] if metrics.best_crf is not None else [])
        console.print(f"predictions of {self.result.output.name}: {n} images × {h}×{w} px × {2 * len(kept)} maps = "
                      f"{n * h * w * 2 * len(kept) / 1e6:.1f} MB", highlight=False)
        payload: dict[str, np.ndarray] = {}
        for suffix, scores in kept:
            payload |= self._predicted(evaluation, scores, crf=bool(suffix), suffix=suffix)
        self.publish(started, {PAYLOAD: payload}, dataset=arrays.store.attrs.dataset, method=self.method)
        return payload

    def _predicted(self, evaluation: Evaluation, scores: StepScores, crf: bool, suffix: str) -> dict[str, np.ndarray]:
        """Every val image's linear and mapped cluster prediction, and their per-image scores."""
        source, device = evaluation.source, resolve_device(self.device)
        n, n_classes = len(source.arrays), evaluation.probes.n_classes
        assignment = np.asarray(scores.probes["cluster"].assignment)
        to_class = np.where(assignment >= 0, assignment, UNMATCHED).astype(np.uint8)
        out = {f"{name}{suffix}": np.empty((n, *source.arrays.store[LABELS].shape[1:3]), np.uint8) for name in MAPS}
        pool = CRFPool(self.crf_workers) if crf else None
        try:
            with torch.no_grad(), progress_bar("img", self.show_progress) as bar:
                task = bar.add_task(f"predict{' with the CRF' if crf else ''}", total=n)
                for start in range(0, n, self.batch):
                    rows = np.arange(start, min(start + self.batch, n))
                    labels = source.arrays.tensor(LABELS, rows, device)
                    linear, cluster = (np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p) for p in
                                       predict(source, evaluation.probes, device, rows, labels, pool))
                    out[f"linear{suffix}"][rows] = linear
                    out[f"cluster{suffix}"][rows] = to_class[cluster]
                    bar.advance(task, len(rows))
        finally:
            if pool is not None:
                pool.close()
        labels = source.arrays.rows(LABELS, np.arange(n))
        for name in MAPS:
            maps = out[f"{name}{suffix}"].astype(np.int64)
            maps[maps == UNMATCHED] = -1
            out[f"{name}{suffix}_scores"] = np.array([image_scores(maps[i], labels[i], n_classes) for i in range(n)], np.float32)
        return out
