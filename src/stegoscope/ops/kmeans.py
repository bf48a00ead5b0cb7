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


def spherical_kmeans(x: np.ndarray, k: int, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """Lloyd's algorithm on unit vectors with k-means++ seeding (cosine distance); (k, D) centroids."""
    rng = np.random.default_rng(seed)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.clip(1.0 - np.max(x @ np.stack(centroids).T, axis=1), 0, None)
        total = d.sum()
        centroids.append(x[rng.choice(len(x), p=d / total)] if total > 0 else x[rng.integers(len(x))])
    c = np.stack(centroids)
    for _ in range(iterations):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[assign == j].sum(0) if (assign == j).any() else c[j] for j in range(k)])
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, c):
            break
        c = new
    return c
