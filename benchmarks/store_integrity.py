"""What a feature store's integrity costs: a crc32c on every chunk, and each shard flushed to
disk before its ``written`` flag.

Writes the same tokens (ViT-B/8 train shape by default: 28×28×768 fp16, 1.2 MB per image) into
stores four ways — checksums off/on × flags flushed per shard (``commit``) or not — each ended
by the flush that completing a store does anyway, then reads every store's tokens back in full
(from the page cache: the read figure is the decode + checksum cost, not the disk's). Prints
MB/s and each variant's ratio to the plain one, all measured in this one run.

    python benchmarks/store_integrity.py [--images 256] [--shard 64] [--grid 28] [--channels 768] [--dir /tmp] [--repeats 5]
        [--json PATH]

Each figure is the best of ``--repeats`` runs, the variants interleaved (so that drift hits them alike),
each write and read timed once per run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import Results, make_parser
from stegoscope import cache_schema
from stegoscope.cache_schema import IDS, POOLED, TOKENS, WRITTEN, StoreLayout
from stegoscope.records import StoreAttrs


def write(path: Path, tokens: np.ndarray, shard: int, checksums: bool, durable: bool) -> float:
    layout = StoreLayout(len(tokens), tokens.shape[1:3], tokens.shape[3], (8, 8), False, False, shard)
    start = time.perf_counter()
    store = cache_schema.create_feature_store(path, layout, StoreAttrs(key="k" * 64, stage="bench"), checksums=checksums)
    for s in range(layout.n_shards):
        sl = layout.shard_slice(s)
        arrays = {TOKENS: tokens[sl], POOLED: tokens[sl].mean((1, 2), dtype=np.float32),
                  IDS: np.array([str(i) for i in range(sl.start, sl.stop)])}
        store.write_shard(s, arrays, commit=durable)
        if not durable:
            store.group[WRITTEN][s] = True  # the flag without flushing the shard first
    store.mark_complete()  # flushes the whole store, as every extraction ends
    return time.perf_counter() - start


def read(path: Path) -> float:
    start = time.perf_counter()
    store = cache_schema.open_feature_store(path)
    for s in range(store.layout.n_shards):
        store[TOKENS][store.layout.shard_slice(s)]
    return time.perf_counter() - start


def main() -> None:
    parser = make_parser(__doc__, device=None, warmup=None, repeat=5, aliases={"repeat": ["--repeats"]})
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard", type=int, default=64)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--dir", type=Path, default=None, help="where the stores are written (default: a temp folder)")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    tokens = np.random.default_rng(0).normal(size=(args.images, args.grid, args.grid, args.channels)).astype(np.float16)
    megabytes = tokens.nbytes / 1e6
    root = Path(tempfile.mkdtemp(dir=args.dir))
    variants = {"plain": (False, False), "crc32c": (True, False), "flushed flags": (False, True), "both (default)": (True, True)}
    times = {name: (float("inf"), float("inf")) for name in variants}
    try:
        for r in range(args.repeat):  # variants interleaved, so that drift hits them alike
            for name, (checksums, durable) in variants.items():
                path = root / f"{name.replace(' ', '_')}-{r}.zarr"
                w = write(path, tokens, args.shard, checksums, durable)
                times[name] = (min(times[name][0], w), min(times[name][1], read(path)))
                shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res.line(f"{args.images} images of {args.grid}×{args.grid}×{args.channels} fp16 ({megabytes:.0f} MB), "
             f"{args.shard} per shard, best of {args.repeat}")
    plain_write, plain_read = times["plain"]
    for name, (w, r) in times.items():
        write_speed = res.record(f"{name} write", megabytes / w, "MB/s", show=False)
        read_speed = res.record(f"{name} read", megabytes / r, "MB/s", show=False)
        res.record(f"{name} write × plain", plain_write / w, show=False)
        res.record(f"{name} read × plain", plain_read / r, show=False)
        res.line(f"{name:16s} write {write_speed:8.1f} MB/s ({plain_write / w:5.2f}× plain)   "
                 f"read {read_speed:8.1f} MB/s ({plain_read / r:5.2f}× plain)")


if __name__ == "__main__":
    main()
