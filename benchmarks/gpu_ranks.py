"""Two processes writing one store (`extract --rank I --world 2`) against one process, on one
box, in one run: are the stores identical, and what does the second process buy?

Generates a folder of JPEGs (as `gpu_extract.py`), extracts it with a random ViT once with one
process, then with two rank processes started together on the same device, each writing every
other shard of the same store; the last to finish completes it. With batches as large as
shards, each rank's batches are the single process's, so the stores must agree byte for byte.
Prints both wall times (process start to exit), their ratio and whether the stores are equal.
On one GPU the ranks share it: the ratio says how far one process left the GPU idle.

    python benchmarks/gpu_ranks.py [--images 3000] [--arch vit_small_patch8] [--res 224] [--batch 128] [--workers 6]
        [--device cuda] [--json PATH]

A CPU smoke run: `--images 48 --arch vit_micro_patch8 --res 64 --batch 16 --workers 1 --device cpu`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpu_extract import make_jpegs
from harness import Results, make_parser


def extract(data: Path, cache: Path, args: argparse.Namespace, rank: int | None = None) -> subprocess.Popen:
    """A process running what `stegoscope extract … [--rank I --world 2]` runs (without the CLI's
    own dependencies, which the device machine lacks)."""
    cmd = [sys.executable, __file__, "--arch", args.arch, "--res", str(args.res), "--batch", str(args.batch),
           "--workers", str(args.workers), "--device", args.device, "--decode", args.decode,
           "--child", str(data), str(cache), str(-1 if rank is None else rank)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def child(data: str, cache: str, rank: int, args: argparse.Namespace) -> None:
    from stegoscope.pipeline import run_stage
    from stegoscope.stages.extract import ExtractParams, ExtractStage

    params = ExtractParams(dataset="directory", split="train", res=args.res, backbone=f"random:{args.arch}")
    stage = ExtractStage(Path(cache), Path(data), params, batch_size=args.batch, workers=args.workers, shard_images=args.batch,
                         device=args.device, decode=args.decode, show_progress=False, rank=max(rank, 0), world=1 if rank < 0 else 2)
    stage.run_rank() if rank >= 0 else run_stage(stage)


def finished(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(out)


def main() -> None:
    parser = make_parser(__doc__, device="cuda", warmup=None, repeat=None)  # whole processes, timed once (after one untimed)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128, help="images per batch and per shard")
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers of each process")
    parser.add_argument("--decode", default="auto", help="where JPEGs are decoded: auto (on the GPU), cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args)
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    from stegoscope import cache_schema

    work = args.workdir or Path(tempfile.mkdtemp(prefix="stegoscope-ranks-"))
    data = work / "data"
    make_jpegs(data, args.images)
    finished([extract(data, work / "warm", args)])  # fingerprint memo, model code and kernels warm; not timed
    seconds = {}
    for name, ranks in (("one process", [None]), ("two ranks", [0, 1]), ("one again", [None])):
        cache = work / name.replace(" ", "-")
        shutil.rmtree(cache, ignore_errors=True)  # extracted anew (the JPEGs of --workdir are kept)
        start = time.perf_counter()  # process start to exit
        finished([extract(data, cache, args, rank) for rank in ranks])
        seconds[name] = res.record(name, time.perf_counter() - start, "s", show=False)
        speed = res.record(f"{name} speed", args.images / seconds[name], "images/s", show=False)
        res.line(f"{name:12s} {seconds[name]:7.1f} s  {speed:7.1f} images/s")
    (one,) = cache_schema.list_feature_stores(work / "one-process")
    (two,) = cache_schema.list_feature_stores(work / "two-ranks")
    files = lambda root: {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}  # noqa: E731
    a, b = files(one), files(two)
    same_files = a.keys() == b.keys() and all(a[n].read_bytes() == b[n].read_bytes() for n in a if not n.endswith(".json"))
    res.line(f"{args.arch} at {args.res}, {args.images} images, batches and shards of {args.batch}, on {args.device}, decode {args.decode}")
    ratio = res.record("two ranks / one process speed", seconds["one process"] / seconds["two ranks"], show=False)
    res.record("stores byte-identical", same_files, show=False)
    res.line(f"two ranks / one process speed = {ratio:.2f}; stores byte-identical: {same_files}")
    (again,) = cache_schema.list_feature_stores(work / "one-again")
    x = cache_schema.open_complete_store(one)[cache_schema.TOKENS][:].astype(np.float32)
    for name, path in (("two ranks", two), ("one again", again)):  # how far from the first single process
        y = cache_schema.open_complete_store(path)[cache_schema.TOKENS][:].astype(np.float32)
        rows = np.flatnonzero((x != y).reshape(len(x), -1).any(1))
        res.record(f"{name}: images whose tokens differ", len(rows), show=False)
        gap = res.record(f"{name}: max |diff|", np.abs(x - y).max(), show=False)
        res.line(f"{name}: tokens of {len(rows)} of {len(x)} images differ (first {rows[:6].tolist()}); "
                 f"max |diff| {gap:.3g}, tokens' max |value| {np.abs(x).max():.3g}")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
