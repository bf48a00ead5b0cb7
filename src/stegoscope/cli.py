"""The ``stegoscope`` command line: one command per stage, plus ``study``, ``status`` and ``demo``.

Every command builds a :class:`~stegoscope.study.StudyContext` from a preset and its options
(options that change a result become preset overrides, so its label says so), asks it for its
stages, runs them and prints. Nothing here composes stages.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import sys
import time
import types
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import methods as registry
from . import storage
from .config import ConfigError, load_preset, parse_assignment, parse_sweep
from .profiling import verdict
from .progress import console


def lazy_module(name: str) -> types.ModuleType:
    """The module ``name``, executed on its first attribute access (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Nothing is imported above that imports torch, zarr or dask, so `--help` and shell completion start
# in well under a second; a command loads them when it runs.
cache_schema = lazy_module("stegoscope.cache_schema")
pipeline = lazy_module("stegoscope.pipeline")

class _QuietDestroyedTasks(logging.Filter):
    """When a read fails, zarr's event loop leaves sibling reads pending; asyncio then logs a
    "Task was destroyed" line for each. The error itself is reported once, with its fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Task was destroyed but it is pending" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietDestroyedTasks())

app = typer.Typer(
    help="Reproduce, extend and trust STEGO unsupervised segmentation on cached DINO tokens.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"stegoscope {version('stegoscope')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print stegoscope's version and exit.")] = False,
) -> None:
    """Reproduce, extend and trust STEGO unsupervised segmentation on cached DINO tokens."""

def user_error_types() -> tuple[type[Exception], ...]:
    """The errors a user can fix from the message (imported when an error is being handled)."""
    from .data import DatasetError
    from .models.backbone import BackboneError
    from .probing import CRFError

    return (DatasetError, BackboneError, ConfigError, cache_schema.StoreError, pipeline.LockHeld, storage.LeaseLost, CRFError, ValueError,
            FileNotFoundError)


# Write errors the user can fix (full disk, quota, read-only or failing disk, permissions).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def user_errors(fn):
    """Bad input ends with one clear line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_error_types() as exc:
            message = str(exc)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS and not isinstance(exc, PermissionError):  # s3fs: a 403 has no errno
                raise
            message = (f"{exc}. Nothing was marked complete and finished work is kept: fix the cause (e.g. free disk "
                       "space, or the permissions or credentials of the cache) and rerun the same command.")
        console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None

    return wrapper


def _run(stage, force: bool, no_wait: bool, label: str | None = None):
    """Run a stage under its key's lock, saying so when another process holds it."""
    label = label or stage.name
    return pipeline.run_stage(stage, force=force, wait=not no_wait,
                     on_wait=lambda holder: console.print(f"{label}: waiting for {holder} (same key)"))


def _cache_root(value: str) -> Path:
    """The cache root: a local folder, or a URL whose backend is asked once (a missing package,
    bucket or credential fails here, before anything is written; never a local folder named
    after the URL)."""
    try:
        return storage.cache_path(value)
    except storage.CacheLocationError as exc:
        raise typer.BadParameter(str(exc)) from None


CacheOpt = Annotated[
    str, typer.Option("--cache", envvar="STEGOSCOPE_CACHE", callback=_cache_root,
                      help="Cache root holding feature stores and artefacts: a folder, a file:// URL, or any URL fsspec "
                           "resolves (s3://bucket/prefix needs s3fs and the usual AWS_* credentials; AWS_ENDPOINT_URL for "
                           "MinIO/Ceph). Every process and dask worker reads it by that URL.")
]
DEFAULT_CACHE = ".stegoscope-cache"  # or $STEGOSCOPE_CACHE
PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="Preset name (demo, directory, potsdam, …) or path to a preset YAML.")
]
DataRootOpt = Annotated[
    Optional[Path], typer.Option("--data-root", help="Dataset folder (overrides the preset's data_root).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a preset key by its dotted path, e.g. stego.lambda_rand=0.5, "
                               "reduce.pca.max_images=5000, stego.per_dim.16.b_rand=0.3, eval.flip=true; repeat."),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N] (default: the preset's).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
CrfWorkersOpt = Annotated[
    int, typer.Option("--crf-workers", help="CRF worker processes, each image with a timeout (0: in this process, no timeout).")
]
CrfOpt = Annotated[
    Optional[bool],
    typer.Option("--crf/--no-crf", help="Also evaluate with the dense CRF, or not (default: the preset's eval.crf: "
                                        "raw DINO and heads at their headline D, as Table 2)."),
]
FlipOpt = Annotated[
    Optional[bool],
    typer.Option("--flip/--no-flip", help="Flip TTA: val tokens also extracted mirrored, codes averaged "
                                          "(default: the preset's eval.flip)."),
]
NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Exit at once if another process is running the same stage key.")
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader decode workers (default min(4, cores)).")]
SchedulerOpt = Annotated[
    Optional[str],
    typer.Option("--scheduler", help="Where dask work runs: threads, synchronous, local-cluster (2 worker processes) or "
                                     "tcp://host:port (default: the preset's). Tasks read the stores by their path or URL, so workers "
                                     "on other machines need the cache on a shared file system or object storage."),
]
StandardizeOpt = Annotated[
    Optional[str],
    typer.Option("--standardize", help="train: z-score with the train statistics (default); batch: with each batch's own "
                                       "statistics (the study's code, for parity); none: no scaling."),
]
MaxImagesOpt = Annotated[
    Optional[int], typer.Option("--max-images", help="Fit on a seeded random subset of train images (the study: 5000).")
]
RpOpt = Annotated[
    Optional[str], typer.Option("--rp", help="RP kind: gaussian, entries N(0, 1/D) (the study's code); orthogonal (the paper's text).")
]
FitTokensOpt = Annotated[Optional[int], typer.Option("--fit-tokens", help="h-NNE: tokens in the seeded fit sample.")]


def _context(preset: str, cache: Path, data_root: Path | None = None, sets: list[str] | None = None,
             overrides: dict[str, Any] | None = None, **options):
    """The study context of ``preset`` with ``--set`` assignments and the command's own overrides."""
    from .study import StudyContext

    given = dict(parse_assignment(text) for text in sets or ())
    return StudyContext(load_preset(preset, {**given, **{k: v for k, v in (overrides or {}).items() if v is not None}}),
                        cache, data_root, **options)


def _reducer_overrides(method: str, **options) -> dict[str, Any]:
    """A reducer's command-line options as overrides of its ``reduce.<method>`` section; an option
    that the method does not take is an error naming the methods that do."""
    out = {}
    for field, value in options.items():
        if value is None:
            continue
        if field not in registry.get(method).field_names:
            takers = [m for m in registry.names(registry.REDUCER) if field in registry.get(m).field_names]
            raise ConfigError(f"--{field.replace('_', '-')} applies to {', '.join(takers)}, not {method}")
        out[f"reduce.{method}.{field}"] = value
    return out


# extract's options (declared here: its signature stays readable)
SplitOpt = Annotated[
    Optional[list[str]], typer.Option("--split", help="Split to extract; repeat for several (default: train and val; a further split "
                                      "of the preset, such as PriMaPs-EM's train_primaps, by name or when a study needs it).")]
BackboneOpt = Annotated[Optional[str], typer.Option(
    "--backbone", help="vit_small_patch8 | vit_small_patch16 | vit_base_patch8 | vit_base_patch16 (DINO via timm); "
                       "random:<arch> for seeded RANDOM weights (not pretrained).")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", help="Official DINO .pth (plain or training checkpoint with 'teacher') or timm state dict. "
                      "Without it, timm's hub copy is downloaded (needs network once).")]
