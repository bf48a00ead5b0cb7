"""Streamed exact PCA versus the raw read of the same token store, in one run.

Builds a synthetic token store (default 8 GB of fp16 tokens, ViT-S/8 shapes: 28×28×384 per
image), then, each in a fresh process and after evicting the store from the page cache:

  read      every token shard by stegoscope's shard reader (the raw read throughput of the store);
  fit       stegoscope's PCA on all tokens (dask over the store's token matrix, which reads whole
            rows with the same shard reader; numpy on CPU / torch on CUDA);
  fit-zarr  the same fit over zarr's own chunk reader (how the token matrix read before).

Prints the throughputs, the ratios fit / read and fit / fit-zarr, and each phase's peak RSS.

    python benchmarks/pca_stream.py [--gb 8] [--channels 384] [--dir /tmp/pca-bench] [--device auto] [--json PATH]

Each phase runs once (a warm-up would fill the page cache the phase is meant to start without).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import Results, make_parser, resolve_device


def evict(path: Path) -> None:
    """Drop the store's pages from the page cache (no root needed for clean pages)."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def build(path: Path, gb: float, channels: int, grid: int = 28, shard: int = 128) -> None:
    from stegoscope import cache_schema
    from stegoscope.cache_schema import StoreLayout
    from stegoscope.records import StoreAttrs

    per_image = grid * grid * channels * 2
    n = int(gb * 1e9 // per_image)
    if path.exists() and (path / "zarr.json").exists():
        store = cache_schema.open_feature_store(path)
        if store.complete and len(store) == n:
            return
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(channels, channels)).astype(np.float32) * np.geomspace(2, 0.01, channels, dtype=np.float32)
    pool = (rng.normal(size=(shard, grid, grid, channels)).astype(np.float32) @ mixing).astype(np.float16)
    layout = StoreLayout(n, (grid, grid), channels, (grid * 8, grid * 8), False, False, shard)
    store = cache_schema.create_feature_store(path, layout, StoreAttrs(key="bench" * 12, stage="bench"))
    start = time.perf_counter()
    for s in range(layout.n_shards):
        sl = layout.shard_slice(s)
        rows = sl.stop - sl.start
        tokens = np.roll(pool, s, axis=0)[:rows] + np.float16(s % 7)
        store.write_shard(s, {cache_schema.TOKENS: tokens, cache_schema.POOLED: tokens.mean((1, 2), dtype=np.float32),
                              cache_schema.IDS: np.array([str(i) for i in range(sl.start, sl.stop)])})
        print(f"\rbuilding {s + 1}/{layout.n_shards} shards", end="", file=sys.stderr)
    store.mark_complete()
    print(f"\nbuilt {n} images ({n * per_image / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def phase(path: Path, which: str, device: str) -> dict:
    from stegoscope import cache_schema

    store = cache_schema.open_feature_store(path)
    tokens = store[cache_schema.TOKENS]
    nbytes = tokens.nbytes
    if which != "read":  # imports and the device before the clock; the read phase never imports torch (its peak RSS)
        import dask.array as da

        from stegoscope.reducers import PCA

        kind = resolve_device(device).type
    start = time.perf_counter()
    if which == "read":
        for s in range(store.layout.n_shards):
            tokens[store.layout.shard_slice(s)]
    else:
        matrix = store.token_matrix()
        if which == "fit-zarr":
            n, h, w, c = tokens.shape
            per_chunk = matrix.chunks[0][0] // (h * w)  # the same chunks of whole images
            matrix = da.from_array(tokens.array, chunks=(per_chunk, h, w, c), lock=False).reshape(-1, c)
        PCA(device=kind).fit(matrix)
    seconds = time.perf_counter() - start
    return {"phase": which, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def gemm_rate(channels: int, rows: int = 65536, repeat: int = 5) -> float:
    """GFLOP/s of this machine's float64 GEMM (every core) at the Gram's shape, (C × n)(n × C),
    counted as 2·n·C² (a syrk does half of them, so a Gram can pass this rate)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(rows, channels)), rng.normal(size=(rows, channels))
    a.T @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a.T @ b
    return 2 * rows * channels**2 * repeat / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = make_parser(__doc__, warmup=None, repeat=None)
    parser.add_argument("--gb", type=float, default=8.0, help="store size in GB of tokens")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pca-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--phase", choices=["read", "fit", "fit-zarr"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child: its figures go to the parent as one JSON line
        print(json.dumps(phase(args.dir / "tokens.zarr", args.phase, args.device)))
        return
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    path = args.dir / "tokens.zarr"
    build(path, args.gb, args.channels)
    results = {}
    for which in ("read", "fit", "fit-zarr"):
        evict(path)
        out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--device", str(res.device), "--phase", which],
                             capture_output=True, text=True, check=True)
        r = results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        for figure, unit in (("seconds", "s"), ("gb_per_s", "GB/s"), ("peak_rss_gb", "GB")):
            res.record(f"{which} {figure}", r[figure], unit, show=False)
        res.line(f"{which:5s} {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s = {r['gb_per_s']:.3f} GB/s, "
                 f"peak RSS {r['peak_rss_gb']:.2f} GB")
    ratio = res.record("PCA fit throughput / raw read throughput", results["fit"]["gb_per_s"] / results["read"]["gb_per_s"], show=False)
    res.line(f"PCA fit throughput / raw read throughput = {ratio:.2f}; fit peak RSS {results['fit']['peak_rss_gb']:.2f} GB")
    if res.device.type == "cpu":  # the Gram's own ceiling: the machine's float64 GEMM rate
        gemm = res.record("float64 GEMM rate", gemm_rate(args.channels), "GFLOP/s", fmt=".1f")
        gram = res.record("the Gram at the GEMM rate", gemm * 1e9 / (2 * args.channels**2) * args.channels * 2 / 1e9, "GB/s of fp16 tokens",
                          fmt=".3f")
        ceiling = min(gram, results["read"]["gb_per_s"])
        res.record("PCA fit / min(raw read, the Gram at the GEMM rate)", results["fit"]["gb_per_s"] / ceiling, fmt=".2f")
    res.record("PCA fit through the shard reader / through zarr's chunk reader",
               results["fit"]["gb_per_s"] / results["fit-zarr"]["gb_per_s"], fmt=".2f")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
