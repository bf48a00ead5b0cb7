"""Seconds per STEGO training step from cached tokens versus with the backbone in the loop.

Both steps do the same work after the features exist — head on the batch and its kNN partners,
contrastive correlation loss, linear + cluster probes, one backward, three Adam steps; the
backbone step first runs the frozen ViT on the images and their partners (as the original
code does). Same batch, same device, one run; prints both and the ratio.

    python benchmarks/stego_step.py [--arch vit_small_patch8] [--batch 4] [--steps 5] [--device auto] [--bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from stegoscope.models import resolve_device
from stegoscope.models.backbone import build_backbone
from stegoscope.models.stego_head import StegoHead
from stegoscope.ops.correlation_loss import CorrelationLoss
from stegoscope.ops.kmeans import ClusterLookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone forward (CUDA)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    backbone = build_backbone(f"random:{args.arch}").to(device)
    c, grid, n_classes = backbone.embed_dim, args.res // backbone.patch_size, 27
    head = StegoHead(c, args.dim).to(device)
    linear, cluster = nn.Conv2d(args.dim, n_classes, 1).to(device), ClusterLookup(args.dim, n_classes).to(device)
    opts = [torch.optim.Adam(m.parameters(), lr) for m, lr in ((head, 5e-4), (linear, 5e-3), (cluster, 5e-3))]
    loss_fn = CorrelationLoss(0.67, 0.25, 0.63, 0.08, 0.02, 0.76)
    images = torch.randn(2 * args.batch, 3, args.res, args.res, device=device)
    cached = torch.randn(64, grid, grid, c, device=device).half()  # a resident cached store
    labels = torch.randint(-1, n_classes, (args.batch, args.res, args.res), device=device)

    def train_step(f: torch.Tensor, f_pos: torch.Tensor) -> None:
        code, code_pos = head(f), head(f_pos)
        out = loss_fn(head.dropout(f), head.dropout(f_pos), code, code_pos)
        logits = F.interpolate(linear(code.detach()), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = out["total"] + F.cross_entropy(logits, labels, ignore_index=-1) + cluster(code.detach(), None)[0]
        for opt in opts:
            opt.zero_grad()
        total.backward()
        for opt in opts:
            opt.step()

    def from_cache(step: int) -> None:
        rows = torch.randint(0, len(cached), (2 * args.batch,), device=device)
        feats = cached[rows].permute(0, 3, 1, 2).float()
        train_step(feats[: args.batch], feats[args.batch :])

    def with_backbone(step: int) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            feats = backbone(images).permute(0, 3, 1, 2).float()
        train_step(feats[: args.batch], feats[args.batch :])

    def seconds_per_step(fn) -> float:
        fn(0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(args.steps):
            fn(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    cache_s, backbone_s = seconds_per_step(from_cache), seconds_per_step(with_backbone)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {args.arch} @{args.res}, batch {args.batch}, D {args.dim}{', bf16 backbone' if args.bf16 else ''}")
    print(f"from cache:    {cache_s:.4f} s/step")
    print(f"with backbone: {backbone_s:.4f} s/step")
    print(f"ratio (backbone / cache) = {backbone_s / cache_s:.1f}x")


if __name__ == "__main__":
    main()
