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
                                   [--device auto] [--warmup 1] [--profile] [--json PATH]

Each s/step is the median of ``--steps`` (alias ``--repeat``) steps, each timed alone, after ``--warmup``.

The defaults are the GPU setting of the issue: ViT-B/8 shapes, batch 32. On a CPU, try
`--arch vit_small_patch8 --batch 8 --steps 3`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from harness import Results, device_name, make_parser, time_calls
from stegoscope.models.backbone import build_backbone
from stegoscope.models.stego_head import StegoHead
from stegoscope.ops.correlation_loss import CorrelationLoss
from stegoscope.ops.kmeans import ClusterLookup
from stegoscope.training import merged


def main() -> None:
    parser = make_parser(__doc__, warmup=1, repeat=10, aliases={"repeat": ["--steps"]})
    parser.add_argument("--arch", default="vit_base_patch8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--cached-images", type=int, default=256, help="images in the resident token store")
    parser.add_argument("--members", type=int, default=4, help="heads of the grouped-vs-alone comparison")
    parser.add_argument("--profile", action="store_true", help="print the profiler's table of 5 steps from the cache")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
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

    def from_cache() -> None:
        train_step(*gathered())

    grid_members = [member(lam) for lam in torch.linspace(0.3, 0.9, args.members).tolist()]
    group_opts = merged([opt for _, member_opts in grid_members for opt in member_opts])

    def grouped() -> None:  # one gather, every member's backward, one update
        f, f_pos = gathered()
        for opt in group_opts:
            opt.zero_grad()
        for member_loss, _ in grid_members:
            member_loss(f, f_pos).backward()
        for opt in group_opts:
            opt.step()

    def alone() -> None:  # each member its own gather and update, one after another
        for member_loss, member_opts in grid_members:
            f, f_pos = gathered()
            for opt in member_opts:
                opt.zero_grad()
            member_loss(f, f_pos).backward()
            for opt in member_opts:
                opt.step()

    def with_backbone(bf16: bool):
        def step() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                feats = backbone(images).permute(0, 3, 1, 2).float()
            train_step(feats[: args.batch], feats[args.batch :])

        return step

    def back_to_back(fn) -> tuple[float, float]:
        """(host, device) seconds per step of ``--steps`` steps issued without waiting: host is the time to
        issue them, device waits for the last (CUDA events); host < device means the GPU, not Python, sets
        the pace. The harness times each step alone, synchronised, which cannot show this."""
        fn()  # warm-up
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        start = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        host = (time.perf_counter() - start) / args.repeat
        if not cuda:
            return host, host
        ended.record()
        torch.cuda.synchronize()
        return host, began.elapsed_time(ended) / 1000 / args.repeat

    def seconds_per_step(fn) -> float:
        return time_calls(fn, warmup=args.warmup, repeat=args.repeat, device=device).median

    if args.profile:  # where a step from the cache spends its time on the device
        from torch.profiler import ProfilerActivity, profile

        from_cache()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                from_cache()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        res.line(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))
    cache_s = res.record("from cache", seconds_per_step(from_cache), "s/step", show=False)
    host_s, device_s = back_to_back(from_cache)
    res.record("from cache back to back, host", host_s, "s/step", show=False)
    res.record("from cache back to back, device", device_s, "s/step", show=False)
    group_s = res.record(f"{args.members} heads grouped", seconds_per_step(grouped), "s/step", show=False)
    alone_s = res.record(f"{args.members} heads alone", seconds_per_step(alone), "s/step", show=False)
    fp32_s = res.record("with backbone, fp32", seconds_per_step(with_backbone(False)), "s/step", show=False)
    bf16_s = res.record("with backbone, bf16 autocast", seconds_per_step(with_backbone(True)), "s/step", show=False)
    res.line(f"{device_name(device)}, {args.arch} @{args.res}, batch {args.batch} (+{args.batch} kNN partners), D {args.dim}, "
             f"median of {args.repeat} steps")
    res.line(f"from cache (resident store):  {cache_s:.4f} s/step   back to back: host {host_s:.4f} device {device_s:.4f} s/step "
             "(device-bound: host < device)")
    alone_ratio = res.record("alone / grouped", alone_s / group_s, show=False)
    fp32_ratio, bf16_ratio = (res.record(f"{kind} / cache", s / cache_s, show=False) for kind, s in (("fp32", fp32_s), ("bf16", bf16_s)))
    res.line(f"{args.members} heads grouped:          {group_s:.4f} s/step   alone one after another {alone_s:.4f} s/step   "
             f"alone / grouped {alone_ratio:.2f}x")
    res.line(f"with backbone, fp32:          {fp32_s:.4f} s/step   ratio {fp32_ratio:.1f}x")
    res.line(f"with backbone, bf16 autocast: {bf16_s:.4f} s/step   ratio {bf16_ratio:.1f}x")


if __name__ == "__main__":
    main()
