"""GPU correctness of the extraction path, where the CPU tests cannot reach: nvJPEG and bf16.

Extracts one generated folder (JPEGs plus PNGs that take the reader fallback) three ways —
CUDA with device decode, CUDA with worker (PIL) decode, CPU fp32 as the reference — and
prints how far the stored pixels and tokens are apart. Then checks that a truncated JPEG
decoded on the GPU stops the run with the file named.

    python benchmarks/gpu_check.py [--images 96] [--arch vit_small_patch8] [--res 224] [--workdir DIR]
    (from the benchmarks folder or with it on PYTHONPATH; a CPU smoke run: --gpu cpu --images 8 --arch vit_micro_patch8)
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
from stegoscope import cache_schema
from stegoscope.data import DatasetError
from stegoscope.pipeline import run_stage
from stegoscope.stages.extract import ExtractParams, ExtractStage


def extract(data: Path, cache: Path, args, device: str, decode: str):
    params = ExtractParams(dataset="directory", split="train", res=args.res, backbone=f"random:{args.arch}", store_images=True)
    stage = ExtractStage(cache, data, params, batch_size=32, workers=4, device=device, decode=decode, show_progress=False)
    run_stage(stage, force=True)
    return cache_schema.open_feature_store(stage.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stegoscope-gpu-check")
    parser.add_argument("--gpu", default="cuda", help="the device under test (cpu: a smoke run of this script)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(args.workdir, ignore_errors=True)
    data = make_jpegs(args.workdir / "data", args.images)
    folder = data / "imgs" / "train"
    for path in sorted(folder.glob("*.jpg"))[:2]:  # two PNGs: the reader fallback
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()

    stores = {name: extract(data, args.workdir / name, args, device, decode)
              for name, device, decode in (("gpu-nvjpeg", args.gpu, "device"), ("gpu-pil", args.gpu, "cpu"), ("cpu-fp32", "cpu", "cpu"))}
    reference = stores["cpu-fp32"]
    gpu = torch.cuda.get_device_name() if args.gpu.startswith("cuda") else args.gpu
    print(f"{gpu}; {args.images} images; random:{args.arch} @{args.res}")
    for name, store in stores.items():
        pixels = np.abs(store[cache_schema.IMAGES][:].astype(int) - reference[cache_schema.IMAGES][:].astype(int))
        a = torch.from_numpy(store[cache_schema.TOKENS][:].astype(np.float32)).flatten(0, 2)
        b = torch.from_numpy(reference[cache_schema.TOKENS][:].astype(np.float32)).flatten(0, 2)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        relative = ((a - b).norm() / b.norm()).item()
        print(f"{name:11s} pixels vs PIL: max |diff| {pixels.max():3d}, differing {100 * (pixels > 0).mean():5.2f} %; "
              f"tokens vs CPU fp32: rel. error {relative:.4f}, cosine min {cosine.min():.4f} mean {cosine.mean():.5f}")

    bad = next(folder.glob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:300])
    try:
        extract(data, args.workdir / "bad", args, args.gpu, "device")
        print(f"truncated JPEG: NOT caught ({bad.name} was decoded without an error)")
    except DatasetError as exc:
        print(f"truncated JPEG: stopped with {str(exc)[:160]}")


if __name__ == "__main__":
    main()
