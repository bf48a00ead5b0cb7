"""How long one Fig. 4 sweep of the Cityscapes preset takes on this machine, from the cache.

The sweep is what `stegoscope study cityscapes` runs after extraction: the kNN pairs, the PCA fit
(one for every D), a Gaussian RP fit per D, linear + cluster probes on raw DINO and on PCA / RP
codes at every D of the preset, and a STEGO head (with its probes) at every D, all at the
preset's 7,000 steps with validation every 100 steps.

The stores are synthetic but Cityscapes-sized, written where the preset's extraction would put
them: 2,975 train images five-cropped to 14,875 crops of 28×28×768 fp16 tokens (17.9 GB) and 500
val images of 40×40 tokens, their mirror images' tokens (flip TTA), 320×320 labels and pixels.
Their key is the real extraction key of a generated Cityscapes-format folder, so every later stage
is the real one, run by the real study graph.

A measured fraction of the sweep runs, and the rest is scaled from it:

* trained stages (probes, heads) run at ``7000 / fraction`` steps with the same ``val_every``, so
  both their steps and their validations are ``1 / fraction`` of the full run; their ``metrics.json``
  splits the time into load / train / crf, and the train part is scaled by ``fraction``;
* probes run on raw DINO, at ``--probe-dims`` of PCA and at ``--rp-dims`` of RP; every other (method, D) is costed at
  the mean of the measured PCA / RP probes (a probe's step hardly depends on D: the tokens are
  gathered and projected the same way);
* STEGO heads run at ``--head-dims``; the other dims are costed at their mean;
* fits: PCA once (it serves every D); RP at ``--rp-dims``, costed per D at their mean (the fit of
  each D scans the whole train store for its statistics, the same work at every D);
* the dense CRF (Table 2: raw DINO and STEGO at D=100) runs when pydensecrf imports, else it is
  reported as not measured.

    python benchmarks/gpu_sweep.py [--fraction 14] [--probe-dims 3 768] [--rp-dims 100] [--head-dims 100]
        [--workdir /tmp/stegoscope-sweep] [--device auto] [--set KEY=VALUE ...] [--json PATH]

A CPU smoke run: `--train-images 12 --val-images 4 --set backbone=random:vit_micro_patch8
--set extract.splits.train.res=32 --set extract.splits.val.res=48 --fraction 700 --probe-dims 3 --head-dims 16
--rp-dims 16`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import Results, device_name, make_parser
from stegoscope import cache_schema, probing
from stegoscope.cache_schema import IDS, IMAGES, LABELS, POOLED, TOKENS, TOKENS_FLIP
from stegoscope.config import load_preset, parse_assignment
from stegoscope.pipeline import COMPLETE
from stegoscope.records import EvalResult
from stegoscope.runner import run_graph
from stegoscope.study import StudyContext

FULL_STEPS = 7000


def write_cityscapes_folder(root: Path, n_train: int, n_val: int) -> Path:
    """A Cityscapes-format folder of tiny images (their pixels are never read: the stores are
    written directly), so that the extraction keys are real."""
    base = root / "cityscapes"
    if (base / "done").exists():
        return root
    pixels = np.zeros((16, 32, 3), np.uint8)
    ids = np.zeros((16, 32), np.uint8)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = f"city{i % 18:02d}"
            for kind, suffix, array in (("leftImg8bit", "leftImg8bit", pixels), ("gtFine", "gtFine_labelIds", ids)):
                folder = base / kind / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"{city}_{i:06d}_000019_{suffix}.png")
    (base / "done").touch()
    return root


def fill_store(stage, device: torch.device, n_classes: int, seed: int) -> float:
    """Write the store of extraction ``stage`` with synthetic tokens (a low-rank mixture, as
    DINO's decaying spectrum), labels in blocks of 8×8 pixels, and pixels. Returns GB written."""
    if stage.state() == COMPLETE:
        return 0.0
    shutil.rmtree(stage.output, ignore_errors=True)
    n = len(stage.samples({}))
    layout = stage.layout(n)
    store = cache_schema.create_feature_store(stage.output, layout, stage.store_attrs({}))
    cache_schema.write_sources(stage.output, stage.source_rows)
    (h, w), c, (ph, pw) = layout.grid, layout.channels, layout.pixels
    ids = np.array(stage.row_ids(stage.samples({})))
    generator = torch.Generator(device=device).manual_seed(seed)
    mixing = torch.randn(48, c, device=device, generator=generator) * torch.linspace(3, 0.1, c, device=device)

    def shard_arrays(s: int) -> dict[str, np.ndarray]:
        rows = len(range(*layout.shard_slice(s).indices(n)))
        g = torch.Generator(device=device).manual_seed(seed * 100_003 + s)
        make = lambda: (torch.randn(rows, h, w, 48, device=device, generator=g) @ mixing).half()  # noqa: E731
        tokens = make()
        arrays = {TOKENS: tokens.cpu().numpy(), POOLED: tokens.float().mean((1, 2)).cpu().numpy(), IDS: ids[layout.shard_slice(s)]}
        if layout.flip:
            arrays[TOKENS_FLIP] = make().cpu().numpy()
        if layout.labelled:
            blocks = torch.randint(-1, n_classes, (rows, ph // 8, pw // 8), device=device, generator=g)
            arrays[LABELS] = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2).short().cpu().numpy()
        if layout.with_images:
            arrays[IMAGES] = torch.randint(0, 256, (rows, ph, pw, 3), device=device, generator=g, dtype=torch.uint8).cpu().numpy()
        return arrays

    def write(s: int) -> None:
        store.write_shard(s, shard_arrays(s), commit=False)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(layout.n_shards)))
    store.commit(list(range(layout.n_shards)))
    store.mark_complete()
    assert stage.state() == COMPLETE, f"{stage.output} is not a complete store of its key"
    return sum(store[name].nbytes for name in store.group.array_keys()) / 1e9


