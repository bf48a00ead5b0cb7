"""Cluster probes (reference §7.1) and the clusterers the paper leaves open (its §5).

* :class:`ClusterLookup`: STEGO's cluster probe, cosine k-means as a learnable module (the default);
* :class:`EuclideanLookup`: the same with Euclidean distance;
* :func:`lloyd_kmeans`: Lloyd's algorithm with k-means++ seeding, Euclidean or spherical (cosine);
* :class:`FixedCentroids`: centroids fitted outside training (Lloyd, scikit-learn) as a probe.

Every probe scores codes against its centroids so that the argmax is the assignment: cosine
similarity, or ``2·x·c − ‖c‖²`` for Euclidean distance (−‖x − c‖² without −‖x‖², the same for
every centroid).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLUSTERERS = {
    "cosine": "STEGO's cluster probe: cosine k-means learnt by gradient beside the linear probe (the default)",
    "euclidean": "the same with Euclidean distance",
    "kmeans": "Lloyd's Euclidean k-means, k-means++ seeding, fitted once on a sample of train codes",
    "spherical-kmeans": "Lloyd's spherical (cosine) k-means, k-means++ seeding, fitted once on a sample of train codes",
    "minibatch-kmeans": "scikit-learn's MiniBatchKMeans (Euclidean), fitted once on a sample of train codes",
}


class ClusterLookup(nn.Module):
    """K centroids (randn-initialised); hard assignment by cosine; loss = −mean max cosine.

    Trained by Adam (lr 5e-3 in STEGO): mini-batch spherical k-means by gradient descent, where
    only the winning centroid of each pixel gets gradient.
    """

    metric = "cosine"

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, K, H, W) of codes x (B, D, H, W) to every centroid."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1))

    def forward(self, x: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, assignment probabilities): one-hot argmax when ``alpha`` is None, else softmax(alpha·cos)."""
        s = self.scores(x)
        probs = assignments(s, alpha)
        return -(probs * s).sum(dim=1).mean(), probs


class EuclideanLookup(nn.Module):
    """K learnable centroids; hard assignment by Euclidean distance; loss = mean squared distance
    to the nearest centroid (mini-batch k-means by gradient descent, like :class:`ClusterLookup`)."""

    metric = "euclidean"

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return euclidean_scores(x, self.clusters)

    def forward(self, x: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(x)
        loss = (x.square().sum(dim=1) - s.max(dim=1).values).mean()  # ‖x − c*‖² = ‖x‖² − (2·x·c* − ‖c*‖²)
        return loss, assignments(s, alpha)


class FixedCentroids(nn.Module):
    """Centroids fitted before training (Lloyd's k-means, scikit-learn) or taken from a trained
    head (SmooSeg's teacher prototypes, PriMaPs-EM's θ_M), scored by ``metric``: ``cosine``,
    ``euclidean`` or ``dot`` (raw dot products, PriMaPs-EM's prototypes); its loss is zero and it
    has nothing to train. ``crf_alpha``: the CRF's unary is softmax(crf_alpha · scores); None: the
    evaluation's default, or 1 for ``dot`` (PriMaPs-EM's log_softmax of raw logits)."""

    def __init__(self, centroids: torch.Tensor, metric: str, crf_alpha: float | None = None):
        super().__init__()
        self.metric = metric
        self.crf_alpha = 1.0 if crf_alpha is None and metric == "dot" else crf_alpha
        self.register_buffer("clusters", torch.as_tensor(centroids, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.metric == "euclidean":
            return euclidean_scores(x, self.clusters)
        if self.metric == "dot":
            return torch.einsum("bchw,kc->bkhw", x, self.clusters)
        return torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1))

    def forward(self, x: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(x)
        return s.sum() * 0, assignments(s, alpha)


def assignments(scores: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """Assignment probabilities (B, K, H, W) of scores: one-hot argmax when ``alpha`` is None,
    else softmax(alpha · scores)."""
    if alpha is None:
        return F.one_hot(scores.argmax(dim=1), scores.shape[1]).permute(0, 3, 1, 2).to(scores.dtype)
    return torch.softmax(alpha * scores, dim=1)


def euclidean_scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """2·x·c − ‖c‖² (B, K, H, W) of codes x (B, D, H, W): −‖x − c‖² up to −‖x‖², which every
    centroid shares, so the argmax is the nearest centroid."""
    return 2 * torch.einsum("bchw,kc->bkhw", x, centroids) - centroids.square().sum(dim=1)[None, :, None, None]


def lloyd_kmeans(x: np.ndarray, k: int, iterations: int = 100, seed: int = 0, device: str = "cpu",
                 spherical: bool = False) -> np.ndarray:
    """Lloyd's algorithm with k-means++ seeding; (k, D) centroids. Euclidean, or ``spherical``:
    on unit vectors with cosine similarity (centroids renormalised).

    The distances and centroid sums run with torch on ``device`` (``cuda`` when present); the
    seeded draws stay on the host, so a seed gives the same seeding on every device.
    """
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    if spherical:
        x = F.normalize(x, dim=1)

    def closeness(centroids: torch.Tensor) -> torch.Tensor:  # higher is closer: cosine, or −squared distance
        return x @ centroids.T if spherical else 2 * x @ centroids.T - centroids.square().sum(dim=1) - x.square().sum(dim=1, keepdim=True)

    centroids = x[int(rng.integers(len(x)))][None]
    for _ in range(1, k):  # k-means++: draw the next seed with probability ∝ its distance to the nearest seed
        best = closeness(centroids).max(dim=1).values
        d = ((1.0 - best) if spherical else -best).clamp_(min=0).double().cpu().numpy()
        total = d.sum()
        pick = rng.choice(len(x), p=d / total) if total > 0 else rng.integers(len(x))
        centroids = torch.cat([centroids, x[int(pick)][None]])
    for _ in range(iterations):
        assign = closeness(centroids).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        means = F.normalize(sums, dim=1) if spherical else sums / counts.clamp_min(1)[:, None]
        new = torch.where((counts > 0)[:, None], means, centroids)  # an empty cluster keeps its centroid
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids.cpu().numpy()

