"""Extraction at the model's speed? Three throughputs of one machine, measured in one run.

  (a) model only: the backbone (bf16 autocast on CUDA) on random input already on the device;
  (b) end to end: `stegoscope extract` of a generated folder of 640×480 JPEGs into a store on
      local disk (decode on the device, pinned buffers, writer threads, fsync at completion);
  (c) raw disk: the same number of token bytes written as plain shard files to the same disk,
      then fsynced.

The extraction can go no faster than the slower of the model and the disk, so the figure of
merit is (b) / min(a, c); the issue's goal is ≥ 0.85 for ViT-S/8 and ViT-B/8 at 224. (b) is
given twice: over the whole run, and "steady" from the first batch on (without building the
model and starting the DataLoader workers). Backbones have random weights: speed does not
depend on them.

    python benchmarks/gpu_extract.py [--images 5000] [--archs vit_small_patch8 vit_base_patch8] [--res 224]
        [--batch 128] [--workers 12] [--decode auto] [--compile] [--writers N] [--workdir DIR] [--device auto]
        [--warmup 3] [--repeat 20] [--json PATH]

(a) is the median of ``--repeat`` batches after ``--warmup`` (and compilation).

A CPU smoke run: `--images 48 --archs vit_micro_patch8 --res 64 --batch 16 --workers 2`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from harness import Results, device_name, make_parser, time_calls
from stegoscope.atomic import fsync_tree
from stegoscope.models.backbone import build_backbone
from stegoscope.pipeline import run_stage
from stegoscope.stages.extract import ExtractParams, ExtractStage

SIZE = (640, 480)


def _write_jpeg(args: tuple[Path, int]) -> None:
    """A smooth random photo-like image (upscaled noise plus grain), JPEG quality 90."""
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(SIZE, Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (SIZE[1], SIZE[0], 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int) -> Path:
    """``root/imgs/train/*.jpg`` (the `directory` dataset's layout, unlabelled); reused if there."""
    folder = root / "imgs" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", i) for i in range(n) if not (folder / f"{i:06d}.jpg").exists()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_jpeg, todo, chunksize=64))
    for extra in sorted(folder.glob("*.jpg"))[n:]:
        extra.unlink()
    return root


def model_only(arch: str, res: int, batch: int, device: torch.device, compile: bool, warmup: int, repeat: int) -> float:
    """Images per second of the backbone alone: the median batch after ``warmup`` (and compilation)."""
    backbone = build_backbone(f"random:{arch}").to(device).eval()
    if compile:
        backbone = torch.compile(backbone, dynamic=False)
    x = torch.randn(batch, 3, res, res, device=device)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            backbone(x).half()

    return batch / time_calls(run, warmup=warmup, repeat=repeat, device=device).median


def end_to_end(arch: str, args: argparse.Namespace, data: Path, cache: Path, device: torch.device):
    params = ExtractParams(dataset="directory", split="train", res=args.res, backbone=f"random:{arch}")
    stage = ExtractStage(
        cache, data, params, batch_size=args.batch, workers=args.workers, device=str(device), show_progress=False,
        decode=args.decode, compile=args.compile, writers=args.writers,
    )
    stage.key  # fingerprint the folder before the clock starts
    summary = run_stage(stage, force=True).detail
    shutil.rmtree(stage.output)
    return summary


def raw_write(folder: Path, n_images: int, bytes_per_image: int, shard_images: int = 128) -> float:
    """Images per second of writing ``n_images × bytes_per_image`` as shard files, fsynced."""
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 256, shard_images * bytes_per_image, dtype=np.uint8).tobytes()
    start = time.perf_counter()  # every shard written and fsynced once, as an extraction writes them
    for shard, first in enumerate(range(0, n_images, shard_images)):
        rows = min(shard_images, n_images - first)
        with open(folder / f"{shard}", "wb") as fh:
            fh.write(memoryview(block)[: rows * bytes_per_image])
    fsync_tree(folder)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return n_images / seconds


def main() -> None:
    parser = make_parser(__doc__, warmup=3, repeat=20)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--archs", nargs="+", default=["vit_small_patch8", "vit_base_patch8"])
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "device"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--writers", type=int, default=None, help="store writer threads (default: the stage's)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stegoscope-gpu-extract")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()  # the whole run, JPEG generation included: timed once
    data = make_jpegs(args.workdir / "data", args.images)
    jpeg_mb = sum(p.stat().st_size for p in (data / "imgs" / "train").glob("*.jpg")) / 1e6
    res.line(f"{device_name(device)}; {args.images} JPEGs {SIZE[0]}×{SIZE[1]} ({jpeg_mb / args.images * 1000:.0f} KB each, made in "
             f"{time.perf_counter() - start:.0f} s); res {args.res}; batch {args.batch}; {args.workers} workers; "
             f"decode {args.decode}{'; torch.compile' if args.compile else ''}")
    header = f"{'backbone':18s} {'(a) model':>10s} {'(b) e2e':>9s} {'steady':>9s} {'(c) disk':>9s} {'GB/s':>6s}  (b)/min(a,c)  steady/min"
    res.line(header)
    for arch in args.archs:
        backbone = build_backbone(f"random:{arch}")
        grid, channels = args.res // backbone.patch_size, backbone.embed_dim
        bytes_per_image = grid * grid * channels * 2 + channels * 4  # fp16 tokens + float32 pooled
        a = res.record(f"{arch} (a) model", model_only(arch, args.res, args.batch, device, args.compile, args.warmup, args.repeat),
                       "img/s", show=False)
        summary = end_to_end(arch, args, data, args.workdir / "cache", device)
        b = res.record(f"{arch} (b) end to end", summary.images_per_second, "img/s", show=False)
        steady = res.record(f"{arch} (b) steady", summary.steady_images_per_second, "img/s", show=False)
        c = res.record(f"{arch} (c) disk", raw_write(args.workdir / "raw", args.images, bytes_per_image), "img/s", show=False)
        disk = res.record(f"{arch} (c) disk bytes", c * bytes_per_image / 1e9, "GB/s", show=False)
        ceiling = min(a, c)
        ratio = res.record(f"{arch} (b) / min(a, c)", b / ceiling, show=False)
        steady_ratio = res.record(f"{arch} steady / min(a, c)", steady / ceiling, show=False)
        res.line(f"{arch:18s} {a:10.0f} {b:9.0f} {steady:9.0f} {c:9.0f} {disk:6.2f}  {ratio:12.2f}  {steady_ratio:10.2f}")
    res.line(f"img/s throughout; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
