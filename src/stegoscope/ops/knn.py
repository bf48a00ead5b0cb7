"""Cosine nearest neighbours of global descriptors, block by block (reference §3)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_blocked(descriptors: np.ndarray, k: int = 30, block: int = 1024, device: str = "cpu") -> np.ndarray:
    """int64 (N, k) indices of the k most cosine-similar rows of each row (itself included,
    normally at rank 0), computed ``block`` rows at a time: memory ``block × N``, never ``N × N``."""
    x = F.normalize(torch.as_tensor(descriptors, dtype=torch.float32, device=device), dim=1)
    k = min(k, len(x))
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x.T
        out[start : start + block] = sims.topk(k, dim=1).indices.cpu().numpy()
    return out
