"""The ``stegoscope`` command line: one command per stage, plus ``status`` and ``demo``."""

from __future__ import annotations

import errno
import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import cache_schema
from .config import ConfigError, load_preset
from .data import DatasetError
from .models.backbone import BackboneError
from .pipeline import LockHeld, read_json, run_stage
from .progress import console

app = typer.Typer(
    help="Reproduce, extend and trust STEGO unsupervised segmentation on cached DINO tokens.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

USER_ERRORS = (DatasetError, BackboneError, ConfigError, cache_schema.StoreError, LockHeld, ValueError, FileNotFoundError)


# Write errors the user can fix (full disk, quota, read-only or failing disk, permissions).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def user_errors(fn):
    """Bad input ends with one clear line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            message = str(exc)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            message = (f"{exc}. Nothing was marked complete and finished work is kept: fix the cause "
                       "(e.g. free disk space) and rerun the same command.")
        console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None

    return wrapper


def _run(stage, force: bool, no_wait: bool, label: str | None = None):
    """Run a stage under its key's lock, saying so when another process holds it."""
    label = label or stage.name
    return run_stage(stage, force=force, wait=not no_wait,
                     on_wait=lambda holder: console.print(f"{label}: waiting for {holder} (same key)"))


CacheOpt = Annotated[
    Path, typer.Option("--cache", envvar="STEGOSCOPE_CACHE", help="Cache root holding feature stores and artefacts.")
]
PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="Preset name (demo, directory, potsdam, …) or path to a preset YAML.")
]
DataRootOpt = Annotated[
    Optional[Path], typer.Option("--data-root", help="Dataset folder (overrides the preset's data_root).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
CrfWorkersOpt = Annotated[int, typer.Option("--crf-workers", help="CRF worker processes (1 = serial).")]
NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Exit at once if another process is running the same stage key.")
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader decode workers (default min(4, cores)).")]


def _apply_overrides(preset, **overrides):
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


@app.command()
@user_errors
def extract(
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    split: Annotated[
        Optional[list[str]], typer.Option("--split", help="Split to extract; repeat for several (default: all of the preset).")
    ] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset reader (directory, synthetic, …).")] = None,
    backbone: Annotated[
        Optional[str],
        typer.Option(
            "--backbone",
            help="vit_small_patch8 | vit_small_patch16 | vit_base_patch8 | vit_base_patch16 (DINO via timm); "
            "random:<arch> for seeded RANDOM weights (not pretrained).",
        ),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(
            "--weights",
            help="Official DINO .pth (plain or training checkpoint with 'teacher') or timm state dict. "
            "Without it, timm's hub copy is downloaded (needs network once).",
        ),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of a random: backbone.")] = None,
    train_res: Annotated[Optional[int], typer.Option("--train-res", help="Train resolution (default 224).")] = None,
    val_res: Annotated[Optional[int], typer.Option("--val-res", help="Val resolution (default 320).")] = None,
    interpolation: Annotated[
        Optional[str],
        typer.Option("--interpolation", help="Image resize: nearest (STEGO parity) or bilinear (antialiased)."),
    ] = None,
    n_classes: Annotated[Optional[int], typer.Option("--n-classes", help="Classes of a labelled directory dataset.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass.")] = None,
    shard_size: Annotated[
        Optional[int], typer.Option("--shard-size", help="Images per store shard (the unit of resume).")
    ] = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Check every sample first and skip unreadable ones (missing, corrupt, bad label values), "
            "recording their ids and reasons in the store; without it the first bad file stops the run.",
        ),
    ] = False,
    flip: Annotated[
        bool, typer.Option("--flip", help="Also store the tokens of the mirrored val images (flip TTA in `probe`).")
    ] = False,
    decode: Annotated[
        str,
        typer.Option(
            "--decode",
            help="Where JPEGs are decoded and images resized: auto (on the GPU when --device is CUDA), "
            "cpu (DataLoader workers, PIL) or device (torchvision decode_jpeg where the model runs).",
        ),
    ] = "auto",
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the backbone (faster on GPUs after a warm-up).")
    ] = False,
    writers: Annotated[
        Optional[int], typer.Option("--writers", help="Threads writing finished shards (default 2 on CUDA, 1 on CPU).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-extract even if a complete store exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Extract DINO tokens of a dataset's splits into Zarr stores (skipped when cached, resumed after a crash)."""
    from .study import feature_stages

    cfg = _apply_overrides(
        load_preset(preset), dataset=dataset, backbone=backbone, weights=str(weights) if weights else None,
        seed=seed, interpolation=interpolation, n_classes=n_classes, batch_size=batch_size, shard_images=shard_size,
    )
    res = {k: v for k, v in (("train", train_res), ("val", val_res)) if v is not None}
    stages = feature_stages(
        cfg, cache, data_root, split, res, skip_bad=skip_bad, flip=flip, workers=workers, device=device, show_progress=progress,
        decode=decode, compile=compile_model, writers=writers,
    )
    for stage in stages:
        _run_extract(stage, force, no_wait)


def _run_extract(stage, force: bool, no_wait: bool) -> None:
    label = f"{stage.p.dataset}/{stage.p.split}"
    result = _run(stage, force, no_wait, label)
    if result.skipped:
        console.print(f"{label}: cached, no backbone work ({result.seconds:.2f} s)")
        skipped = cache_schema.open_feature_store(stage.output).attrs.get("skipped", [])
    else:
        s = result.detail
        reused = f", {s.shards_reused} reused" if s.shards_reused else ""
        console.print(
            f"{label}: {s.n_images} images, {s.shards_written} shards written{reused} "
            f"in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s)"
        )
        skipped = [{"id": k, "reason": v} for k, v in s.skipped.items()]
    if skipped:
        console.print(f"[yellow]{label}: {len(skipped)} bad samples skipped (recorded in the store's attrs):[/]")
        for entry in skipped:
            console.print(f"  {escape(entry['id'])}: {escape(entry['reason'])}", soft_wrap=True, highlight=False)
    print(stage.output)


@app.command()
@user_errors
def reduce(
    method: Annotated[str, typer.Option("--method", help="pca (exact, streamed), rp (random projection) or hnne.")],
    dim: Annotated[
        Optional[int], typer.Option("--dim", help="Output dimension D (rp, hnne). One PCA fit serves every D.")
    ] = None,
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    standardize: Annotated[
        str,
        typer.Option(
            "--standardize",
            help="train: z-score with the train statistics (default); batch: with each batch's own statistics "
            "(the study's code, for parity); none: no scaling.",
        ),
    ] = "train",
    max_images: Annotated[
        Optional[int], typer.Option("--max-images", help="Fit on a seeded random subset of train images (the study: 5000).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the image subset, the RP matrix and the h-NNE sample.")] = 0,
    rp: Annotated[
        str, typer.Option("--rp", help="gaussian: entries N(0, 1/D) (the study's code); orthogonal: orthonormal columns (the paper's text).")
    ] = "gaussian",
    fit_tokens: Annotated[int, typer.Option("--fit-tokens", help="h-NNE: tokens in the seeded fit sample.")] = 1_000_000,
    scheduler: Annotated[
        str,
        typer.Option("--scheduler", help="threads (default), synchronous, local-cluster (2 worker processes) or tcp://host:port."),
    ] = "threads",
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    force: Annotated[bool, typer.Option("--force", help="Refit even if the artefact exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Fit PCA / random projection / h-NNE on the preset's train tokens (h-NNE also projects train and val)."""
    from .compute import dask_scheduler
    from .stages.reduce import ReduceParams
    from .study import reduce_stages

    params = ReduceParams(method, dim, standardize, max_images, seed, rp, fit_tokens)
    stages = reduce_stages(load_preset(preset), cache, params, data_root, device=device, show_progress=progress)
    with dask_scheduler(scheduler):
        for stage in stages:
            label = f"{stage.name} {method}" + (f" D={dim}" if dim else "")
            result = _run(stage, force, no_wait, label)
            verb = "cached" if result.skipped else f"done in {result.seconds:.1f} s"
            console.print(f"{label}: {verb}")
            print(stage.output)


@app.command()
@user_errors
def probe(
    reducer: Annotated[
        str,
        typer.Option("--reducer", help="identity (raw DINO), pca, rp, hnne (the cached fit of that method) or a reduce artefact path."),
    ] = "identity",
    dim: Annotated[Optional[int], typer.Option("--dim", help="Code dimension D (pca, rp, hnne).")] = None,
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: the preset's, Table 1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probes' initialisation and batch order.")] = 0,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Also evaluate the chosen probes with the dense CRF.")] = True,
    flip: Annotated[bool, typer.Option("--flip", help="Use the val store extracted with --flip (flip TTA).")] = False,
    crf_workers: CrfWorkersOpt = 2,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the artefact exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train linear + cluster probes on reduced codes; print val mIoU / accuracy with and without CRF."""
    from .stages.probe import METRICS
    from .study import probe_stage

    stage = probe_stage(load_preset(preset), cache, reducer, dim, data_root, crf=crf, seed=seed, steps=steps, flip=flip,
                        device=device, crf_workers=crf_workers, show_progress=progress)
    result = _run(stage, force, no_wait)
    metrics = read_json(stage.output, METRICS)
    table = Table(title=f"{stage.method}{dim or ''} — {'cached' if result.skipped else f'{result.seconds:.0f} s'}")
    for column in ("probe", "CRF", "step", "mIoU", "Accuracy"):
        table.add_column(column)
    rows = [("best", "no", metrics["best"])] + ([("best", "yes", metrics["best_crf"])] if "best_crf" in metrics else [])
    rows.append(("final", "no", metrics["final"]))
    for name, with_crf, row in rows:
        for kind in ("linear", "cluster"):
            table.add_row(f"{kind} ({name})", with_crf, str(row["step"]), f"{row[kind + '/mIoU']:.1f}", f"{row[kind + '/Accuracy']:.1f}")
    console.print(table)
    print(stage.output)


@app.command("import-stego")
@user_errors
def import_stego(
    checkpoint: Annotated[Path, typer.Argument(help="An original STEGO .ckpt (e.g. cocostuff27_vit_base_5.ckpt).")],
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Also evaluate with the dense CRF (Table 2 is with CRF).")] = True,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Flip TTA when the val store was extracted with --flip.")] = True,
    crf_workers: CrfWorkersOpt = 2,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    force: Annotated[bool, typer.Option("--force", help="Re-evaluate even if cached.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a released STEGO checkpoint (head + probes) on the preset's val tokens, without Lightning."""
    from .stages.import_stego import ImportStegoStage
    from .study import complete_store, feature_stages

    val = {s.p.split: s for s in feature_stages(load_preset(preset), cache, data_root, flip=flip, show_progress=False)}["val"]
    stage = ImportStegoStage(cache, checkpoint, complete_store(val), crf, flip, device, crf_workers, progress)
    result = _run(stage, force, no_wait)
    metrics = read_json(stage.output, "metrics.json")
    table = Table(title=f"{checkpoint.name} — {'cached' if result.skipped else 'evaluated'}")
    for column in ("probe", "CRF", "mIoU", "Accuracy"):
        table.add_column(column)
    for name, with_crf in (("no_crf", "no"), ("crf", "yes")):
        for kind in ("linear", "cluster"):
            if name in metrics:
                row = metrics[name]
                table.add_row(kind, with_crf, f"{row[kind + '/mIoU']:.1f}", f"{row[kind + '/Accuracy']:.1f}")
    console.print(table)
    print(stage.output)


@app.command()
@user_errors
def knn(
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours kept per image (STEGO: 30; rank 0 is normally itself).")] = 30,
    block: Annotated[int, typer.Option("--block", help="Rows per block: memory is block × N similarities, never N × N.")] = 1024,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    force: Annotated[bool, typer.Option("--force", help="Recompute even if cached.")] = False,
    no_wait: NoWaitOpt = False,
) -> None:
    """Cosine top-k neighbours of every train image's pooled tokens (the STEGO kNN pairs)."""
    from .study import knn_stage

    stage = knn_stage(load_preset(preset), cache, data_root, k=k, block=block, device=device)
    result = _run(stage, force, no_wait)
    console.print(f"knn: {'cached' if result.skipped else f'done in {result.seconds:.1f} s'}")
    print(stage.output)


@app.command("train-stego")
@user_errors
def train_stego(
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Code dimension (default: the preset's D_STEGO).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: the preset's, Table 1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, batches, partners and sample points.")] = 0,
    readd_global_mean: Annotated[
        bool,
        typer.Option("--readd-global-mean/--paper-centring",
                     help="Centre F per query point and re-add its global mean (STEGO's code, default) or not (the paper's F^SC)."),
    ] = True,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Also evaluate the best head's probes with the dense CRF.")] = True,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
    force: Annotated[bool, typer.Option("--force", help="Retrain even if cached.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train the STEGO head from cached tokens + kNN pairs (computed first if missing); keeps the best-by-val head."""
    from .study import train_stego_stage

    knn_run, stage = train_stego_stage(load_preset(preset), cache, data_root, dim, steps, seed, readd_global_mean,
                                       knn_options={"device": device}, crf=crf, device=device, show_progress=progress)
    _run(knn_run, False, no_wait)
    result = _run(stage, force, no_wait)
    metrics = read_json(stage.output, "metrics.json")
    for name in ("best", "best_crf", "final"):
        if name not in metrics:
            continue
        row = metrics[name]
        console.print(f"{name:8s} step {row['step']}: linear mIoU {row['linear/mIoU']:.1f} acc {row['linear/Accuracy']:.1f} | "
                      f"cluster mIoU {row['cluster/mIoU']:.1f} acc {row['cluster/Accuracy']:.1f}")
    console.print(f"train-stego: {'cached' if result.skipped else f'done in {result.seconds:.1f} s'}")
    print(stage.output)


@app.command()
@user_errors
def figures(
    cache: CacheOpt = cache_schema.default_cache_root(),
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <cache>/figures).")] = None,
) -> None:
    """Fig. 3, Fig. 4, supplementary Figs 1-2 (PNG + PDF) and Table 2 (md/csv/tex) from cached artefacts only."""
    from .stages.figures import render

    written = render(cache, out or cache_schema.figures_dir(cache))
    if not written:
        console.print("no probe, train-stego or PCA artefacts in the cache yet; run `stegoscope probe` / `reduce` first")
    for name, paths in written.items():
        console.print(f"{name}:")
        for path in paths:
            print(f"  {path}")


@app.command()
@user_errors
def status(
    preset: Annotated[
        Optional[str], typer.Option("--preset", "-p", help="Show the preset's stages; without it, list every store.")
    ] = None,
    data_root: DataRootOpt = None,
    cache: CacheOpt = cache_schema.default_cache_root(),
) -> None:
    """Show what is cached (complete / partial / missing) and what a command would reuse. Runs nothing."""
    if preset is None:
        _list_stores(cache)
        return
    from .study import node_states, study_graph

    graph, whole = study_graph(load_preset(preset), cache, data_root)
    states = node_states(graph)
    table = Table(title=f"study {preset} — cache {cache}")
    for column in ("node", "state", "key", "output"):
        table.add_column(column)
    colours = {"complete": "green", "partial": "yellow", "stale": "magenta"}
    notes = []
    for node in graph:
        state = states[id(node)]
        table.add_row(node.label, f"[{colours.get(state, 'red')}]{state}[/]", node.stage.key[:12], str(node.stage.output))
        note = "" if state == "complete" else node.stage.note()
        if note:
            notes.append(f"{node.label}: {note}")
    console.print(table, soft_wrap=True)
    for note in notes:
        console.print(escape(note), soft_wrap=True, highlight=False)
    if any(state != "complete" for state in states.values()):
        console.print(f"`stegoscope study {escape(preset)}` (re)computes what is not complete; finished stages are reused",
                      soft_wrap=True, highlight=False)
    if not whole:
        console.print("the other nodes need both token stores: run `stegoscope extract` (or `study`) first")


def _list_stores(cache: Path) -> None:
    table = Table(title=f"feature stores in {cache}")
    for column in ("store", "status", "images", "tokens", "pretrained"):
        table.add_column(column)
    for path in cache_schema.list_feature_stores(cache):
        try:
            store = cache_schema.open_feature_store(path)
        except cache_schema.StoreError as exc:
            table.add_row(path.name, f"[red]damaged: {escape(str(exc))}[/]", "", "", "")
            continue
        tokens, layout = store[cache_schema.TOKENS], store.layout
        state = "complete" if store.complete else f"partial ({layout.n_shards - len(store.pending_shards())}/{layout.n_shards} shards)"
        table.add_row(path.name, state, str(tokens.shape[0]), "×".join(map(str, tokens.shape[1:])), str(store.attrs.get("pretrained")))
    console.print(table)


def _run_study(preset_name: str, cache: Path, data_root, only, dims, seeds, device) -> dict:
    from .progress import progress_bar
    from .study import run_study

    preset = load_preset(preset_name)
    with progress_bar("node") as bar:
        task = bar.add_task(f"study {preset.name}", total=None)

        def advance(node, total):
            bar.update(task, description=f"study {preset.name}: {node.label}", total=total)
            bar.advance(task)

        summary = run_study(preset, cache, data_root, only, dims, seeds, device, advance)
    console.print(f"study {preset.name}: {summary['ran']} stages run, {summary['cached']} cached")
    print(summary["results"])
    return summary


@app.command()
@user_errors
def study(
    preset: Annotated[str, typer.Argument(help="Preset name (demo, cocostuff27, cityscapes, potsdam) or YAML path.")],
    data_root: DataRootOpt = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Methods to run (dino, pca, rp, hnne, stego); repeat.")] = None,
    dims: Annotated[Optional[list[int]], typer.Option("--dims", help="Dimensions D (default: the preset's); repeat.")] = None,
    seeds: Annotated[Optional[list[int]], typer.Option("--seeds", help="Seeds to repeat the study with (default 0); repeat.")] = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = cache_schema.default_cache_root(),
) -> None:
    """Run the whole study of a preset — extract, kNN, reducers, STEGO heads, probes — skipping what is cached."""
    _run_study(preset, cache, data_root, only, dims, seeds, device)


@app.command()
@user_errors
def demo(
    cache: CacheOpt = cache_schema.default_cache_root(),
    device: DeviceOpt = "auto",
) -> None:
    """The embedded default, end to end on the built-in synthetic dataset (small random ViT, CPU):
    the study, then the figures and a Table-2-style summary."""
    from .stages.figures import render, table2, table_texts

    start = time.perf_counter()
    summary = _run_study("demo", cache, None, None, None, None, device)
    written = render(cache, cache_schema.figures_dir(cache))
    console.print(table_texts(table2(summary["rows"]))["md"], highlight=False, markup=False)
    for name, paths in written.items():
        print(f"{name}: " + "  ".join(str(p) for p in paths))
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
