"""Seconds for the kNN stage's search: the cosine top-k of N pooled descriptors among themselves.

Times `ops.knn.knn_blocked` as the `knn` stage calls it (float32 descriptors on the host, as read
from the store; blocks of rows against all rows on the device), for each block size given, and
checks the answer: every row's nearest neighbour is itself, and a sample of rows equals a
brute-force float64 search. The issue's goal: 250,000 768-d vectors, top 30, in ≤ 30 s.

    python benchmarks/gpu_knn.py [--n 250000] [--dim 768] [--k 30] [--blocks 1024 4096] [--device auto]

A CPU smoke run: `--n 5000 --dim 64`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stegoscope.models import resolve_device
from stegoscope.ops.knn import knn_blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    # clustered descriptors (pooled tokens of similar images are close), not isotropic noise
    centres = rng.normal(size=(max(args.n // 50, 1), args.dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), args.n)] + 0.5 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    knn_blocked(x[:2048], args.k, 1024, device.type)  # warm-up (CUDA context, kernels)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: kNN of {args.n} × {args.dim} float32 descriptors, top {args.k}")
    for block in args.blocks:
        start = time.perf_counter()
        nns = knn_blocked(x, args.k, block, device.type)
        seconds = time.perf_counter() - start
        verdict = f"; goal ≤ 30 s: {'met' if seconds <= 30 else 'MISSED'}" if args.n == 250_000 else ""
        print(f"block {block:5d}: {seconds:7.2f} s   ({args.n / seconds:,.0f} rows/s{verdict})")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sample = rng.choice(args.n, 64, replace=False)
    sims = unit[sample].astype(np.float64) @ unit.T.astype(np.float64)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, : args.k]
    same = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(nns[sample], expected)])
    print(f"check: self at rank 0 for {np.mean(nns[:, 0] == np.arange(args.n)):.4%} of rows; "
          f"top-{args.k} sets equal to a float64 brute force on 64 rows: {same:.4%}")


if __name__ == "__main__":
    main()