def main() -> None:
    parser = make_parser(__doc__, warmup=None, repeat=None)  # whole stages of the study, each run once
    parser.add_argument("--fraction", type=int, default=14, help="trained stages run 7000/FRACTION steps")
    parser.add_argument("--probe-dims", type=int, nargs="+", default=[3, 768])
    parser.add_argument("--rp-dims", type=int, nargs="+", default=[100])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[100])
    parser.add_argument("--train-images", type=int, default=2975, help="Cityscapes train images (five crops each)")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/stegoscope-sweep"))
    parser.add_argument("--crf-workers", type=int, default=os.cpu_count())
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override KEY=VALUE")
    parser.add_argument("--no-group", action="store_true", help="train every probe and head alone (the default trains the "
                        "probes in one group and the heads in another; a member's seconds are then its group's)")
    parser.add_argument("--streamed", action="store_true",
                        help="the profile of the alternative: one PCA probe (seed 1) with nothing placed on the GPU, "
                             "its batches read from the store per step (as before device placement)")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    device = res.device
    steps = FULL_STEPS // args.fraction
    overrides = dict(parse_assignment(a) for a in ["backbone=random:vit_base_patch8", *args.overrides])
    try:
        import pydensecrf.densecrf  # noqa: F401
        crf = True
    except ImportError:
        crf = False
        overrides["eval.crf"] = "none"
    full = load_preset("cityscapes", overrides)
    preset = load_preset("cityscapes", {**overrides, "probe.steps": steps, "stego.steps": steps})
    dims = list(full.dims)
    data = write_cityscapes_folder(args.workdir / "data", args.train_images, args.val_images)
    ctx = StudyContext(preset, args.workdir / "cache", data, device=str(device), show_progress=False, crf_workers=args.crf_workers,
                       group=not args.no_group)

    start = time.perf_counter()  # writing the stores, once (every later run finds them complete)
    written = sum(fill_store(ctx.extract(split), device, ctx.n_classes, seed) for seed, split in enumerate(("train", "val")))
    res.record("synthetic stores written", written, "GB", show=False)
    seconds = res.record("synthetic stores written in", time.perf_counter() - start, "s", show=False)
    res.line(f"synthetic stores: {written:.1f} GB written in {seconds:.0f} s")

    if args.streamed:
        probing.DEVICE_SHARE = 0.0
        stage = ctx.probe("pca", args.probe_dims[0], seed=1)
        ran = run_graph(ctx, ctx.graph_of([stage]))
        parts = EvalResult.from_dict(json.loads((stage.output / cache_schema.METRICS).read_text())).seconds
        for part, seconds in parts.items():
            res.record(f"streamed probe {part}", seconds, "s", show=False)
        total = res.record("streamed probe", sum(r.seconds for _, r in ran), "s", show=False)
        per_step = res.record("streamed probe train per step", parts["train"] / steps * 1000, "ms", show=False)
        res.line(f"streamed probe pca D={args.probe_dims[0]}, {steps} steps: {total:.1f} s; "
                 f"load {parts['load']:.1f} s, train {parts['train']:.1f} s = {per_step:.1f} ms per step (validations included)")
        return
    targets = {"knn": [ctx.knn()], "fit pca": [ctx.fit("pca", None)], "fit rp": [ctx.fit("rp", d) for d in args.rp_dims],
               "probe dino": [ctx.probe("dino")],
               "probe pca/rp": [*(ctx.probe("pca", d) for d in args.probe_dims), *(ctx.probe("rp", d) for d in args.rp_dims)],
               "stego": [ctx.head("stego", d) for d in args.head_dims]}
    graph = ctx.graph_of([stage for group in targets.values() for stage in group])
    clock = {"node": None, "start": time.perf_counter()}

    def progress(node) -> None:  # one line per finished stage, so that a run cut short still says where it got
        if clock["node"] is not None:
            res.line(f"  {clock['node'].label}: {time.perf_counter() - clock['start']:.1f} s")
        clock.update(node=node, start=time.perf_counter())

    running = time.perf_counter()  # the whole graph's wall time, once: what a --no-group run is compared by
    results = {id(node.stage): result for node, result in run_graph(ctx, graph, progress=progress)}
    progress(None)
    wall = res.record(f"measured fraction, {'each alone' if args.no_group else 'grouped'}", time.perf_counter() - running, "s", show=False)
    res.line(f"measured fraction, {'each alone' if args.no_group else 'grouped'}: {wall:.1f} s wall "
             "(compare this line of a --no-group run: the per-kind figures below count a group's time once per member)")
    labels = {id(node.stage): node.label for node in graph}

    def measured(stage) -> dict[str, float]:
        seconds = results[id(stage)].seconds
        metrics_file = stage.output / cache_schema.METRICS
        parts = EvalResult.from_dict(json.loads(metrics_file.read_text())).seconds if metrics_file.exists() else {}
        other = seconds - sum(parts.values())  # opening stores, writing the artefact
        scaled = seconds + parts.get("train", 0.0) * (args.fraction - 1)
        return {"measured": seconds, "full": scaled, "other": other, **parts}

    rows, total = [], 0.0
    counts = {"knn": 1, "fit pca": 1, "fit rp": len(dims), "probe dino": 1, "probe pca/rp": 2 * len(dims), "stego": len(dims)}
    for kind, stages in targets.items():
        figures = [measured(s) for s in stages]
        each = res.record(f"{kind} each (full)", float(np.mean([f["full"] for f in figures])), "s", show=False)
        total += each * counts[kind]
        for stage, stage_figures in zip(stages, figures):
            for part, seconds in stage_figures.items():
                res.record(f"{labels[id(stage)]} {part}", seconds, "s", show=False)
        rows.append({"kind": kind, "ran": len(stages), "in sweep": counts[kind], "each_full_s": each, "stages": figures})
    res.line(f"{device_name(device)}; Cityscapes-sized sweep, D ∈ {dims}; trained stages ran {steps} of {FULL_STEPS} steps "
             f"(×{args.fraction})")
    res.line(f"{'stage kind':14s} {'ran':>4s} {'in sweep':>8s} {'each (full) s':>14s}  measured: load / train / crf / other s")
    for row in rows:
        detail = "; ".join(" / ".join(f"{s.get(k, 0):.1f}" for k in ("load", "train", "crf", "other"))
                           + (f" ({s['train'] / steps * 1000:.1f} ms/step)" if "train" in s else "") for s in row["stages"])
        res.line(f"{row['kind']:14s} {row['ran']:4d} {row['in sweep']:8d} {row['each_full_s']:14.1f}  {detail}")
    res.record("whole sweep, scaled", total / 60, "min", show=False)
    res.record("dense CRF measured", crf, show=False)
    res.line(f"whole sweep, scaled: {total / 60:.1f} min (goal ≤ 30 min: {'met' if total <= 1800 else 'MISSED'})"
             + ("" if crf else "; the dense CRF not measured (pydensecrf does not import here)"))


if __name__ == "__main__":
    main()
