"""The successors' GPU paths, where the CPU tests cannot reach: HP's attention weights under bf16
autocast at extraction, and SmooSeg, HP and STEGO+… heads trained from the cache on CUDA.

1. Extraction forward with and without HP's attention weights (batch, 224 px, bf16 autocast):
   img/s of each and their ratio, and how far the bf16 weights are from an fp32 forward's.
2. The demo preset's study on the device for the heads named (extraction, kNN, then each head
   for ``--steps`` steps): seconds per head and its best val metrics.

    python benchmarks/gpu_successors.py [--arch vit_small_patch8] [--batch 64] [--heads smooseg hp] [--steps 100]
    (a CPU smoke run: --device cpu --arch vit_micro_patch8 --batch 4 --steps 10)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stegoscope.config import load_preset
from stegoscope.models import resolve_device
from stegoscope.models.backbone import build_backbone
from stegoscope.ops.hidden_positives import attention_neighbour_weights
from stegoscope.pipeline import run_stage
from stegoscope.records import EvalResult
from stegoscope.study import StudyContext


def attention_cost(args, device: torch.device) -> None:
    backbone = build_backbone(f"random:{args.arch}").to(device)
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    grid = args.res // backbone.patch_size

    def forward(attention: bool):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if not attention:
                return backbone(x)
            feats, logits = backbone(x, attention=True)
            return attention_neighbour_weights(logits, (grid, grid), logits.shape[-1] - grid * grid)

    seconds = {}
    for attention in (False, True):
        forward(attention)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = forward(attention)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[attention] = (time.perf_counter() - start) / args.repeats
    with torch.inference_mode():
        _, logits = backbone(x[:4].float(), attention=True)  # fp32 reference
        reference = attention_neighbour_weights(logits, (grid, grid), logits.shape[-1] - grid * grid)
    gap = (out[:4].float() - reference).abs().max().item()
    print(f"{device}; {args.arch} at {args.res} px, batch {args.batch}: forward {args.batch / seconds[False]:,.0f} img/s, "
          f"with HP's attention weights {args.batch / seconds[True]:,.0f} img/s ({seconds[True] / seconds[False]:.2f}× the time); "
          f"bf16 weights vs fp32: max |Δ| {gap:.3f} (weights sum to ≈ {reference.sum(-1).mean().item():.2f} per patch)")


def heads(args, device: torch.device) -> None:
    work = Path(tempfile.mkdtemp(prefix="stegoscope-successors-"))
    overrides = {f"{head}.steps": args.steps for head in args.heads} | {"stego.steps": args.steps, "eval.crf": "none"}
    ctx = StudyContext(load_preset("demo", overrides), work / "cache", None, device=str(device), show_progress=False, crf_workers=0)
    for stage in (ctx.extract("train"), ctx.extract("val"), ctx.knn()):
        run_stage(stage)
    for head in args.heads:
        stage = ctx.head(head)
        for node in ctx.graph_of([stage])[:-1]:
            run_stage(node.stage)
        start = time.perf_counter()
        run_stage(stage, force=True)
        best = EvalResult.from_dict(json.loads((stage.output / "metrics.json").read_text())).best
        print(f"{head:<14} D={stage.run.dim:<4} {args.steps} steps in {time.perf_counter() - start:6.1f} s; best step {best.step}: "
              f"cluster mIoU {best.score('cluster', 'mIoU'):.1f}, linear mIoU {best.score('linear', 'mIoU'):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", nargs="+", default=["smooseg", "hp", "stego-primaps"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    attention_cost(args, device)
    heads(args, device)


if __name__ == "__main__":
    main()
