"""Seconds for the kNN stage's search: the cosine top-k of N pooled descriptors among themselves.

Times `ops.knn.knn_blocked` as the `knn` stage calls it (float32 descriptors on the host, as read
from the store; blocks of rows against all rows on the device), for each block size given, and
checks the answer: every row's nearest neighbour is itself, and a sample of rows equals a
brute-force float64 search. The issue's goal: 250,000 768-d vectors, top 30, in ≤ 30 s.

    python benchmarks/gpu_knn.py [--n 250000] [--dim 768] [--k 30] [--blocks 1024 4096] [--device auto]
        [--warmup 0] [--repeat 1] [--json PATH]

Before the timed searches, one search of 2,048 rows warms the device up (CUDA context, kernels);
``--warmup`` adds untimed searches of all rows, ``--repeat`` takes the median of that many.

A CPU smoke run: `--n 5000 --dim 64`.
"""

from __future__ import annotations

import argparse

import numpy as np

from harness import Results, device_name, make_parser, time_calls
from stegoscope.ops.knn import knn_blocked


def main() -> None:
    parser = make_parser(__doc__, warmup=0, repeat=1)  # a search of all rows takes seconds: one each, after a small warm-up
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    rng = np.random.default_rng(0)
    # clustered descriptors (pooled tokens of similar images are close), not isotropic noise
    centres = rng.normal(size=(max(args.n // 50, 1), args.dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), args.n)] + 0.5 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    knn_blocked(x[:2048], args.k, 1024, device.type)  # warm-up (CUDA context, kernels)
    res.line(f"{device_name(device)}: kNN of {args.n} × {args.dim} float32 descriptors, top {args.k}")
    for block in args.blocks:
        timing = time_calls(lambda: knn_blocked(x, args.k, block, device.type), warmup=args.warmup, repeat=args.repeat, device=device)
        nns, seconds = timing.result, res.record(f"block {block}", timing.median, "s", show=False)
        rate = res.record(f"block {block} rows", args.n / seconds, "rows/s", show=False)
        verdict = f"; goal ≤ 30 s: {'met' if seconds <= 30 else 'MISSED'}" if args.n == 250_000 else ""
        res.line(f"block {block:5d}: {seconds:7.2f} s   ({rate:,.0f} rows/s{verdict})")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sample = rng.choice(args.n, 64, replace=False)
    sims = unit[sample].astype(np.float64) @ unit.T.astype(np.float64)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, : args.k]
    self_first = res.record("self at rank 0", np.mean(nns[:, 0] == np.arange(args.n)), "of rows", show=False)
    same = res.record(f"top-{args.k} sets equal to a float64 brute force on 64 rows",
                      np.mean([len(set(a) & set(b)) / args.k for a, b in zip(nns[sample], expected)]), show=False)
    res.line(f"check: self at rank 0 for {self_first:.4%} of rows; top-{args.k} sets equal to a float64 brute force on 64 rows: {same:.4%}")


if __name__ == "__main__":
    main()
