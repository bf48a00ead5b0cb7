"""Seconds per STEGO training step from cached tokens versus with the backbone in the loop.

Every step does the same work after the features exist: the head on the batch and on its kNN
partners, the contrastive correlation loss, linear + cluster probes, one backward and three
Adam steps. The backbone steps first run the frozen ViT on the images and their partners, as
the original code does: once in fp32 (like the original) and once with bf16 autocast. The
cache step gathers the rows from a token store kept resident in device memory, as
`train-stego` does for a train store that fits. Same batch, same device, one run. Prints
s/step for each and the two ratios (backbone / cache), the host and device time of a cache step
(host: issuing it; device: CUDA events — a step that keeps the GPU busy has host ≤ device), and
``--members`` heads (a λ grid) trained as a group — one gather, every head's forward and
backward, one merged optimiser update (``training.merged``) — against the same heads alone.

    python benchmarks/gpu_stego.py [--arch vit_base_patch8] [--batch 32] [--res 224] [--steps 10] [--members 4]
                                   [--device auto] [--profile]

The defaults are the GPU setting of the issue: ViT-B/8 shapes, batch 32. On a CPU, try
`--arch vit_small_patch8 --batch 8 --steps 3`.
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
from stegoscope.training import merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cached-images", type=int, default=256, help="images in the resident token store")
    parser.add_argument("--members", type=int, default=4, help="heads of the grouped-vs-alone comparison")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="print the profiler's table of 5 steps from the cache")
    args = parser.parse_args()
    device = resolve_device(args.device)
    backbone = build_backbone(f"random:{args.arch}").to(device)
    c, grid, n_classes = backbone.embed_dim, args.res // backbone.patch_size, 27
    images = torch.randn(2 * args.batch, 3, args.res, args.res, device=device)
    cached = torch.randn(args.cached_images, grid, grid, c, device=device).half()  # a resident cached store
    labels = torch.randint(-1, n_classes, (args.batch, args.res, args.res), device=device)

    def member(lambda_rand: float):
        """A head with its probes and optimisers, and its loss on a batch (STEGO's step)."""
        head = StegoHead(c, args.dim).to(device)
        linear, cluster = nn.Conv2d(args.dim, n_classes, 1).to(device), ClusterLookup(args.dim, n_classes).to(device)
        opts = [torch.optim.Adam(m.parameters(), lr) for m, lr in ((head, 5e-4), (linear, 5e-3), (cluster, 5e-3))]
        loss_fn = CorrelationLoss(0.67, 0.25, lambda_rand, 0.08, 0.02, 0.76)

        def loss(f: torch.Tensor, f_pos: torch.Tensor) -> torch.Tensor:
            code, code_pos = head(f), head(f_pos)
            out = loss_fn(head.dropout(f), head.dropout(f_pos), code, code_pos)
            logits = F.interpolate(linear(code.detach()), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            return out["total"] + F.cross_entropy(logits, labels, ignore_index=-1) + cluster(code.detach(), None)[0]

        return loss, opts

    loss, opts = member(0.63)

    def train_step(f: torch.Tensor, f_pos: torch.Tensor) -> None:
        for opt in opts:
            opt.zero_grad()
        loss(f, f_pos).backward()
        for opt in opts:
            opt.step()

    def gathered() -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(cached), (2 * args.batch,), device=device)
        feats = cached[rows].permute(0, 3, 1, 2).float()
        return feats[: args.batch], feats[args.batch :]

    def from_cache(step: int) -> None:
        train_step(*gathered())

    grid_members = [member(lam) for lam in torch.linspace(0.3, 0.9, args.members).tolist()]
    group_opts = merged([opt for _, member_opts in grid_members for opt in member_opts])

    def grouped(step: int) -> None:  # one gather, every member's backward, one update
        f, f_pos = gathered()
        for opt in group_opts:
            opt.zero_grad()
        for member_loss, _ in grid_members:
            member_loss(f, f_pos).backward()
        for opt in group_opts:
            opt.step()

    def alone(step: int) -> None:  # each member its own gather and update, one after another
        for member_loss, member_opts in grid_members:
            f, f_pos = gathered()
            for opt in member_opts:
                opt.zero_grad()
            member_loss(f, f_pos).backward()
            for opt in member_opts:
                opt.step()

    def with_backbone(bf16: bool):
        def step(_: int) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                feats = backbone(images).permute(0, 3, 1, 2).float()
            train_step(feats[: args.batch], feats[args.batch :])

        return step

    def timed(fn) -> tuple[float, float]:
        """(wall, host) seconds per step: host is the time to issue the steps; on CUDA, wall waits
        for the device (CUDA events), so host < wall means the GPU, not Python, sets the pace."""
        fn(0)  # warm-up
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        start = time.perf_counter()
        for step in range(args.steps):
            fn(step)
        host = time.perf_counter() - start
        if not cuda:
            return host / args.steps, host / args.steps
        ended.record()
        torch.cuda.synchronize()
        return began.elapsed_time(ended) / 1000 / args.steps, host / args.steps

    def seconds_per_step(fn) -> float:
        return timed(fn)[0]

    if args.profile:  # where a step from the cache spends its time on the device
        from torch.profiler import ProfilerActivity, profile

        from_cache(0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for step in range(5):
                from_cache(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))
    cache_s, cache_host_s = timed(from_cache)
    group_s, alone_s = seconds_per_step(grouped), seconds_per_step(alone)
    fp32_s = seconds_per_step(with_backbone(False))
    bf16_s = seconds_per_step(with_backbone(True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {args.arch} @{args.res}, batch {args.batch} (+{args.batch} kNN partners), D {args.dim}, {args.steps} steps")
    print(f"from cache (resident store):  {cache_s:.4f} s/step   host {cache_host_s:.4f} s/step (device-bound: host < wall)")
    print(f"{args.members} heads grouped:          {group_s:.4f} s/step   alone one after another {alone_s:.4f} s/step   "
          f"alone / grouped {alone_s / group_s:.2f}x")
    print(f"with backbone, fp32:          {fp32_s:.4f} s/step   ratio {fp32_s / cache_s:.1f}x")
    print(f"with backbone, bf16 autocast: {bf16_s:.4f} s/step   ratio {bf16_s / cache_s:.1f}x")


if __name__ == "__main__":
    main()