InterpolationOpt = Annotated[Optional[str], typer.Option(
    "--interpolation", help="Image resize: nearest (STEGO parity) or bilinear (antialiased).")]
SkipBadOpt = Annotated[bool, typer.Option(
    "--skip-bad", help="Check every sample first and skip unreadable ones (missing, corrupt, bad label values), "
                       "recording their ids and reasons in the store; without it the first bad file stops the run. Not part of the "
                       "key: a complete store is reused either way.")]
DecodeOpt = Annotated[str, typer.Option(
    "--decode", help="Where JPEGs are decoded and images resized: auto (on a GPU the faster of the workers and the device, "
                     "measured on the first 64 images and said; on a CPU the workers), "
                     "cpu (DataLoader workers, PIL) or device (torchvision decode_jpeg where the model runs).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the backbone (faster on GPUs after a warm-up).")]
WritersOpt = Annotated[Optional[int], typer.Option("--writers", help="Threads writing finished shards (default 2 on CUDA, 1 on CPU).")]
RankOpt = Annotated[int, typer.Option("--rank", help="This process's share of the shards (0..world-1): run one process per "
                                                     "GPU or machine, each with its --rank, all with the same --world.")]
WorldOpt = Annotated[int, typer.Option("--world", help="How many processes write each store together (one per GPU or "
                                                       "machine; the last to finish marks the store complete).")]


