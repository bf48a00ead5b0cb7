"""Unsupervised segmentation metrics (reference §8): confusion matrix, Hungarian matching,
mIoU, pixel accuracy, per-class IoU / precision / recall — accumulated chunk by chunk.

Confusion rows are predictions (cluster or class), columns ground truth. Labels outside
``[0, n_classes)`` are ignored. Parity [QUIRK]: predictions ``>= n_classes`` (extra clusters) are
dropped as well, so extra-cluster pixels are excluded rather than counted as errors;
``extra_as_errors=True`` keeps them and counts unmatched-cluster pixels as misses instead.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def confusion(preds: np.ndarray, target: np.ndarray, n_classes: int, n_predicted: int | None = None,
              extra_as_errors: bool = False) -> np.ndarray:
    """(n_predicted, n_classes) int64 counts, rows = prediction, columns = truth.

    ``preds`` and ``target`` are numpy arrays or torch tensors; tensors are counted on their own
    device (a GPU) and only the counts come back.
    """
    n_predicted = n_predicted or n_classes
    tensors = isinstance(preds, torch.Tensor)
    if tensors:  # the same arithmetic, without copying label maps to the host
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
    else:
        preds, target = np.asarray(preds).ravel().astype(np.int64), np.asarray(target).ravel().astype(np.int64)
    limit = n_predicted if extra_as_errors else n_classes
    keep = (target >= 0) & (target < n_classes) & (preds >= 0) & (preds < limit)
    flat = preds[keep] * n_classes + target[keep]
    if tensors:
        return torch.bincount(flat, minlength=n_predicted * n_classes).cpu().numpy().reshape(n_predicted, n_classes)
    return np.bincount(flat, minlength=n_predicted * n_classes).reshape(n_predicted, n_classes)


def hungarian(stats: np.ndarray) -> np.ndarray:
    """cluster → matched class (−1 for unmatched clusters), maximising matched pixels."""
    rows, cols = linear_sum_assignment(stats, maximize=True)
    mapping = np.full(stats.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_histogram(stats: np.ndarray, mapping: np.ndarray, extra_as_errors: bool = False) -> np.ndarray:
    """Square histogram whose row k is the cluster matched to class k.

    Unmatched clusters, if any, become one extra row: with a zero column appended (the
    reference's "Extra" class) by default, or kept as an unmatched-pixel row (``extra_as_errors``).
    """
    n_classes = stats.shape[1]
    hist = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cluster, cls in enumerate(mapping):
        if cls >= 0:
            hist[cls] += stats[cluster]
    unmatched = stats[mapping < 0].sum(axis=0)
    if (mapping < 0).any():
        if extra_as_errors:
            return np.vstack([hist, unmatched[None]])  # (n+1, n): misses, no class of their own
        hist = np.vstack([hist, unmatched[None]])
        hist = np.hstack([hist, np.zeros((n_classes + 1, 1), dtype=np.int64)])
    return hist


def scores(hist: np.ndarray) -> dict:
    """mIoU (over classes whose IoU is defined), pixel accuracy and per-class values, in %."""
    n = hist.shape[1]
    tp = np.diag(hist[:n, :n]).astype(np.float64)
    truth = hist.sum(axis=0).astype(np.float64)  # pixels per true class (extra-row misses included)
    predicted = hist[:n].sum(axis=1).astype(np.float64)  # pixels predicted as each class
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (truth + predicted - tp)
        precision = tp / predicted
        recall = tp / truth
    return {
        "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
        "Accuracy": float(tp.sum() / hist.sum() * 100) if hist.sum() else float("nan"),
        "per_class_iou": (iou * 100).tolist(),
        "per_class_precision": (precision * 100).tolist(),
        "per_class_recall": (recall * 100).tolist(),
    }


class SegmentationMetrics:
    """Accumulates a confusion matrix over chunks; ``compute`` matches (cluster) or not (linear)."""

    def __init__(self, n_classes: int, extra_clusters: int = 0, hungarian: bool = False, extra_as_errors: bool = False):
        self.n_classes, self.extra, self.use_hungarian, self.extra_as_errors = n_classes, extra_clusters, hungarian, extra_as_errors
        self.stats = np.zeros((n_classes + extra_clusters, n_classes), dtype=np.int64)

    def update(self, preds: np.ndarray, target: np.ndarray) -> None:
        self.stats += confusion(preds, target, self.n_classes, self.n_classes + self.extra, self.extra_as_errors)

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        self.stats += other.stats
        return self

    def compute(self) -> dict:
        if not self.use_hungarian:
            return scores(self.stats[: self.n_classes]) | {"assignment": list(range(self.n_classes))}
        mapping = hungarian(self.stats)
        hist = matched_histogram(self.stats, mapping, self.extra_as_errors)
        out = scores(hist)
        if hist.shape[1] > self.n_classes:  # the reference's extra class: report the real classes only
            for key in ("per_class_iou", "per_class_precision", "per_class_recall"):
                out[key] = out[key][: self.n_classes]
        return out | {"assignment": mapping.tolist()}
