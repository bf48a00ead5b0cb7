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
              extra_as_errors: bool = False) -> np.ndarray | torch.Tensor:
    """(n_predicted, n_classes) int64 counts, rows = prediction, columns = truth.

    ``preds`` and ``target`` are numpy arrays or torch tensors; tensors are counted on their own
    device (a GPU) into a tensor there, without waiting for it: pixels that do not count go to one
    bin past the end, which is dropped, instead of being removed by a boolean index.
    """
    n_predicted = n_predicted or n_classes
    limit = n_predicted if extra_as_errors else n_classes
    if isinstance(preds, torch.Tensor):
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        keep = (target >= 0) & (target < n_classes) & (preds >= 0) & (preds < limit)
        flat = torch.where(keep, preds * n_classes + target, n_predicted * n_classes)
        counts = torch.zeros(n_predicted * n_classes + 1, dtype=torch.int64, device=flat.device)
        return counts.index_add_(0, flat, torch.ones_like(flat))[:-1].view(n_predicted, n_classes)
    preds, target = np.asarray(preds).ravel().astype(np.int64), np.asarray(target).ravel().astype(np.int64)
    keep = (target >= 0) & (target < n_classes) & (preds >= 0) & (preds < limit)
    return np.bincount(preds[keep] * n_classes + target[keep], minlength=n_predicted * n_classes).reshape(n_predicted, n_classes)


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


def image_scores(pred: np.ndarray, target: np.ndarray, n_classes: int) -> tuple[float, float]:
    """One image's (mIoU over the classes present in its ground truth, pixel accuracy), in %, of a
    prediction already mapped to classes (an unmatched cluster, −1, is a miss). Ignored pixels do
    not count; both are NaN for an image without a labelled pixel."""
    target, pred = np.asarray(target).ravel(), np.asarray(pred).ravel()
    labelled = (target >= 0) & (target < n_classes)
    t, p = target[labelled], pred[labelled]
    if not len(t):
        return float("nan"), float("nan")
    present = np.unique(t)
    ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in present]
    return float(np.mean(ious) * 100), float((p == t).mean() * 100)


def many_to_one(stats: np.ndarray) -> np.ndarray:
    """cluster → the class most of its pixels have (−1 for empty clusters): the standard mapping for
    over-clustering. It is fitted on the labels it is scored against, so it is reported apart."""
    return np.where(stats.sum(axis=1) > 0, stats.argmax(axis=1), -1)


def mapped_histogram(stats: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(n_classes, n_classes) histogram with each cluster's row added to its mapped class."""
    hist = np.zeros((stats.shape[1], stats.shape[1]), dtype=np.int64)
    np.add.at(hist, mapping[mapping >= 0], stats[mapping >= 0])
    return hist


class SegmentationMetrics:
    """Accumulates a confusion matrix over chunks; ``compute`` matches (cluster) or not (linear).

    The confusion keeps every cluster's row, so one accumulation gives all three mappings of
    :meth:`compute_modes`; ``compute`` reports the configured one (``extra_as_errors``).
    """

    def __init__(self, n_classes: int, extra_clusters: int = 0, hungarian: bool = False, extra_as_errors: bool = False):
        self.n_classes, self.extra, self.use_hungarian, self.extra_as_errors = n_classes, extra_clusters, hungarian, extra_as_errors
        self._counts = np.zeros((n_classes + extra_clusters, n_classes), dtype=np.int64)
        self._device_counts: torch.Tensor | None = None  # counts of tensors, where they were counted

    @property
    def all_stats(self) -> np.ndarray:
        """Every cluster's confusion row; counts kept on a device are read here, once."""
        if self._device_counts is not None:
            self._counts = self._counts + self._device_counts.cpu().numpy()
            self._device_counts = None
        return self._counts

    @property
    def stats(self) -> np.ndarray:
        """The configured confusion: [QUIRK] rows of extra clusters zeroed (their pixels dropped)
        unless ``extra_as_errors``."""
        if self.extra_as_errors:
            return self.all_stats
        stats = self.all_stats.copy()
        stats[self.n_classes :] = 0
        return stats

    def update(self, preds: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        counts = confusion(preds, target, self.n_classes, self.n_classes + self.extra, extra_as_errors=True)
        if isinstance(counts, torch.Tensor):
            self._device_counts = counts if self._device_counts is None else self._device_counts + counts
        else:
            self._counts = self._counts + counts

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        self._counts = self.all_stats + other.all_stats
        return self

    def __getstate__(self) -> dict:  # sent between dask processes: the counts on the host
        _ = self.all_stats
        return vars(self)

    def compute(self) -> dict:
        if not self.use_hungarian:
            return scores(self.stats[: self.n_classes]) | {"assignment": list(range(self.n_classes))}
        return self._hungarian(self.stats, self.extra_as_errors)

    def _hungarian(self, stats: np.ndarray, extra_as_errors: bool) -> dict:
        mapping = hungarian(stats)
        hist = matched_histogram(stats, mapping, extra_as_errors)
        out = scores(hist)
        if hist.shape[1] > self.n_classes:  # the reference's extra class: report the real classes only
            for key in ("per_class_iou", "per_class_precision", "per_class_recall"):
                out[key] = out[key][: self.n_classes]
        return out | {"assignment": mapping.tolist()}

    def compute_modes(self) -> dict[str, dict]:
        """The cluster metrics under each mapping of clusters to classes:

        * ``drop``: Hungarian, pixels of clusters ≥ n_classes dropped before matching (STEGO's
          evaluation [QUIRK]);
        * ``errors``: Hungarian over every cluster, pixels of unmatched clusters counted as misses;
        * ``many_to_one``: each cluster to its majority class (:func:`many_to_one`).
        """
        drop = self.all_stats.copy()
        drop[self.n_classes :] = 0
        mapping = many_to_one(self.all_stats)
        return {"drop": self._hungarian(drop, False), "errors": self._hungarian(self.all_stats, True),
                "many_to_one": scores(mapped_histogram(self.all_stats, mapping)) | {"assignment": mapping.tolist()}}
