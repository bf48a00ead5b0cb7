"""Streaming first and second moments as chunk → combine → aggregate.

chunk:     ``shifted_gram(x_block, shift)`` — the augmented Gram matrix of ``y = x − shift``:
           ``[[Σ yyᵀ, Σ y], [Σ yᵀ, n]]``, (C+1, C+1) float64.
combine:   plain addition (partial Grams of disjoint blocks add up).
aggregate: ``moments_from_gram`` → (n, mean, population covariance).

Everything is float64, so the result does not depend on how the tokens were chunked (a float32
partial would: trailing components with small eigengaps moved by ~1e-3 between chunkings). The
shift (a rough estimate of the mean) avoids cancellation in ``E[yyᵀ] − E[y]E[y]ᵀ`` when a channel's
mean is large compared with its spread, as some DINO channels are.
"""

from __future__ import annotations

import numpy as np


def shifted_gram(block: np.ndarray, shift: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Augmented Gram matrix of ``block − shift`` for one chunk of tokens (n, C)."""
    block = block.reshape(-1, block.shape[-1])
    if device.startswith("cuda"):
        import torch

        y = torch.as_tensor(block, device=device).double() - torch.as_tensor(shift, device=device).double()
        y = torch.cat([y, torch.ones(len(y), 1, device=device, dtype=torch.float64)], dim=1)
        return (y.T @ y).cpu().numpy()
    y = np.subtract(block, shift, dtype=np.float64)  # one pass: no float64 copy to shift afterwards
    c = y.shape[1]
    gram = np.empty((c + 1, c + 1))
    gram[:c, :c] = y.T @ y
    gram[:c, c] = gram[c, :c] = y.sum(axis=0)
    gram[c, c] = len(y)
    return gram


def moments_from_gram(gram: np.ndarray, shift: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, population covariance) from an aggregated augmented Gram matrix."""
    n = gram[-1, -1]
    if n <= 0:
        raise ValueError("no tokens were streamed")
    d = gram[:-1, -1] / n  # mean of the shifted tokens
    cov = gram[:-1, :-1] / n - np.outer(d, d)
    cov = (cov + cov.T) / 2
    return int(round(n)), shift.astype(np.float64) + d, cov


def safe_scale(variance: np.ndarray) -> np.ndarray:
    """Standard deviations, with 1 for constant features (scikit-learn's StandardScaler rule)."""
    scale = np.sqrt(np.maximum(variance, 0.0))
    return np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)


def eigh_descending(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors as rows, each row's largest
    |entry| made positive so that the signs are deterministic."""
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1]
    values, rows = np.maximum(values[order], 0.0), vectors[:, order].T
    signs = np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])
    return values, rows * np.where(signs == 0, 1.0, signs)[:, None]


def batch_standardize(x: np.ndarray) -> np.ndarray:
    """z-score with the statistics of ``x`` itself (population std), over all but the last axis."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean = flat.mean(axis=0)
    scale = safe_scale(flat.var(axis=0))
    return ((x - mean) / scale).astype(np.float32)
