"""Extraction against its own ceiling, on any machine: each stage alone, then the whole pipeline.

  (a) each stage alone, in images per second:
      decode  the DataLoader (its workers) over a generated folder of 640×480 JPEGs, nothing else;
      model   the model stage (the backbone, bf16 on CUDA, and its conversions) on a batch already on
              the device, or with ``--model null`` a stand-in that takes ``--null-ms`` a batch
              without using the CPU (as a GPU would) and returns tokens of the real shape;
      h2d     (CUDA) a batch of pixels copied from pinned memory; d2h: its tokens copied back;
      encode  the shard encoder (one join and one crc32c per image) on the tokens of a shard;
      write   the encoded bytes written as shard files, then fsynced (the median of three runs).
  (b) the whole pipeline (`extract_shards`, the code `stegoscope extract` runs) over the same
      folder with the same model, into a store of its own that is never marked complete, with its
      stage profile (as `extract --profile` prints it).

The pipeline can go no faster than its slowest stage alone, so the last line is
``score: (b) / min(a)``; the goal is ≥ 0.85. Stages that share the CPU (decoding, encoding,
writing) can bound it lower than each alone: the profile says which stage waits on which. A CPU run that checks the overlap (the null model
stands for a GPU that is busy 0.25 s a batch):

    python benchmarks/extract_pipeline.py --model null --images 512 --batch 32 --null-ms 250

(with ``--model real`` the backbone runs on this CPU too, and every stage shares its cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_extract import SIZE, make_jpegs, raw_write
from harness import Results, device_name, make_parser, time_calls
from stegoscope.cache_schema import POOLED, TOKENS
from stegoscope.data import ExtractionDataset
from stegoscope.models.backbone import build_backbone
from stegoscope.profiling import verdict
from stegoscope.raw_shards import ShardLayout
from stegoscope.stages.extract import ExtractParams, ExtractStage, _forward, extract_shards, pipeline_clock, writer_threads


class NullModel:
    """The model stage's shape without its work: ``seconds`` a batch asleep (the CPU stays free,
    as while a GPU computes), then the arrays of a batch: fp16 tokens (B, h, w, C) of a fixed
    random draw and their float32 mean."""

    def __init__(self, grid: int, channels: int, batch: int, seconds: float, device: torch.device):
        tokens = torch.randn(batch, grid, grid, channels, generator=torch.Generator().manual_seed(0))
        self.tokens, self.pooled = tokens.half().to(device), tokens.mean(dim=(1, 2)).to(device)
        self.seconds, self.device = seconds, device

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what came before is not this batch's time
        time.sleep(self.seconds)
        return {TOKENS: self.tokens[: len(pixels)], POOLED: self.pooled[: len(pixels)]}


def model_for(args: argparse.Namespace, device: torch.device):
    """The model stage: the real backbone's (:func:`_forward`) or the null model."""
    backbone = build_backbone(f"random:{args.arch}")
    if args.model == "null":
        return NullModel(args.res // backbone.patch_size, backbone.embed_dim, args.batch, args.null_ms / 1000, device)
    backbone = backbone.to(device).eval()
    return lambda pixels: _forward(backbone, pixels, device, False)


def stage_for(args: argparse.Namespace, data: Path, cache: Path, device: torch.device) -> ExtractStage:
    params = ExtractParams(dataset="directory", split="train", res=args.res, backbone=f"random:{args.arch}")
    return ExtractStage(cache, data, params, batch_size=args.batch, workers=args.workers, shard_images=args.shard,
                        device=str(device), show_progress=False, decode="cpu", writers=args.writers)


def decode_alone(stage: ExtractStage, args: argparse.Namespace) -> float:
    samples = stage.samples({})
    view = ExtractionDataset(stage.dataset, args.res, stage.p.interpolation, samples, list(range(len(samples))))
    loader = torch.utils.data.DataLoader(view, batch_size=args.batch, num_workers=args.workers, collate_fn=view.collate)
    start = time.perf_counter()
    n = sum(len(batch["index"]) for batch in loader)  # the workers' start included, as in the pipeline
    return n / (time.perf_counter() - start)


def model_alone(model, args: argparse.Namespace, device: torch.device) -> tuple[float, dict]:
    pixels = torch.randint(0, 256, (args.batch, args.res, args.res, 3), dtype=torch.uint8, device=device)
    timing = time_calls(lambda: model(pixels), warmup=args.warmup, repeat=args.repeat, device=device)
    return args.batch / timing.median, model(pixels)


def copies_alone(arrays: dict, args: argparse.Namespace, device: torch.device) -> tuple[float | None, float | None]:
    """Images per second of the pinned host→device copy of a batch's pixels, and device→host of its outputs."""
    if device.type != "cuda":
        return None, None  # one memory: no copy
    pixels = torch.empty((args.batch, args.res, args.res, 3), dtype=torch.uint8, pin_memory=True)
    host = {name: torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for name, value in arrays.items()}
    h2d = time_calls(lambda: pixels.to(device, non_blocking=True), warmup=args.warmup, repeat=args.repeat, device=device)

    def back() -> None:
        for name, value in arrays.items():
            host[name].copy_(value, non_blocking=True)

    d2h = time_calls(back, warmup=args.warmup, repeat=args.repeat, device=device)
    return args.batch / h2d.median, args.batch / d2h.median


def encode_alone(tokens: np.ndarray, args: argparse.Namespace) -> tuple[float, int]:
    """Images per second of the shard encoder, and the bytes it makes per image."""
    shard = np.concatenate([tokens] * -(-args.shard // len(tokens)))[: args.shard]
    layout = ShardLayout(args.shard, (1, *shard.shape[1:]), shard.dtype, True, args.shard, str)
    encoded = sum(memoryview(part).nbytes for part in layout.encode(shard))
    timing = time_calls(lambda: layout.encode(shard), warmup=args.warmup, repeat=args.repeat)
    return args.shard / timing.median, encoded // args.shard


def pipeline(stage: ExtractStage, model, device: torch.device) -> tuple[float, list]:
    """Images per second of the whole pipeline into a store of its own (never marked complete:
    nothing downstream can take the stand-in's tokens for the backbone's), and its profile."""
    store = stage._open_or_create(force=True)
    samples = stage.samples({})
    clock = pipeline_clock(stage.options.workers, writer_threads(stage.options.writers, device))
    start = time.perf_counter()
    extract_shards(stage, store, store.layout, samples, store.pending_shards(), clock, model)
    seconds = time.perf_counter() - start
    profile = clock.profile()
    shutil.rmtree(stage.output)
    return len(samples) / seconds, profile


def main() -> None:
    parser = make_parser(__doc__, warmup=2, repeat=5)
    parser.add_argument("--model", choices=["null", "real"], default="null")
    parser.add_argument("--null-ms", type=float, default=250.0, help="the null model's time per batch")
    parser.add_argument("--arch", default="vit_small_patch8", help="the backbone (its shapes, for the null model)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard", type=int, default=64, help="images per store shard")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader decode workers")
    parser.add_argument("--writers", type=int, default=None, help="shard writer threads (default: the stage's)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stegoscope-extract-pipeline")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = res.device
    data = make_jpegs(args.workdir / "data", args.images)
    stage = stage_for(args, data, args.workdir / "cache", device)
    model = model_for(args, device)
    model_name = f"null ({args.null_ms:g} ms a batch)" if args.model == "null" else "real, random weights"
    res.line(f"{device_name(device)}; {os.cpu_count()} CPUs; {args.images} JPEGs {SIZE[0]}×{SIZE[1]}; {args.arch} at {args.res} "
             f"({model_name}); batch {args.batch}; shard {args.shard}; {args.workers} decode workers; "
             f"{writer_threads(args.writers, device)} writer threads")
    alone = {"decode": decode_alone(stage, args)}
    alone["model"], arrays = model_alone(model, args, device)
    alone["h2d"], alone["d2h"] = copies_alone(arrays, args, device)
    alone["encode"], bytes_per_image = encode_alone(arrays[TOKENS].cpu().numpy(), args)
    # the disk's rate moves from run to run (what the page cache holds dirty): the median of three
    alone["write"] = float(np.median([raw_write(args.workdir / "raw", args.images, bytes_per_image, args.shard) for _ in range(3)]))
    for name, rate in alone.items():
        if rate is not None:
            res.record(f"{name} alone", rate, "img/s", fmt=".1f")
    whole, profile = pipeline(stage, model, device)
    res.record("pipeline", whole, "img/s", fmt=".1f")
    res.line(f"{'stage':8s} {'alone img/s':>12s} {'workers':>8s} {'busy %':>7s} {'waited on %':>12s}")
    for row in profile:
        rate = alone.get(row.stage)
        res.line(f"{row.stage:8s} {'—' if rate is None else f'{rate:.1f}':>12s} {row.workers:8d} {row.busy_share:7.0%} "
                 f"{row.waited_share:12.0%}")
    res.line(verdict(profile))
    slowest = min((rate, name) for name, rate in alone.items() if rate is not None)
    res.line(f"slowest stage alone: {slowest[1]} ({slowest[0]:.1f} img/s); pipeline {whole:.1f} img/s")
    res.record("score", whole / slowest[0], fmt=".2f")


if __name__ == "__main__":
    main()
