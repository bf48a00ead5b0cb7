"""Seconds per training step of each head from cached tokens versus with the backbone in the loop.

For every registered head (STEGO, SmooSeg, HP, PriMaPs-EM) one step is the head's own step on
the head-training base: the head's loss, STEGO's probes on the detached code, one backward, the
optimiser steps and the head's hooks (EMA, clipping). From the cache the batch's tokens (and
HP's attention weights, PriMaPs' proposal ids) are gathered from tensors resident on the device,
as ``train`` does for a train store that fits. With the backbone in the loop each step first
runs the frozen ViT as many times as the original code does per step: STEGO 2 (the images and
their kNN partners), SmooSeg 1, HP 2 (the clean view with its attention, and the photometric
view), PriMaPs-EM 2 (the clean view for the teacher, the photometric view for the student);
bf16 autocast on CUDA. Same batch, same device, one run. Prints s/step for each and the ratio.

    python benchmarks/successor_step.py [--arch vit_small_patch8] [--batch 32] [--res 224] [--steps 5] [--device auto]
        [--warmup 2] [--json PATH]

Each s/step is the median of ``--steps`` (alias ``--repeat``) steps, each timed alone, after ``--warmup``.

On a CPU, try `--arch vit_small_patch8 --batch 4 --res 112 --steps 2`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from harness import Results, make_parser, time_calls
from stegoscope import methods as registry
from stegoscope.cache_schema import ATTENTION, MASK_IDS
from stegoscope.heads.base import HeadRun, TokenBatch
from stegoscope.models.backbone import build_backbone
from stegoscope.ops.hidden_positives import attention_neighbour_weights
from stegoscope.probing import Probes

FORWARDS = {"stego": 2, "smooseg": 1, "hp": 2, "primaps": 2}  # backbone forwards per step in the original code
SMALL = {"hp": {"pool_size": 256}, "primaps": {"init_images": 64, "init_epochs": 0}}  # fast set-up; the step is the same


class ResidentBatches:
    """Rows of a resident token tensor, as the base's TokenBatches gives them."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels, self.device = tokens, labels, tokens.device

    def __len__(self) -> int:
        return len(self.tokens)

    def __call__(self, rows):
        index = torch.as_tensor(np.asarray(rows), device=self.device)
        return self.tokens[index].permute(0, 3, 1, 2).float(), self.labels[index % len(self.labels)]


def main() -> None:
    parser = make_parser(__doc__, warmup=2, repeat=5, aliases={"repeat": ["--steps"]})
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cached-images", type=int, default=256)
    parser.add_argument("--heads", nargs="+", default=list(FORWARDS))
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    backbone = build_backbone(f"random:{args.arch}").to(device)
    c, grid, n_classes = backbone.embed_dim, args.res // backbone.patch_size, 27
    g = torch.Generator(device="cpu").manual_seed(0)
    cached = torch.randn(args.cached_images, grid, grid, c, generator=g).half().to(device)
    labels = torch.randint(-1, n_classes, (args.cached_images, args.res, args.res), generator=g).to(device)
    attention = torch.rand(args.cached_images, grid, grid, 9, generator=g).half().to(device)
    mask_ids = torch.randint(0, 8, (args.cached_images, args.res, args.res), generator=g).to(torch.uint8).to(device)
    images = torch.randn(args.batch, 3, args.res, args.res, generator=g).to(device)
    data = ResidentBatches(cached, labels)
    res.line(f"{device}; {args.arch} at {args.res} px ({grid}×{grid}×{c} tokens); batch {args.batch}; "
             f"median of {args.repeat} steps after {args.warmup} warm-up")
    res.line(f"{'head':<10}{'cache s/step':>14}{'backbone s/step':>17}{'forwards':>10}{'ratio':>8}")
    for name in args.heads:
        spec = registry.get(name)
        params = spec.params(**({"batch_size": args.batch} | SMALL.get(name, {})))
        dim = c if getattr(spec.cls, "fixed_dim", False) else args.dim
        trainer = spec.cls(params, HeadRun(n_classes=n_classes, dim=dim), c)
        head = trainer.make_head().to(device)
        trainer.begin(head, data, torch.Generator().manual_seed(0))
        probes = Probes(dim, n_classes).to(device)
        optimizers = [trainer.optimizer(head), *probes.optimizers(5e-3, 5e-3)]
        rng = np.random.default_rng(0)
        step_count = [0]

        def step(feats: torch.Tensor, rows: np.ndarray) -> None:
            index = torch.as_tensor(rows, device=device)
            extras = {ATTENTION: attention[index], MASK_IDS: mask_ids[index]}
            partner = feats.roll(1, 0) if trainer.uses_knn else None
            batch = TokenBatch(rows, feats, labels[index], partner, extras, step_count[0] + 1)
            code, loss, _ = trainer.loss(head, batch, torch.Generator().manual_seed(int(rows[0])))
            lin, clu = probes.losses(code.detach(), labels[index])
            for opt in optimizers:
                opt.zero_grad()
            (loss + lin + clu).backward()
            trainer.after_backward(head)
            for opt in optimizers:
                opt.step()
            step_count[0] += 1
            trainer.after_step(head, step_count[0])

        def from_cache() -> None:
            rows = rng.choice(len(cached), args.batch, replace=False)
            step(data(rows)[0], rows)

        def with_backbone() -> None:
            rows = rng.choice(len(cached), args.batch, replace=False)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                outs = [backbone(images, attention=(name == "hp" and i == 0)) for i in range(FORWARDS[name])]
                first = outs[0]
                if name == "hp":  # the weights come from this step's attention, as the original computes them
                    first, logits = first
                    attention[torch.as_tensor(rows, device=device)] = attention_neighbour_weights(logits, (grid, grid)).half()
            step(first.permute(0, 3, 1, 2).float(), rows)

        cache_s, backbone_s = (res.record(f"{name} {kind}", time_calls(fn, warmup=args.warmup, repeat=args.repeat, device=device).median,
                                          "s/step", show=False)
                               for kind, fn in (("from cache", from_cache), ("with backbone", with_backbone)))
        ratio = res.record(f"{name} backbone / cache", backbone_s / cache_s, show=False)
        res.line(f"{name:<10}{cache_s:>14.4f}{backbone_s:>17.4f}{FORWARDS[name]:>10}{ratio:>8.1f}")


if __name__ == "__main__":
    main()
