"""The cluster probe (reference §7.1): cosine k-means as a learnable module, and classic
spherical Lloyd k-means with k-means++ initialisation as an option."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ClusterLookup(nn.Module):
    """K centroids (randn-initialised); hard assignment by cosine; loss = −mean max cosine.

    Trained by Adam (lr 5e-3 in STEGO): mini-batch spherical k-means by gradient descent, where
    only the winning centroid of each pixel gets gradient.
    """

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, K, H, W) of codes x (B, D, H, W) to every centroid."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1))

    def forward(self, x: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, assignment probabilities): one-hot argmax when ``alpha`` is None, else softmax(alpha·cos)."""
        s = self.scores(x)
        if alpha is None:
            probs = F.one_hot(s.argmax(dim=1), s.shape[1]).permute(0, 3, 1, 2).to(s.dtype)
        else:
            probs = torch.softmax(alpha * s, dim=1)
        return -(probs * s).sum(dim=1).mean(), probs


def spherical_kmeans(x: np.ndarray, k: int, iterations: int = 50, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """Lloyd's algorithm on unit vectors with k-means++ seeding (cosine distance); (k, D) centroids.

    The similarities and centroid sums run with torch on ``device`` (``cuda`` when present); the
    seeded draws stay on the host, so a seed gives the same seeding on every device.
    """
    rng = np.random.default_rng(seed)
    x = F.normalize(torch.as_tensor(x, dtype=torch.float32, device=device), dim=1)
    centroids = x[int(rng.integers(len(x)))][None]
    for _ in range(1, k):
        d = (1.0 - (x @ centroids.T).max(dim=1).values).clamp_(min=0).double().cpu().numpy()
        total = d.sum()
        pick = rng.choice(len(x), p=d / total) if total > 0 else rng.integers(len(x))
        centroids = torch.cat([centroids, x[int(pick)][None]])
    for _ in range(iterations):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        alive = torch.bincount(assign, minlength=k) > 0
        new = torch.where(alive[:, None], F.normalize(sums, dim=1), centroids)  # an empty cluster keeps its centroid
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids.cpu().numpy()
