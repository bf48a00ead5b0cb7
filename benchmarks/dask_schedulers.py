"""The same kNN and PCA statistics scan on dask's threaded scheduler and on a local
dask.distributed cluster of 1 and 2 worker processes, in one run.

Writes a zarr array of random descriptors (kNN) and one of fp16 tokens (PCA's streamed moments,
the scan behind every PCA and RP fit), each read by the tasks from its path, then times
``ops.knn.knn_tree`` and ``reducers.streamed_moments`` under each scheduler, and prints
how far each scheduler's result is from the threaded one's (BLAS may sum in another order in a
one-thread worker). Prints seconds and the ratio to the threaded scheduler.

    python benchmarks/dask_schedulers.py [--n 20000] [--dim 384] [--tokens-gb 0.5] [--dir /tmp/dask-bench] [--repeat 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from harness import Results, make_parser, time_calls


def main() -> None:
    parser = make_parser(__doc__, device=None, warmup=0, repeat=1)  # the CPU's schedulers; one scan each by default, as before
    parser.add_argument("--n", type=int, default=20000, help="descriptors (kNN rows)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--tokens-gb", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dask-bench"))
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    import dask.array as da
    import zarr

    from stegoscope.compute import dask_scheduler
    from stegoscope.ops.knn import knn_tree
    from stegoscope.reducers import _MOMENTS, streamed_moments

    shutil.rmtree(args.dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    zarr.create_array(str(args.dir / "pooled.zarr"), data=rng.normal(size=(args.n, args.dim)).astype(np.float32),
                      chunks=(args.block, args.dim))
    rows = int(args.tokens_gb * 1e9 // (args.dim * 2))
    tokens = zarr.create_array(str(args.dir / "tokens.zarr"), shape=(rows, args.dim), dtype="float16", chunks=(16384, args.dim))
    for start in range(0, rows, 16384):
        tokens[start : start + 16384] = rng.normal(size=(min(16384, rows - start), args.dim)).astype(np.float16)
    res.line(f"kNN of {args.n:,} × {args.dim} (top {args.k}, blocks of {args.block}); moments of {rows:,} × {args.dim} fp16 tokens "
             f"({rows * args.dim * 2 / 1e9:.2f} GB); median of {args.repeat}")

    def moments() -> tuple:
        _MOMENTS.clear()  # measure the scan, not the process's memo of it
        return streamed_moments(da.from_zarr(str(args.dir / "tokens.zarr")))

    results, base = {}, {}
    for scheduler, workers in (("threads", None), ("local-cluster", 1), ("local-cluster", 2)):
        name = scheduler + (f" ×{workers}" if workers else "")
        with dask_scheduler(scheduler, workers or 2):
            knn = time_calls(lambda: knn_tree(da.from_zarr(str(args.dir / "pooled.zarr")), args.k, args.block),
                             warmup=args.warmup, repeat=args.repeat)
            scan = time_calls(moments, warmup=args.warmup, repeat=args.repeat)
        results[name] = (knn.result, *scan.result[1:])
        knn_s = res.record(f"{name} kNN", knn.median, "s", show=False)
        moments_s = res.record(f"{name} moments", scan.median, "s", show=False)
        base.setdefault("knn", knn_s)
        base.setdefault("moments", moments_s)
        res.line(f"{name:<18} kNN {knn_s:7.2f} s ({base['knn'] / knn_s:.2f}× threads)   moments {moments_s:7.2f} s "
                 f"({base['moments'] / moments_s:.2f}× threads)")
    first = next(iter(results.values()))
    for name, (nns, mean, cov) in results.items():
        equal = res.record(f"{name} neighbours equal to the threaded run's", np.mean(nns == first[0]), show=False)
        gap = res.record(f"{name} largest moment difference", max(np.abs(mean - first[1]).max(), np.abs(cov - first[2]).max()),
                         show=False)
        res.line(f"{name:<18} neighbours equal to the threaded run's: {equal:.6f}; largest moment difference: {gap:.2e}")


if __name__ == "__main__":
    main()
