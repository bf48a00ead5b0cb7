"""Cosine nearest neighbours of global descriptors, block by block (reference §3).

Two ways, each exact: :func:`knn_blocked`, row blocks against everything with torch (on a GPU:
one process); :func:`knn_tree`, dask tasks — each (row block, column block) of similarities a
task, and the top-k of each row merged across column blocks as a tree reduction
(``dask.array.argtopk``), so it runs on whichever dask scheduler is active (threads, a local
cluster, a running dask.distributed cluster) and gives the same neighbours on each.
"""

from __future__ import annotations

import warnings

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


def knn_tree(descriptors, k: int = 30, block: int = 1024, split_every: int = 4) -> np.ndarray:
    """int64 (N, k) indices of the k most cosine-similar rows of each row, most similar first,
    as dask tasks on the active scheduler. ``descriptors``: (N, C) numpy or dask array (a dask
    array read from the store by its path keeps the data off the scheduler). Memory per task:
    block × block similarities; ``split_every``: column blocks merged per reduction task."""
    import dask.array as da

    x = descriptors if isinstance(descriptors, da.Array) else da.from_array(np.asarray(descriptors))
    x = x.astype(np.float32).rechunk((block, -1))
    x = x / da.maximum(da.sqrt((x * x).sum(axis=1, keepdims=True)), np.float32(1e-12))  # F.normalize's eps
    k = min(k, x.shape[0])
    with warnings.catch_warnings():  # a task per block of similarities is the design, not a chunking accident
        warnings.simplefilter("ignore", da.PerformanceWarning)
        similarities = da.blockwise(_block_similarities, "ij", x, "ik", x, "jk", dtype=np.float32, concatenate=True)
    return da.argtopk(similarities, k, axis=1, split_every=split_every).compute().astype(np.int64)


def _block_similarities(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """One task's block of similarities, with one BLAS thread: the sums run in the same order in
    every worker, so near-ties resolve alike on every scheduler (the parallelism is the tasks)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return rows @ columns.T
