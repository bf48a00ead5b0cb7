"""Seconds of HP's hidden-positive loss (forward + backward) by anchor blocks per kernel.

The loss over B·P patches runs B anchor blocks of P rows against all B·P; ``blocks_per_chunk``
of them share each kernel (the same loss; memory grows with it). Prints s per call for each
chunk size and its speed-up over one block at a time, measured in one run.

    python benchmarks/hp_loss.py [--batch 32] [--grid 28] [--dim 512] [--channels 384] [--chunks 1 2 4 8 16 32]
        [--device auto] [--warmup 1] [--repeats 3] [--json PATH]

Each figure is the median of ``--repeats`` calls after ``--warmup``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from harness import Results, make_parser, time_calls
from stegoscope.ops.hidden_positives import hidden_positive_loss


def main() -> None:
    parser = make_parser(__doc__, warmup=1, repeat=3, aliases={"repeat": ["--repeats"]})
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    g = torch.Generator().manual_seed(0)
    b, p = args.batch, args.grid ** 2
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)  # noqa: E731
    z, z_mix = unit(b, p, args.dim).requires_grad_(), unit(b, p, args.dim).requires_grad_()
    inputs = dict(feats=unit(b, p, args.channels), ema_codes=unit(b, p, args.dim), pool_feats=unit(args.pool, args.channels),
                  pool_codes=unit(args.pool, args.dim), random_negatives=(torch.rand(p, b * p, generator=g) < 0.02).to(device))
    res.line(f"{device}; batch {b}, {p} patches each ({b * p} rows), D {args.dim}, C {args.channels}; s per forward + backward")
    base = None
    for chunk in args.chunks:
        def call() -> None:
            hidden_positive_loss(z, z_mix, **inputs, lam=0.5, tau=0.6, blocks_per_chunk=chunk).backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # this chunk size's peak (its warm-up does the same work)
        timing = time_calls(call, warmup=args.warmup, repeat=args.repeat, device=device)
        seconds = res.record(f"blocks per chunk {chunk}", timing.median, "s", show=False)
        base = base or seconds
        speedup = res.record(f"blocks per chunk {chunk} speed-up", base / seconds, show=False)
        peak = ""
        if device.type == "cuda":
            gb = res.record(f"blocks per chunk {chunk} peak", torch.cuda.max_memory_allocated() / 1e9, "GB", show=False)
            peak = f", peak {gb:.1f} GB"
        res.line(f"blocks per chunk {chunk:>3}: {seconds:.4f} s ({speedup:.1f}×){peak}")


if __name__ == "__main__":
    main()