@app.command()
@user_errors
def extract(
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    split: SplitOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset reader (directory, synthetic, …).")] = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of a random: backbone.")] = None,
    train_res: Annotated[Optional[int], typer.Option("--train-res", help="Train resolution (default: the preset's).")] = None,
    val_res: Annotated[Optional[int], typer.Option("--val-res", help="Val resolution (default: the preset's).")] = None,
    interpolation: InterpolationOpt = None,
    n_classes: Annotated[Optional[int], typer.Option("--n-classes", help="Classes of a labelled directory dataset.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass.")] = None,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Images per store shard (the unit of resume).")] = None,
    sets: SetOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    skip_bad: SkipBadOpt = False,
    flip: FlipOpt = None,
    decode: DecodeOpt = "auto",
    compile_model: CompileOpt = False,
    writers: WritersOpt = None,
    rank: RankOpt = 0,
    world: WorldOpt = 1,
    force: Annotated[bool, typer.Option("--force", help="Re-extract even if a complete store exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
    profile: Annotated[bool, typer.Option(
        "--profile", help="After each split, a table of the pipeline's stages (decode, h2d, model, d2h, encode, write): "
                          "how busy each was, how long the others waited on it, and which stage bounds the run.")] = False,
) -> None:
    """Extract DINO tokens of a dataset's splits into Zarr stores (skipped when cached, resumed after a crash)."""
    overrides = {"dataset": dataset, "backbone": backbone, "weights": str(weights) if weights else None, "seed": seed,
                 "interpolation": interpolation, "n_classes": n_classes, "batch_size": batch_size, "shard_images": shard_size,
                 "splits.train.res": train_res, "splits.val.res": val_res, "eval.flip": flip}
    ctx = _context(preset, cache, data_root, sets, overrides, device=device, show_progress=progress, workers=workers,
                   extract_options={"decode": decode, "compile": compile_model, "writers": writers, "skip_bad": skip_bad,
                                    "download_weights": True, "rank": rank, "world": world})
    if world > 1 and force:
        raise typer.BadParameter("--force with --world > 1 would let each rank recreate the store; rerun it once with one "
                                 "process and --force, or delete the store, then run the ranks")
    stages = [ctx.extract(name) for name in split or ("train", "val")]
    for stage in stages:
        _run_extract(stage, force, no_wait, profile)
    from .runner import record_experiment

    record_experiment(ctx, ctx.graph_of(stages))  # the preset's stores: what `gc` keeps


def _run_extract(stage, force: bool, no_wait: bool, profile: bool = False) -> None:
    label = f"{stage.p.dataset}/{stage.p.split}"
    unit = "crops" if stage.p.crop == "five" else "images"
    if stage.options.world > 1:
        result = stage.run_rank(wait=not no_wait, on_wait=lambda holder: console.print(f"{label}: waiting for {holder}"))
    else:
        result = _run(stage, force, no_wait, label)
    if result.skipped:
        console.print(f"{label}: cached, no backbone work ({result.seconds:.2f} s)")
        skipped = {entry.id: entry.reason for entry in cache_schema.open_feature_store(stage.output).attrs.skipped}
    else:
        s = result.detail
        reused = f", {s.shards_reused} reused" if s.shards_reused else ""
        console.print(
            f"{label}: {s.n_images} {unit}, {s.shards_written} shards written{reused} "
            f"in {s.seconds:.1f} s ({s.images_per_second:.1f} {unit}/s)"
        )
        skipped = s.skipped
        if profile:
            console.print(_profile_table(f"{label}: the pipeline's stages", s.profile))
            console.print(f"{label}: {verdict(s.profile)}", highlight=False)
    if skipped:
        console.print(f"[yellow]{label}: {len(skipped)} bad samples skipped (recorded in the store's attrs):[/]")
        for sample, reason in skipped.items():
            console.print(f"  {escape(sample)}: {escape(reason)}", soft_wrap=True, highlight=False)
    print(stage.output)


def _run_targets(ctx, targets: list, force: bool, no_wait: bool, prepare: list = ()) -> list:
    """Run ``targets`` (after ``prepare``, stages they need that may run first, such as kNN pairs),
    record them in the preset's study (what `figures` draws) and say how each went. Anything
    else they read must be complete: else stop, naming it and the command that makes it."""
    from .runner import require_complete, run_graph

    graph = ctx.graph_of(targets)
    for node in graph:
        if node.stage not in targets and node.stage not in prepare:
            require_complete(node.stage, ctx.command_for(node.stage))
    done = run_graph(ctx, graph, force=targets if force else (), wait=not no_wait,
                   on_wait=lambda node, holder: console.print(f"{node.label}: waiting for {holder} (same key)"))
    results = {id(node.stage): result for node, result in done}
    for node in graph:
        if node.stage in targets:
            result = results[id(node.stage)]
            console.print(f"{node.label}: {'cached' if result.skipped else f'done in {result.seconds:.1f} s'}"
                          + (f" [{node.stage.label}]" if node.stage.label else ""), highlight=False, soft_wrap=True)
    return [results[id(t)] for t in targets]


@app.command()
@user_errors
def reduce(
    method: Annotated[str, typer.Option("--method", help=f"The reducer: {registry.describe(registry.REDUCER)}.")],
    dim: Annotated[
        Optional[int], typer.Option("--dim", help="Output dimension D (one fit of a reducer that serves every D, "
                                                  "such as PCA, serves them all).")
    ] = None,
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    standardize: StandardizeOpt = None,
    max_images: MaxImagesOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the image subset, the RP matrix and the h-NNE sample.")] = 0,
    rp: RpOpt = None,
    fit_tokens: FitTokensOpt = None,
    sets: SetOpt = None,
    scheduler: SchedulerOpt = None,
    device: DeviceOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Refit even if the artefact exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Fit a reducer on the preset's train tokens, with the preset's reduce.<method> settings
    (reducers whose transform is slow, such as h-NNE, also project the train and val stores)."""
    overrides = _reducer_overrides(method, standardize=standardize, max_images=max_images, kind=rp, fit_tokens=fit_tokens)
    ctx = _context(preset, cache, data_root, sets, overrides, device=device, scheduler=scheduler, show_progress=progress)
    fit = ctx.fit(method, dim, seed)
    stages = [fit, *(ctx.projections(method, dim, seed) if fit.cls.precompute_codes else ())]
    _run_targets(ctx, stages, force, no_wait)
    for stage in stages:
        print(stage.output)


def _eval_result(stage):
    from .records import EvalResult

    return pipeline.read_record(stage.output, cache_schema.METRICS, EvalResult)


def _profile_table(title: str, profile: list) -> Table:
    """``extract --profile``: each stage's workers, busy seconds and share, and the share of the
    run the other stages waited on it."""
    table = Table(title=title)
    for column in ("stage", "workers", "busy (s)", "busy %", "waited on %"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in profile:
        table.add_row(row.stage, str(row.workers), f"{row.busy:.2f}", f"{row.busy_share:.0%}", f"{row.waited_share:.0%}")
    return table


def _metrics_table(title: str, metrics) -> Table:
    """The linear and cluster probes' scores of an :class:`~stegoscope.records.EvalResult`: the
    kept step (± CRF), and the last one where it trained."""
    table = Table(title=title)
    for column in ("probe", "CRF", "step", "mIoU", "Accuracy"):
        table.add_column(column)
    rows = [("best", crf, row) for crf, row in metrics.kept()] + ([("final", "no", metrics.final)] if metrics.final else [])
    for name, with_crf, row in rows:
        for kind in ("linear", "cluster"):
            step = "" if row.step is None else str(row.step)
            table.add_row(f"{kind} ({name})", with_crf, step, f"{row.score(kind, 'mIoU'):.1f}", f"{row.score(kind, 'Accuracy'):.1f}")
    return table


@app.command()
@user_errors
def probe(
    reducer: Annotated[
        str,
        typer.Option("--reducer", help=f"Whose codes: {registry.describe(registry.REDUCER)} (the preset's fit of that method); "
                                       "or the folder of a reduce / head artefact."),
    ] = registry.raw_method(),
    dim: Annotated[Optional[int], typer.Option("--dim", help="Code dimension D (reducers that are fitted).")] = None,
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: the preset's probe.steps, Table 1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probes' initialisation and batch order (and of the reducer's fit).")] = 0,
    crf: CrfOpt = None,
    flip: FlipOpt = None,
    standardize: StandardizeOpt = None,
    max_images: MaxImagesOpt = None,
    rp: RpOpt = None,
    fit_tokens: FitTokensOpt = None,
    sets: SetOpt = None,
    crf_workers: CrfWorkersOpt = 2,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the artefact exists.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train linear + cluster probes on raw or reduced codes; print val mIoU / accuracy with and without CRF."""
    method = registry.raw_method() if reducer == "identity" else reducer
    overrides = {"probe.steps": steps, "eval.flip": flip}
    if method in registry.names(registry.REDUCER):
        overrides |= _reducer_overrides(method, standardize=standardize, max_images=max_images, kind=rp, fit_tokens=fit_tokens)
    ctx = _context(preset, cache, data_root, sets, overrides, device=device, show_progress=progress, crf_workers=crf_workers,
                   scheduler=scheduler)
    stage = ctx.probe(method, dim, seed, crf)
    [result] = _run_targets(ctx, [stage], force, no_wait)
    metrics = _eval_result(stage)
    title = (f"{stage.method}{dim or ''}{' ' + stage.label if stage.label else ''} — "
             f"{'cached' if result.skipped else f'{result.seconds:.0f} s'}")
    console.print(_metrics_table(title, metrics))
    print(stage.output)


@app.command("import-stego")
@user_errors
def import_stego(
    checkpoint: Annotated[Path, typer.Argument(help="An original STEGO .ckpt (e.g. cocostuff27_vit_base_5.ckpt).")],
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Also evaluate with the dense CRF (Table 2 is with CRF).")] = True,
    flip: FlipOpt = None,
    sets: SetOpt = None,
    crf_workers: CrfWorkersOpt = 2,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Re-evaluate even if cached.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a released STEGO checkpoint (head + probes) on the preset's val tokens, without Lightning."""
    ctx = _context(preset, cache, data_root, sets, {"eval.flip": flip}, device=device, scheduler=scheduler, show_progress=progress,
                   crf_workers=crf_workers)
    stage = ctx.import_stego(checkpoint, crf)
    [result] = _run_targets(ctx, [stage], force, no_wait)
    console.print(_metrics_table(f"{checkpoint.name} — {'cached' if result.skipped else 'evaluated'}", _eval_result(stage)))
    print(stage.output)


@app.command()
@user_errors
def knn(
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours kept per image (STEGO: 30; rank 0 is normally itself).")] = 30,
    block: Annotated[int, typer.Option("--block", help="Rows per block: memory is block × N similarities, never N × N.")] = 1024,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if cached.")] = False,
    no_wait: NoWaitOpt = False,
) -> None:
    """Cosine top-k neighbours of every train image's pooled tokens (the STEGO kNN pairs)."""
    ctx = _context(preset, cache, data_root, sets, device=device, scheduler=scheduler)
    stage = ctx.knn(k, block)
    _run_targets(ctx, [stage], force, no_wait)
    print(stage.output)


@app.command()
@user_errors
def train(
    method: Annotated[str, typer.Option("--method", help=f"The head (default: the first, the paper's): "
                                                         f"{registry.describe(registry.HEAD)}.")] = registry.names(registry.HEAD)[0],
    preset: PresetOpt = "directory",
    data_root: DataRootOpt = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Code dimension (default: the head's headline D, e.g. D_STEGO).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: the preset's, Table 1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, batches, partners and sample points.")] = 0,
    readd_global_mean: Annotated[
        Optional[bool],
        typer.Option("--readd-global-mean/--paper-centring",
                     help="STEGO: centre F per query point and re-add its global mean (STEGO's code, default) or not (the paper's F^SC)."),
    ] = None,
    crf: CrfOpt = None,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if cached.")] = False,
    no_wait: NoWaitOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a head from cached tokens (+ kNN pairs, computed first if missing) with the probes alongside;
    keeps the best-by-val head (CAUSE: the last step, as released)."""
    overrides = {f"{method}.steps": steps, f"{method}.readd_global_mean": readd_global_mean}
    ctx = _context(preset, cache, data_root, sets, overrides, device=device, scheduler=scheduler, show_progress=progress)
    stage = ctx.head(method, dim, seed, crf)
    _run_targets(ctx, [stage], force, no_wait, prepare=[stage.knn] if stage.knn else [])
    console.print(_metrics_table(f"{stage.method} D={stage.run.dim}", _eval_result(stage)))
    print(stage.output)


app.command("train-stego", help="`train`, whose --method is stego by default: the STEGO head from cached tokens + kNN pairs.")(train)


@app.command()
@user_errors
def figures(
    study_names: Annotated[
        Optional[list[str]],
        typer.Option("--study", help="Draw what this study declared (its preset's name); repeat to draw several side by side, "
                                     "labelled by what differs from the first. Default: every study that has run, each in its own folder."),
    ] = None,
    cache: CacheOpt = DEFAULT_CACHE,
    out: Annotated[Optional[str], typer.Option("--out", callback=lambda v: v and _cache_root(v),
                                               help="Output folder or URL (default <cache>/figures/<study>).")] = None,
) -> None:
    """Fig. 3, Fig. 4, supplementary Figs 1-2 (PNG + PDF), Table 2 (md/csv/tex) and results.csv from a study's cached artefacts."""
    from .stages.figures import render

    if study_names:
        jobs = [(list(study_names), out or cache_schema.figures_dir(cache) / "+".join(study_names))]
    else:
        jobs = [([name], (out or cache_schema.figures_dir(cache)) / name) for name in cache_schema.list_studies(cache)]
    if not jobs:
        console.print("no study has run in this cache yet; run `stegoscope study PRESET` (or a stage command with --preset) first")
    for names, folder in jobs:
        written = render(cache, folder, names)
        console.print(f"study {' + '.join(names)}:")
        for name, paths in written.items():
            console.print(f"  {name}:")
            for path in paths:
                print(f"    {path}")


@app.command()
@user_errors
def report(
    study_names: Annotated[Optional[list[str]], typer.Option("--study", help="The study (its preset's name); repeat for several. "
                                                             "Default: every study that has run.")] = None,
    cache: CacheOpt = DEFAULT_CACHE,
    out: Annotated[Optional[str], typer.Option("--out", callback=lambda v: v and _cache_root(v),
                                               help="Output folder or URL (default <cache>/reports/<study>).")] = None,
    images: Annotated[int, typer.Option("--images", min=0, help="Gallery images: the worst, median and best thirds by the "
                                                                "headline result's per-image mIoU.")] = 24,
    ids: Annotated[Optional[list[str]], typer.Option("--ids", help="Val image ids to show in the gallery as well; repeat.")] = None,
) -> None:
    """A static HTML page per study (index.html and its images; opens from disk): the study, Table 2, the figures, per-class
    IoU and confusion, a gallery and every val image's mIoU. Reads the cache only: it runs no stage."""
    from .report import write_report

    names = list(study_names or cache_schema.list_studies(cache))
    if not names:
        console.print("no study has run in this cache yet; run `stegoscope study PRESET` first")
    for name in names:
        folder = (out or cache_schema.reports_dir(cache)) / name if not out or len(names) > 1 else out
        index = write_report(cache, name, folder, images, list(ids or ()))
        console.print(f"report {name}: 0 stages run (the cache is only read)", highlight=False)
        print(index)


@app.command()
@user_errors
def verify(
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="Stores (*.zarr) or artefact folders (paths or URLs) to check "
                            "(default: those of --preset, else all in the cache)."),
    ] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Check the stores and artefacts of this preset's study.")] = None,
    data_root: DataRootOpt = None,
    sets: SetOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    progress: ProgressOpt = True,
) -> None:
    """Read back every chunk of the stores (crc32c, sizes) and every file of the artefacts (sha256);
    report every damaged shard or file and record it, so that `status` shows it and a plain
    `extract` (or the stage's command) rewrites exactly that. Exit code 1 when anything is damaged."""
    from .pipeline import verify_artefact
    from .progress import progress_bar

    if paths:
        targets = list(paths)
    elif preset:
        targets = [n.stage.output for n in _context(preset, cache, data_root, sets, show_progress=False).graph()]
    else:
        targets = cache_schema.list_stores(cache) + cache_schema.list_artefacts(cache)
    targets = [t for t in map(storage.as_path, targets) if t.exists()]
    table = Table(title=f"verify — {len(targets)} stores and artefacts")
    table.add_column("path", overflow="fold")
    table.add_column("state")
    table.add_column("what")
    damaged = 0
    with progress_bar("shard", progress) as bar:
        for path in targets:
            if path.suffix == ".zarr":
                store = cache_schema.open_feature_store(path, verify=False)
                task = bar.add_task(f"verify {path.name}", total=store.layout.n_shards * len(list(store.group.array_keys())))
                found = {**store.damage(), **store.scrub(lambda n: bar.advance(task, n))}
                shards = sorted({f"{name.split('/')[0]} {cache_schema.shard_of(name)}" for name in found})
                what = ("damaged shards: " + ", ".join(shards) + f"; {store.fix_hint}: it rewrites only those") if found else (
                    "" if store.attrs.checksums else "no chunk checksums (made before they existed): decoding and sizes only")
                problem = bool(found)
            elif not (path / cache_schema.MANIFEST).exists():
                table.add_row(str(path), "[yellow]unfinished[/]", "no manifest: its stage reruns it")
                continue
            else:
                what = verify_artefact(path) or ""
                problem = bool(what)
            damaged += problem
            table.add_row(str(path), "[red]damaged[/]" if problem else "[green]ok[/]", escape(what))
    console.print(table, soft_wrap=True)
    console.print(f"{damaged} of {len(targets)} damaged", highlight=False)
    if damaged:
        raise typer.Exit(1)


@app.command()
@user_errors
def gc(
    keep_preset: Annotated[
        Optional[list[str]],
        typer.Option("--keep-preset", help="Also keep everything this preset's study needs now (repeat); needs its data."),
    ] = None,
    data_root: DataRootOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted, with sizes.")] = False,
    cache: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Delete the stores and artefacts that nothing keeps: kept is what any study recorded (every
    run of a preset records what it made and read), what --keep-preset's study needs, and all
    that those were made from. Lists what it deletes, with sizes, first; skips what is in use."""
    from .pipeline import unreachable
    from .runner import recorded_keys

    roots = recorded_keys(cache)
    for name in keep_preset or ():
        roots |= {node.stage.key for node in _context(name, cache, data_root, show_progress=False).graph()}
    garbage = unreachable(cache, roots)
    table = Table(title=f"{'would delete' if dry_run else 'deleting'} from {cache}")
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right")
    for path, size in garbage:
        table.add_row(str(path), f"{size / 1e6:,.1f} MB")
    console.print(table, soft_wrap=True)
    total = sum(size for _, size in garbage) / 1e9
    if dry_run:
        console.print(f"{len(garbage)} stores and artefacts, {total:,.2f} GB would be freed (run without --dry-run to delete)")
        return
    for path, _ in garbage:
        storage.remove_tree(path)
    console.print(f"{len(garbage)} stores and artefacts deleted, {total:,.2f} GB freed")


@app.command()
@user_errors
def status(
    preset: Annotated[
        Optional[str], typer.Option("--preset", "-p", help="Show the preset's stages; without it, list every store.")
    ] = None,
    data_root: DataRootOpt = None,
    sets: SetOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Show what is cached (complete / partial / missing / stale) and what a command would reuse. Runs nothing."""
    if preset is None:
        _list_stores(cache)
        return
    from .graph import node_states

    ctx = _context(preset, cache, data_root, sets, show_progress=False)
    graph = ctx.graph()
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
        console.print(f"`stegoscope study {escape(preset)}` (re)computes what is not complete; finished stages are reused "
                      "(`--dry-run` says why each would run)", soft_wrap=True, highlight=False)


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
        table.add_row(path.name, state, str(tokens.shape[0]), "×".join(map(str, tokens.shape[1:])), str(store.attrs.pretrained))
    console.print(table)


FUTURE = "future"  # `study --only future`: the preset's open-question experiments


def _run_study(preset: str, cache: Path, data_root=None, sets=None, sweeps=None, only=None, dims=None, seeds=None,
               device=None, scheduler=None, flip=None, dry_run=False, progress=True, group=None, report=True) -> list:
    """Run (or with ``dry_run`` plan) every experiment of a study; the contexts that ran."""
    from .future import future_experiments
    from .progress import progress_bar
    from .runner import plan

    base = _context(preset, cache, data_root, sets, {"eval.flip": flip}, device=device, scheduler=scheduler, show_progress=False,
                    extract_options={"download_weights": not dry_run}, group=group)
    grid = dict(parse_sweep(text) for text in sweeps or ())
    contexts = [base.variant(p) for p in base.preset.experiments(grid)]
    plans = []
    for ctx in contexts:
        methods = [m for m in only or () if m != FUTURE]
        if only and FUTURE in only:
            if not ctx.preset.future.families:
                raise ConfigError(f"{ctx.preset.path or preset}: no `future:` section to run (see configs/demo.yaml)")
            plans += [(c, c.graph_of(targets)) for c, targets in future_experiments(ctx)]
        if methods or not only:
            plans.append((ctx, ctx.graph(methods or None, dims, seeds)))
    titles = [f"study {ctx.preset.name}" + (f" [{ctx.preset.label()}]" if ctx.preset.label() else "") for ctx, _ in plans]
    if dry_run:
        for title, (ctx, graph) in zip(titles, plans):
            _print_plan(title, plan(graph))
    else:
        from .runner import run_studies

        with progress_bar("node", progress) as bar:
            task = bar.add_task(f"study {base.preset.name}", total=len({n.stage.key for _, graph in plans for n in graph}))

            def advance(node):
                bar.update(task, description=f"study {base.preset.name}: {node.label}")
                bar.advance(task)

            for title, done in zip(titles, run_studies(plans, advance)):
                ran = sum(not result.skipped for _, result in done)
                console.print(f"{escape(title)}: {ran} stages run, {len(done) - ran} cached", highlight=False)
    if not dry_run:
        from .atomic import atomic_write_text
        from .stages.figures import collect, results_csv

        rows, _ = collect(cache, [base.preset.name])
        path = cache_schema.study_dir(cache, base.preset.name) / "results.csv"
        atomic_write_text(path, results_csv(rows))
        print(path)
        if report:
            from .report import write_report

            print(write_report(cache, base.preset.name, cache_schema.reports_dir(cache) / base.preset.name))
    return contexts


def _print_plan(title: str, plan) -> None:
    table = Table(title=f"{escape(title)}: plan")
    for column in ("node", "action", "why"):
        table.add_column(column)
    for node, action, why in plan:
        table.add_row(node.label, f"[{'yellow' if action == 'run' else 'green'}]{action}[/]", escape(why))
    console.print(table, soft_wrap=True)
    runs = sum(action == "run" for _, action, _ in plan)
    console.print(f"{escape(title)}: {runs} stages would run, {len(plan) - runs} are cached", highlight=False)


@app.command()
@user_errors
def study(
    preset: Annotated[str, typer.Argument(help="Preset name (demo, cocostuff27, cityscapes, potsdam) or YAML path.")],
    data_root: DataRootOpt = None,
    sets: SetOpt = None,
    sweeps: Annotated[
        Optional[list[str]],
        typer.Option("--sweep", help="Expand a grid of experiments: KEY=V1,V2,… (dotted preset key); repeat for more axes. "
                                     "Each experiment is keyed, cached, recorded and drawn as its own curve."),
    ] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help=f"Methods to run ({', '.join(registry.names())}); repeat. "
                                                                     f"`{FUTURE}`: the experiments of the preset's `future:` section "
                                                                     "(the paper's open questions).")] = None,
    dims: Annotated[Optional[list[int]], typer.Option("--dims", help="Dimensions D (default: the preset's); repeat.")] = None,
    seeds: Annotated[Optional[list[int]], typer.Option("--seeds", help="Seeds (default: the preset's seeds); repeat.")] = None,
    flip: FlipOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print each stage that would run and why (missing, stale, a changed parameter); run nothing.")
    ] = False,
    device: DeviceOpt = None,
    scheduler: SchedulerOpt = None,
    cache: CacheOpt = DEFAULT_CACHE,
    progress: ProgressOpt = True,
    group: Annotated[Optional[bool], typer.Option("--group/--no-group", help="Train the probes (and the heads) that read the same train "
                                                  "store on the same batch schedule together, in one pass; each result is bit for bit "
                                                  "the one it gets alone (default: the preset's train.group, true).")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report",
                                         help="Write the study's HTML report at the end (<cache>/reports/<study>/index.html; "
                                              "`stegoscope report`).")] = True,
) -> None:
    """Run the whole study of a preset — extract, kNN, reducers, heads, probes — skipping what is cached."""
    _run_study(preset, cache, data_root, sets, sweeps, only, dims, seeds, device, scheduler, flip, dry_run, progress, group, report)


@app.command()
@user_errors
def demo(
    cache: CacheOpt = DEFAULT_CACHE,
    device: DeviceOpt = None,
) -> None:
    """The embedded default, end to end on the built-in synthetic dataset (small random ViT, CPU):
    the study, then its figures, a Table-2-style summary and its HTML report."""
    from .report import write_report
    from .stages.figures import render

    start = time.perf_counter()
    _run_study("demo", cache, device=device, report=False)
    folder = cache_schema.figures_dir(cache) / "demo"
    written = render(cache, folder, ["demo"])
    console.print((folder / "table2.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    for name, paths in written.items():
        print(f"{name}: " + "  ".join(str(p) for p in paths))
    print(f"report: {write_report(cache, 'demo', cache_schema.reports_dir(cache) / 'demo')}")
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
