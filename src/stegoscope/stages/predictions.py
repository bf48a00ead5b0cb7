"""Per-image predictions of a result (a probe or a trained head) over the val split, kept to be
looked at (``stegoscope report``).

The result's best validation is rebuilt from its artefact (``rebuilt``: its reducer or exported
head, and the best probes of ``probes.pt``), so nothing is retrained and results made before
predictions were kept get theirs too. Each val batch is predicted by ``probing.predict``, the
code the evaluation counts with, without and (where the result was refined) with the CRF. The
cluster prediction is mapped to classes by the assignment the result's ``metrics.json`` was
scored with (255: a pixel of an unmatched cluster).

Files: ``chunk-<i>.npz``, each of ``CHUNK`` val images in order, at label resolution:
``cluster``, ``linear`` (and ``cluster_crf``, ``linear_crf``) as uint8 class maps, and
``<map>_scores`` (N, 2): each image's mIoU over its present classes and its pixel accuracy, in %
(``ops.metrics.image_scores``). Chunks are written atomically as they are done and listed with
their checksums in the manifest; a run killed part way redoes only the chunks it had not written.
:func:`load_predictions` reads them back as one set of arrays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from ..atomic import atomic_write_npz
from ..cache_schema import LABELS, METRICS
from ..models import resolve_device
from ..ops.metrics import image_scores
from ..pipeline import Stage, artefact_state, begin_artefact, load_npz, read_manifest, read_record
from ..probing import CRFPool, Evaluation, predict
from ..progress import console, progress_bar
from ..records import EvalResult, StepScores

UNMATCHED = 255  # a pixel of a cluster the Hungarian matching left without a class
MAPS = ("cluster", "linear")
CHUNK = 64  # val images per file: a killed run loses at most one chunk's work


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

    def execute(self, force: bool) -> int:
        started = time.time()
        metrics = read_record(self.result.output, METRICS, EvalResult)
        device = resolve_device(self.device)
        evaluation = self.result.rebuilt(device)
        arrays = evaluation.source.arrays
        n, (h, w) = len(arrays), arrays.store[LABELS].shape[1:3]
        kept = [("", metrics.best)] + ([("_crf", metrics.best_crf)] if metrics.best_crf is not None else [])
        console.print(f"predictions of {self.result.output.name}: {n} images × {h}×{w} px × {2 * len(kept)} maps = "
                      f"{n * h * w * 2 * len(kept) / 1e6:.1f} MB", highlight=False)
        begin_artefact(self.output)
        chunks = [c for c in range(-(-n // CHUNK)) if force or not chunk_path(self.output, c).exists()]  # the rest: a killed run's
        pool = CRFPool(self.crf_workers) if len(kept) > 1 else None
        try:
            with torch.no_grad(), progress_bar("img", self.show_progress) as bar:
                task = bar.add_task("predict", total=n * len(kept), completed=(-(-n // CHUNK) - len(chunks)) * CHUNK * len(kept))
                for c in chunks:
                    rows = np.arange(c * CHUNK, min((c + 1) * CHUNK, n))
                    chunk: dict[str, np.ndarray] = {}
                    for suffix, scores in kept:
                        chunk |= self._predicted(evaluation, scores, rows, pool if suffix else None, suffix, device)
                        bar.advance(task, len(rows))
                    atomic_write_npz(chunk_path(self.output, c), chunk)
        finally:
            if pool is not None:
                pool.close()
        self.publish(started, {}, dataset=arrays.store.attrs.dataset, method=self.method)
        return len(chunks)

    def _predicted(self, evaluation: Evaluation, scores: StepScores, rows: np.ndarray, crf: CRFPool | None, suffix: str,
                   device: torch.device) -> dict[str, np.ndarray]:
        """The ``rows``' linear and mapped cluster predictions (± the CRF), and their per-image scores."""
        source, n_classes = evaluation.source, evaluation.probes.n_classes
        assignment = np.asarray(scores.probes["cluster"].assignment)
        to_class = np.where(assignment >= 0, assignment, UNMATCHED).astype(np.uint8)
        labels = source.arrays.rows(LABELS, rows)
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(rows), self.batch):
            batch = rows[start : start + self.batch]
            linear, cluster = (np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p) for p in
                               predict(source, evaluation.probes, device, batch, labels.shape[1:3], crf))
            out.setdefault(f"linear{suffix}", []).append(linear.astype(np.uint8))
            out.setdefault(f"cluster{suffix}", []).append(to_class[cluster])
        out = {name: np.concatenate(parts) for name, parts in out.items()}
        for name in MAPS:
            maps = np.where(out[f"{name}{suffix}"] == UNMATCHED, -1, out[f"{name}{suffix}"].astype(np.int64))
            out[f"{name}{suffix}_scores"] = np.array([image_scores(m, t, n_classes) for m, t in zip(maps, labels)], np.float32)
        return out


def chunk_path(directory: Path, chunk: int) -> Path:
    return directory / f"chunk-{chunk:05d}.npz"


def load_predictions(directory: Path) -> dict[str, np.ndarray]:
    """A predictions artefact's arrays, every chunk checked against the manifest, in image order."""
    manifest = read_manifest(directory)
    chunks = sorted(name for name in manifest.files if name.startswith("chunk-")) if manifest is not None else []
    if not chunks:
        raise cache_schema.StoreError(f"{directory}: no finished predictions; run `stegoscope study` again")
    parts = [load_npz(directory, name) for name in chunks]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
