"""How fast a feature store takes and gives tokens, against the raw disk, with 1..N threads.

The profile behind two GPU figures: extraction is written through `FeatureStore.write_shard` by
writer threads, and probes / heads read whole stores shard by shard in threads. Writes the same
fp16 tokens (ViT-B/8 train shape by default) as whole shards with T threads in parallel, then reads
them back (from the page cache) with T threads; and writes the same bytes as plain files with
T threads, each run ended by the flush that completing a store does. Whole shards go through
stegoscope's numpy encoder (`raw_shards`, the default) and through zarr's codec pipeline (the
same bytes). Prints GB/s for each T and the store / raw ratio, all in one run.

    python benchmarks/store_throughput.py [--shards 16] [--shard 128] [--threads 1 2 4 8] [--codecs numpy zarr] [--dir /tmp]
        [--json PATH]

Each write and read is timed once: a store written again is another store, and its read follows its write.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from harness import Results, make_parser
from stegoscope import cache_schema
from stegoscope.atomic import fsync_tree
from stegoscope.cache_schema import IDS, POOLED, TOKENS, StoreLayout
from stegoscope.records import StoreAttrs


def use_zarr_codec(on: bool) -> None:
    """Route whole-shard writes and reads through zarr's codec pipeline (on) or stegoscope's numpy
    encoder of the same bytes (off, the default: `raw_shards`)."""
    cache_schema.FeatureStore._raw_layout = _ZARR_PATH if on else _NUMPY_PATH


_NUMPY_PATH = cache_schema.FeatureStore._raw_layout
_ZARR_PATH = lambda self, name: None  # noqa: E731


def store_write(path: Path, tokens: np.ndarray, shards: int, threads: int) -> float:
    shard = len(tokens)
    layout = StoreLayout(shard * shards, tokens.shape[1:3], tokens.shape[3], (8, 8), False, False, shard)
    arrays = {TOKENS: tokens, POOLED: tokens.mean((1, 2), dtype=np.float32), IDS: np.array([str(i) for i in range(shard)])}
    start = time.perf_counter()
    store = cache_schema.create_feature_store(path, layout, StoreAttrs(key="k" * 64, stage="bench"))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: store.write_shard(s, arrays, commit=False), range(shards)))
    store.commit(list(range(shards)))
    store.mark_complete()
    return time.perf_counter() - start


def store_read(path: Path, threads: int) -> float:
    store = cache_schema.open_feature_store(path)
    tokens = store[TOKENS]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: tokens[store.layout.shard_slice(s)], range(store.layout.n_shards)))
    return time.perf_counter() - start


def raw_write(path: Path, tokens: np.ndarray, shards: int, threads: int) -> float:
    path.mkdir(parents=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: (path / f"{s}.bin").write_bytes(tokens.data), range(shards)))
    fsync_tree(path)
    return time.perf_counter() - start


def main() -> None:
    parser = make_parser(__doc__, device=None, warmup=None, repeat=None)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard", type=int, default=128, help="images per shard")
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--codecs", nargs="+", default=["numpy", "zarr"], choices=["numpy", "zarr"],
                        help="whole shards through stegoscope's numpy encoder (raw_shards) and/or zarr's pipeline")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    tokens = np.random.default_rng(0).normal(size=(args.shard, args.grid, args.grid, args.channels)).astype(np.float16)
    gb = tokens.nbytes * args.shards / 1e9
    root = Path(tempfile.mkdtemp(dir=args.dir))
    res.line(f"{args.shards} shards of {args.shard} images of {args.grid}×{args.grid}×{args.channels} fp16 ({gb:.2f} GB); "
             f"{os.cpu_count()} CPUs")
    try:
        for threads in args.threads:
            d = raw_write(root / "raw", tokens, args.shards, threads)
            shutil.rmtree(root / "raw")
            line = f"{threads:2d} threads: raw write {res.record(f'{threads} threads raw write', gb / d, 'GB/s', show=False):5.2f} GB/s"
            for codec in args.codecs:
                use_zarr_codec(codec == "zarr")
                w = store_write(root / "s.zarr", tokens, args.shards, threads)
                r = store_read(root / "s.zarr", threads)
                shutil.rmtree(root / "s.zarr")
                write_speed = res.record(f"{threads} threads {codec} write", gb / w, "GB/s", show=False)
                ratio = res.record(f"{threads} threads {codec} write × raw", d / w, show=False)
                read_speed = res.record(f"{threads} threads {codec} read", gb / r, "GB/s", show=False)
                line += f" | {codec}: write {write_speed:5.2f} GB/s ({ratio:4.2f}× raw), read {read_speed:5.2f} GB/s"
            res.line(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
