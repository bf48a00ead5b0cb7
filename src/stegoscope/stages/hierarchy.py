"""h-NNE's own hierarchy as the clusterer (the paper's supplementary §2).

An h-NNE fit builds a hierarchy of partitions (FINCH) of its fit tokens. Every level gives a
cluster id to every val token by h-NNE's own rule for new points: the nearest finest-level centroid
(cosine, in the fit's standardised space), then that centroid's cluster at each level. The ids
are upsampled to the labels (nearest) and every level is evaluated the three ways of
:meth:`ops.metrics.SegmentationMetrics.compute_modes`: Hungarian dropping clusters ≥ K (STEGO's
[QUIRK]; meaningless for arbitrary ids, kept for completeness), Hungarian with unmatched clusters
as errors, and many-to-one (which reads the val labels: reported apart).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import cache_schema
from .. import methods as registry
from ..cache_schema import LABELS, METRICS, TOKENS, open_complete_store
from ..models import resolve_device
from ..ops.metrics import SegmentationMetrics
from ..pipeline import Stage, artefact_state
from ..probing import StoreArrays, load_reducer
from ..progress import progress_bar
from ..records import EvalResult, LevelScores

MODES = ("drop", "errors", "many_to_one")


def hierarchy_of(reducer) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(finest-level centroids (n0, C), each one's cluster at every level (n0, L), clusters per
    level) of a fitted h-NNE reducer."""
    return np.asarray(reducer.map_.anchors, dtype=np.float32), np.asarray(reducer.anchor_levels_), reducer.level_sizes_.tolist()


@torch.no_grad()
def evaluate_levels(reducer, arrays: StoreArrays, n_classes: int, device: torch.device, batch: int = 8,
                    progress=None) -> list[dict[str, Any]]:
    """Every level's metrics, in each mode, over every image of ``arrays`` (tokens and labels)."""
    centroids, levels, sizes = hierarchy_of(reducer)
    unit = F.normalize(torch.from_numpy(centroids).to(device), dim=1)
    ids_of = torch.from_numpy(levels.astype(np.int64)).to(device)
    metrics = [SegmentationMetrics(n_classes, max(size - n_classes, 0), hungarian=True) for size in sizes]
    for start in range(0, len(arrays), batch):
        rows = np.arange(start, min(start + batch, len(arrays)))
        tokens = arrays.rows(TOKENS, rows)
        z = torch.from_numpy(reducer.standardized(tokens)).to(device)
        nearest = (F.normalize(z, dim=-1) @ unit.T).argmax(dim=-1)  # (B, h, w)
        labels = arrays.tensor(LABELS, rows, device)
        ids = F.interpolate(ids_of[nearest].permute(0, 3, 1, 2).float(), size=labels.shape[-2:], mode="nearest").long()
        for level, m in enumerate(metrics):
            m.update(ids[:, level], labels)
        if progress is not None:
            progress(len(rows))
    out = []
    for level, (size, m) in enumerate(zip(sizes, metrics)):
        modes = m.compute_modes()
        out.append({"level": level, "clusters": size, **{mode: {k: modes[mode][k] for k in ("mIoU", "Accuracy")} for mode in MODES}})
    return out


class HierarchyStage(Stage):
    name = "hierarchy"
    version = 1

    def __init__(self, cache_root: Path, fit: Stage, val: Stage, n_classes: int, device: str = "auto", show_progress: bool = True):
        super().__init__(cache_root)
        self.fit, self.val, self.n_classes, self.device, self.show_progress = fit, val, n_classes, device, show_progress
        self.method = registry.hierarchy_method()

    def params(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "assignment": "nearest finest-level centroid (cosine)"}

    def upstream(self) -> dict[str, Stage]:
        return {"fit": self.fit, "val": self.val}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, f"{self.method}{self.fit.dim}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> list[dict[str, Any]]:
        started = time.time()
        val = open_complete_store(self.val.output)
        reducer = load_reducer(self.fit.output)
        device = resolve_device(self.device)
        arrays = StoreArrays(val, (TOKENS, LABELS), device=device)
        with progress_bar("img", self.show_progress) as bar:
            task = bar.add_task("h-NNE hierarchy levels", total=len(arrays))
            levels = evaluate_levels(reducer, arrays, self.n_classes, device, progress=lambda n: bar.advance(task, n))
        result = EvalResult(levels=[LevelScores.from_dict(level) for level in levels])
        self.publish(started, {METRICS: result}, dataset=val.attrs.dataset, method=self.method, code_dim=self.fit.dim)
        return levels
