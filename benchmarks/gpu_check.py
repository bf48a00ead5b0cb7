"""GPU correctness of the extraction path, where the CPU tests cannot reach: nvJPEG and bf16.

Extracts one generated folder (JPEGs plus PNGs that take the reader fallback) three ways —
CUDA with device decode, CUDA with worker (PIL) decode, CPU fp32 as the reference — and
prints how far the stored pixels and tokens are apart. Then checks that a truncated JPEG
decoded on the GPU stops the run with the file named.

    python benchmarks/gpu_check.py [--images 96] [--arch vit_small_patch8] [--res 224] [--workdir DIR] [--device cuda] [--json PATH]
    (from the benchmarks folder or with it on PYTHONPATH; a CPU smoke run: --device cpu --images 8 --arch vit_micro_patch8;
    --gpu is the old spelling of --device)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gpu_extract import make_jpegs
from harness import Results, device_name, make_parser
from stegoscope import cache_schema
from stegoscope.data import DatasetError
from stegoscope.pipeline import run_stage
from stegoscope.stages.extract import ExtractParams, ExtractStage


def extract(data: Path, cache: Path, args: argparse.Namespace, device: str, decode: str):
    params = ExtractParams(dataset="directory", split="train", res=args.res, backbone=f"random:{args.arch}", store_images=True)
    stage = ExtractStage(cache, data, params, batch_size=32, workers=4, device=device, decode=decode, show_progress=False)
    run_stage(stage, force=True)
    return cache_schema.open_feature_store(stage.output)


def main() -> None:
    # --device is the device under test (cpu: a smoke run of this script); nothing is timed
    parser = make_parser(__doc__, device="cuda", warmup=None, repeat=None, aliases={"device": ["--gpu"]})
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stegoscope-gpu-check")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(args.workdir, ignore_errors=True)
    data = make_jpegs(args.workdir / "data", args.images)
    folder = data / "imgs" / "train"
    for path in sorted(folder.glob("*.jpg"))[:2]:  # two PNGs: the reader fallback
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()

    gpu = str(res.device)
    stores = {name: extract(data, args.workdir / name, args, device, decode)
              for name, device, decode in (("gpu-nvjpeg", gpu, "device"), ("gpu-pil", gpu, "cpu"), ("cpu-fp32", "cpu", "cpu"))}
    reference = stores["cpu-fp32"]
    res.line(f"{device_name(res.device)}; {args.images} images; random:{args.arch} @{args.res}")
    for name, store in stores.items():
        pixels = np.abs(store[cache_schema.IMAGES][:].astype(int) - reference[cache_schema.IMAGES][:].astype(int))
        a = torch.from_numpy(store[cache_schema.TOKENS][:].astype(np.float32)).flatten(0, 2)
        b = torch.from_numpy(reference[cache_schema.TOKENS][:].astype(np.float32)).flatten(0, 2)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        figures = {"pixels vs PIL: max |diff|": (pixels.max(), ""), "pixels vs PIL: differing": (100 * (pixels > 0).mean(), "%"),
                   "tokens vs CPU fp32: rel. error": ((a - b).norm() / b.norm(), ""),
                   "tokens vs CPU fp32: cosine min": (cosine.min(), ""), "tokens vs CPU fp32: cosine mean": (cosine.mean(), "")}
        v = [res.record(f"{name} {figure}", value, unit, show=False) for figure, (value, unit) in figures.items()]
        res.line(f"{name:11s} pixels vs PIL: max |diff| {v[0]:3d}, differing {v[1]:5.2f} %; "
                 f"tokens vs CPU fp32: rel. error {v[2]:.4f}, cosine min {v[3]:.4f} mean {v[4]:.5f}")

    bad = next(folder.glob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:300])
    try:
        extract(data, args.workdir / "bad", args, gpu, "device")
        res.record("truncated JPEG caught", False, show=False)
        res.line(f"truncated JPEG: NOT caught ({bad.name} was decoded without an error)")
    except DatasetError as exc:
        res.record("truncated JPEG caught", True, show=False)
        res.line(f"truncated JPEG: stopped with {str(exc)[:160]}")


if __name__ == "__main__":
    main()
