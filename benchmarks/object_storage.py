"""Reading a feature store from local disk and from S3 (moto's standalone server on
127.0.0.1, started here), in one run.

Writes the same store of random fp16 tokens to a local folder and to ``s3://bench/…``, then
reads every token three ways from each: whole shards by ranges of one object (the raw shard
reader every scan uses), zarr's own chunk reader, and the dask token matrix summed (what a
reducer fit streams). Prints MB/s and the S3 / local ratio of each. moto keeps objects in
memory behind an HTTP server on this machine, so the ratio is the price of the S3 protocol
(HTTP requests, no page cache), not of a network; a real bucket adds its latency and bandwidth.

    python benchmarks/object_storage.py [--images 256] [--grid 28] [--channels 384] [--shard 32] [--repeats 2] [--json PATH]

Each read figure is the best of ``--repeats`` reads (after ``--warmup``, none by default); each write is timed once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from harness import Results, make_parser, time_calls


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = make_parser(__doc__, device=None, warmup=0, repeat=2, aliases={"repeat": ["--repeats"]})
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--grid", type=int, default=28, help="tokens per side (224 px / patch 8)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--shard", type=int, default=32, help="images per shard")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    proc, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import s3fs

        from stegoscope import cache_schema, storage
        from stegoscope.records import StoreAttrs

        s3fs.S3FileSystem().mkdir("bench")
        n, g, c = args.images, args.grid, args.channels
        layout = cache_schema.StoreLayout(n, (g, g), c, (g * 8, g * 8), labelled=False, with_images=False, shard_images=args.shard)
        rng = np.random.default_rng(0)
        tokens = rng.normal(size=(n, g, g, c)).astype(np.float16)
        mb = tokens.nbytes / 1e6
        local_dir = Path(tempfile.mkdtemp(prefix="stegoscope-bench-"))
        roots = {"local": local_dir / "s.zarr", "s3": storage.cache_path("s3://bench/s.zarr")}
        for where, path in roots.items():
            store = cache_schema.create_feature_store(path, layout, StoreAttrs(key="bench", stage="bench"))
            start = time.perf_counter()  # the store written once: a second write would overwrite, not create
            for shard in range(layout.n_shards):
                rows = layout.shard_slice(shard)
                store.write_shard(shard, {cache_schema.TOKENS: tokens[rows],
                                          cache_schema.POOLED: tokens[rows].mean((1, 2)).astype(np.float32),
                                          cache_schema.IDS: np.array([str(i) for i in range(rows.start, rows.stop)])})
            store.mark_complete()
            speed = res.record(f"{where} write", mb / (time.perf_counter() - start), "MB/s", show=False)
            res.line(f"{where:5s} write {speed:8.1f} MB/s")
        res.line(f"{n} images × {g}×{g}×{c} fp16 = {mb:.0f} MB, shards of {args.shard}; best of {args.repeat}")
        readers = {
            "raw shard ranges": lambda s: s[cache_schema.TOKENS][:],
            "zarr chunks": lambda s: s[cache_schema.TOKENS].array[:],
            "dask token matrix": lambda s: s.token_matrix().sum(axis=0, dtype=np.float32).compute(),
        }
        for name, read in readers.items():
            speed = {}
            for where, path in roots.items():
                store = cache_schema.open_complete_store(path)
                best = time_calls(lambda: read(store), warmup=args.warmup, repeat=args.repeat).min
                speed[where] = res.record(f"{name} {where}", mb / best, "MB/s", show=False)
            ratio = res.record(f"{name} s3/local", speed["s3"] / speed["local"], show=False)
            res.line(f"{name:18s} local {speed['local']:8.1f} MB/s   s3 {speed['s3']:8.1f} MB/s   s3/local {ratio:.2f}")
        np.testing.assert_array_equal(cache_schema.open_complete_store(roots["s3"])[cache_schema.TOKENS][:], tokens)
        shutil.rmtree(local_dir)
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
