"""The successors' GPU paths, where the CPU tests cannot reach: HP's attention weights under bf16
autocast at extraction, and SmooSeg, HP and STEGO+… heads trained from the cache on CUDA.

1. Extraction forward with and without HP's attention weights (batch, 224 px, bf16 autocast):
   img/s of each and their ratio, and how far the bf16 weights are from an fp32 forward's.
2. The demo preset's study on the device for the heads named (extraction, kNN, then each head
   for ``--steps`` steps): seconds per head and its best val metrics.

    python benchmarks/gpu_successors.py [--arch vit_small_patch8] [--batch 64] [--heads smooseg hp] [--steps 100]
        [--warmup 1] [--repeats 5] [--json PATH]
    (a CPU smoke run: --device cpu --arch vit_micro_patch8 --batch 4 --steps 10)

The forwards' img/s are of the median of ``--repeats`` forwards after ``--warmup``; each head's
seconds are one whole stage run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from harness import Results, make_parser, time_calls
from stegoscope.config import load_preset
from stegoscope.models.backbone import build_backbone
from stegoscope.ops.hidden_positives import attention_neighbour_weights
from stegoscope.pipeline import run_stage
from stegoscope.records import EvalResult
from stegoscope.study import StudyContext


def attention_cost(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    backbone = build_backbone(f"random:{args.arch}").to(device)
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    grid = args.res // backbone.patch_size

    def forward(attention: bool):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if not attention:
                return backbone(x)
            feats, logits = backbone(x, attention=True)
            return attention_neighbour_weights(logits, (grid, grid), logits.shape[-1] - grid * grid)

    timings = {attention: time_calls(lambda: forward(attention), warmup=args.warmup, repeat=args.repeat, device=device)
               for attention in (False, True)}
    seconds = {attention: timing.median for attention, timing in timings.items()}
    with torch.inference_mode():
        _, logits = backbone(x[:4].float(), attention=True)  # fp32 reference
        reference = attention_neighbour_weights(logits, (grid, grid), logits.shape[-1] - grid * grid)
    plain = res.record("forward", args.batch / seconds[False], "img/s", show=False)
    weighted = res.record("forward with HP's attention weights", args.batch / seconds[True], "img/s", show=False)
    cost = res.record("attention weights' time / forward's", seconds[True] / seconds[False], show=False)
    gap = res.record("bf16 weights vs fp32: max |Δ|", (timings[True].result[:4].float() - reference).abs().max(), show=False)
    res.line(f"{device}; {args.arch} at {args.res} px, batch {args.batch}: forward {plain:,.0f} img/s, "
             f"with HP's attention weights {weighted:,.0f} img/s ({cost:.2f}× the time); "
             f"bf16 weights vs fp32: max |Δ| {gap:.3f} (weights sum to ≈ {reference.sum(-1).mean().item():.2f} per patch)")


def heads(args: argparse.Namespace, res: Results) -> None:
    work = Path(tempfile.mkdtemp(prefix="stegoscope-successors-"))
    overrides = {f"{head}.steps": args.steps for head in args.heads} | {"stego.steps": args.steps, "eval.crf": "none"}
    ctx = StudyContext(load_preset("demo", overrides), work / "cache", None, device=str(res.device), show_progress=False, crf_workers=0)
    for stage in (ctx.extract("train"), ctx.extract("val"), ctx.knn()):
        run_stage(stage)
    for head in args.heads:
        stage = ctx.head(head)
        for node in ctx.graph_of([stage])[:-1]:
            run_stage(node.stage)
        start = time.perf_counter()  # one whole training run: a warm-up would be a second training
        run_stage(stage, force=True)
        seconds = res.record(f"{head} seconds", time.perf_counter() - start, "s", show=False)
        best = EvalResult.from_dict(json.loads((stage.output / "metrics.json").read_text())).best
        cluster = res.record(f"{head} cluster mIoU", best.score("cluster", "mIoU"), show=False)
        linear = res.record(f"{head} linear mIoU", best.score("linear", "mIoU"), show=False)
        res.line(f"{head:<14} D={stage.run.dim:<4} {args.steps} steps in {seconds:6.1f} s; best step {best.step}: "
                 f"cluster mIoU {cluster:.1f}, linear mIoU {linear:.1f}")


def main() -> None:
    parser = make_parser(__doc__, warmup=1, repeat=5, aliases={"repeat": ["--repeats"]})
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--heads", nargs="+", default=["smooseg", "hp", "stego-primaps"])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with Results(args) as res:
        attention_cost(args, res)
        heads(args, res)


if __name__ == "__main__":
    main()
