"""Stage one: a dataset split through a frozen DINO ViT into a Zarr token store.

Decoding and resizing run in DataLoader workers, or for JPEGs on the GPU (``decode``); the
forward pass runs in the main process (bf16 autocast on CUDA, fp32 on CPU, optionally
``torch.compile``d). Each batch's outputs are copied into whole-shard host buffers (pinned, the
copies asynchronous, on CUDA), and writer threads store finished shards while the next batches
compute. A shard is written whole, then its ``written`` flag; a rerun skips flagged
shards and rewrites any other, and ``status=complete`` is set only after the last one.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from ..cache_schema import ATTENTION, IDS, IMAGES, LABELS, POOLED, TOKENS, TOKENS_FLIP, FeatureStore, StoreError, StoreLayout
from ..data import DatasetError, ExtractionDataset, SegmentationDataset, find_bad_samples, open_dataset
from ..data.crops import CROP_FIVE, CROP_NONE, crops_per_image
from ..data.decode import device_pixels
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from ..models import resolve_device
from ..models.backbone import build_backbone, parse_backbone, weights_identity
from ..ops.hidden_positives import attention_neighbour_weights
from ..pipeline import (
    COMPLETE,
    FileHashMemo,
    RunResult,
    Stage,
    canonical_json,
    diff_rows,
    file_rows,
    fingerprint_rows,
    package_versions,
    stage_lock,
    store_state,
)
from ..profiling import NULL_CLOCK, StageClock, StageTime
from ..progress import console, progress_bar
from ..records import SkippedSample, StoreAttrs

LAYER = "last_block_final_norm_no_cls"
# HP's reduction of the last block's attention logits to 3×3 neighbour weights (successors/hp.md §2):
# head mean, per-row clamp to the 10–90 % quantiles, softmax, × σ = 28, below-row-mean entries zeroed.
ATTENTION_SPEC = {"sigma": 28.0, "clip": (0.1, 0.9)}
# Where JPEGs are decoded and resized: DataLoader workers with PIL, or the compute device
# (nvJPEG on CUDA). Not part of the key: both give the same geometry, and decoders agree to
# within JPEG rounding, like bf16 on CUDA and fp32 on CPU agree to within their precision.
DECODE_AUTO, DECODE_CPU, DECODE_DEVICE = "auto", "cpu", "device"
DECODE_MODES = (DECODE_AUTO, DECODE_CPU, DECODE_DEVICE)
DECODE_PROBE = 64  # images decoded both ways by --decode auto on a GPU


@dataclass(frozen=True)
class ExtractParams:
    """Everything that decides the tokens of one split (all of it is in the key)."""

    dataset: str
    split: str
    res: int
    backbone: str
    weights: str | None = None
    seed: int = 0  # random: backbones only
    interpolation: str = "nearest"
    n_classes: int | None = None
    store_images: bool = False
    crop: str = CROP_NONE  # "five": five-crop of the full-resolution image first (train splits)
    crop_ratio: float = 0.5
    flip: bool = False  # also store the tokens of the horizontally flipped images (flip TTA)
    attention: bool = False  # also store HP's local-positive weights from the last block's attention
    fraction: float = 1.0  # a fixed, seeded random fraction of the samples (a declared deviation; SplitConfig)
    fraction_seed: int = 0

    def __post_init__(self):
        crops_per_image(self.crop)
        if self.interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be nearest or bilinear, not {self.interpolation!r}")
        spec, _ = parse_backbone(self.backbone)
        if self.res % spec.patch_size:
            p = spec.patch_size
            below, above = self.res // p * p, -(-self.res // p) * p
            raise ValueError(f"res {self.res} is not divisible by the patch size {p} of {spec.name}; "
                             f"use {above} ({above // p}×{above // p} tokens) or {below} ({below // p}×{below // p})")


@dataclass
class ExtractSummary:
    path: Path
    n_images: int
    shards_written: int
    shards_reused: int
    seconds: float
    images_per_second: float = field(default=0.0)
    skipped: dict[str, str] = field(default_factory=dict)  # source id → reason
    # From the first batch's arrival to the completed store: without model build and worker start.
    steady_images_per_second: float = field(default=0.0)
    profile: list[StageTime] = field(default_factory=list)  # the pipeline's stages (extract --profile)


@dataclass(frozen=True)
class ExtractOptions:
    """How an extraction runs, not what it makes (none is in the key): the same store results.

    ``workers``: DataLoader decode workers (None: min(4, cores)); ``writers``: threads writing
    finished shards (None: 2 on CUDA, 1 on CPU); ``skip_bad``: check every sample first and skip
    unreadable ones, recording them; ``download_weights``: fetch timm's hub copy if it is not
    here; ``rank`` of ``world``: this process writes the shards s with s % world == rank."""

    batch_size: int = 32
    workers: int | None = None
    shard_images: int = cache_schema.DEFAULT_SHARD_IMAGES
    device: str = "auto"
    show_progress: bool = True
    decode: str = DECODE_AUTO
    compile: bool = False
    writers: int | None = None
    skip_bad: bool = False
    download_weights: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, not {self.decode!r}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in 0..world-1, not rank {self.rank} of world {self.world}")
        if self.workers is None:
            object.__setattr__(self, "workers", min(4, os.cpu_count() or 1))


class ExtractStage(Stage):
    name = "extract"
    remade_in_place = True  # the same key's tokens again: a re-extraction reruns nothing downstream
    version = 1

    def __init__(self, cache_root: Path, data_root: Path, params: ExtractParams, **options: Any):
        """``options``: the fields of :class:`ExtractOptions` (how it runs; not in the key)."""
        super().__init__(cache_root)
        self.data_root = Path(data_root)
        self.p = params
        self.options = ExtractOptions(**options)
        self._decode_choice: dict[str, str] = {}  # device → the decoder auto measured there

    def decode_mode(self, device: torch.device) -> str:
        """Where JPEGs are decoded: ``auto`` is the DataLoader workers on a CPU, and on a GPU the
        faster of the workers and the device, measured on the first samples (once per run)."""
        if self.options.decode != DECODE_AUTO:
            return self.options.decode
        if device.type != "cuda":
            return DECODE_CPU
        if str(device) not in self._decode_choice:
            try:
                mode, reason = choose_decoder(*self._measure_decoders(device), self.options.workers)
            except DatasetError as exc:  # the extraction itself will name it (or skip it, with --skip-bad)
                mode, reason = DECODE_CPU, f"in the DataLoader workers (not measured: {exc})"
            console.print(f"{self.dataset.name}/{self.p.split}: JPEGs decoded {reason}", highlight=False)
            self._decode_choice[str(device)] = mode
        return self._decode_choice[str(device)]

    def _measure_decoders(self, device: torch.device, images: int = DECODE_PROBE) -> tuple[float, float]:
        """(seconds a worker takes per image, images per second decoded on ``device``) over the
        split's first ``images`` samples; the device's first call (its decoder's start) untimed."""
        samples = self.samples({})[:images]
        rows = list(range(len(samples)))
        on_host = ExtractionDataset(self.dataset, self.p.res, self.p.interpolation, samples, rows, self.p.crop_ratio, False)
        start = time.perf_counter()
        for row in rows:
            on_host[row]
        per_image = (time.perf_counter() - start) / len(rows)
        undecoded = ExtractionDataset(self.dataset, self.p.res, self.p.interpolation, samples, rows, self.p.crop_ratio, True)
        batch = undecoded.collate([undecoded[row] for row in rows])
        decode = lambda: device_pixels(batch, self.dataset, self.p.res, self.p.interpolation, self.p.crop_ratio, device)  # noqa: E731
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
        decode()
        sync(device)
        start = time.perf_counter()
        decode()
        sync(device)
        return per_image, len(rows) / (time.perf_counter() - start)

    # -- identity ------------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> SegmentationDataset:
        return open_dataset(self.p.dataset, self.data_root, self.p.split, self.p.n_classes)

    @cached_property
    def _memo(self) -> FileHashMemo:
        return FileHashMemo(cache_schema.memo_path(self.cache_root, "file-hashes"))

    @cached_property
    def source_rows(self) -> list[list]:
        return file_rows(self.data_root, self.dataset.files(), self._memo)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint_rows(self.source_rows)

    @cached_property
    def weights(self) -> dict[str, Any]:
        weights = Path(self.p.weights) if self.p.weights else None
        identity = weights_identity(self.p.backbone, weights, self.p.seed, lambda path: self._memo.hash(path, full=True),
                                    self.options.download_weights)
        self._memo.save()
        return identity

    def params(self) -> dict[str, Any]:
        spec, _ = parse_backbone(self.p.backbone)
        return {
            "data": self.dataset.spec(),
            "res": self.p.res,
            "crop": {"type": self.p.crop, "ratio": self.p.crop_ratio} if self.p.crop == CROP_FIVE else CROP_NONE,
            "resize": "shorter_side_then_center_crop",
            "interpolation": self.p.interpolation,
            "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "backbone": {"arch": spec.name, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim, "layer": LAYER},
            "weights": self.weights,
            "token_dtype": "float16",
            "store_images": self.p.store_images,
            # Whether bad samples are skipped is not keyed (the store records which were skipped);
            # the entry stays at its old value so that keys made before stay valid.
            "skip_bad": False,
            "flip": self.p.flip,
            "schema_version": cache_schema.SCHEMA_VERSION,
        } | ({"attention": ATTENTION_SPEC} if self.p.attention else {}) | (  # added later: absent when off, so keys made before stay valid
            {"fraction": {"of_samples": self.p.fraction, "seed": self.p.fraction_seed}} if self.p.fraction < 1 else {})

    def inputs(self) -> list[str]:
        return [f"dataset:{self.fingerprint}"]

    def config(self) -> dict[str, Any]:
        """The extraction parameters as given (no dataset listing or weights hashing)."""
        return {"stage": self.name, "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.p).items()},
                "inputs": {}}

    @property
    def output(self) -> Path:
        spec, random = parse_backbone(self.p.backbone)
        backbone = f"random_{spec.name}" if random else spec.name
        return cache_schema.feature_store_path(self.cache_root, self.dataset.name, self.p.split, backbone, self.p.res, self.key)

    def state(self) -> str:
        return store_state(self.output, self.key)

    def stale_reason(self) -> str | None:
        """When this key has no store but an earlier extraction of the same split does: why."""
        if self.output.exists():
            return None
        for other in reversed(cache_schema.sibling_stores(self.output)):
            try:
                store = cache_schema.open_feature_store(other)
            except StoreError:
                continue
            if not store.complete:
                continue
            if canonical_json(store.attrs.params) != canonical_json(self.params()):
                return f"{other.name} was extracted with other parameters or weights"
            old_rows = cache_schema.read_sources(other)
            changes = diff_rows(old_rows, self.source_rows) if old_rows is not None else "files differ"
            return f"the dataset changed since {other.name} was extracted: {changes}"
        return None

    def note(self) -> str:
        return self.stale_reason() or super().note()

    # -- work ----------------------------------------------------------------------------------
    def samples(self, skipped: dict[str, str]) -> list[tuple[int, int | None]]:
        """(source index, crop index) of every store row, leaving out the skipped sources."""
        crops = [None] if self.p.crop == CROP_NONE else list(range(crops_per_image(self.p.crop)))
        samples = [(i, k) for i, sid in enumerate(self.dataset.ids) if sid not in skipped for k in crops]
        if self.p.fraction < 1:  # a fixed subset, the same on every rank and every rerun
            kept = np.random.default_rng(self.p.fraction_seed).permutation(len(samples))[: max(1, round(self.p.fraction * len(samples)))]
            samples = [samples[j] for j in np.sort(kept)]
        return samples

    def row_ids(self, samples: list[tuple[int, int | None]]) -> list[str]:
        ids = self.dataset.ids
        return [ids[i] if k is None else f"{ids[i]}#{k}" for i, k in samples]

    def find_skipped(self) -> dict[str, str]:
        """With ``skip_bad``: decode every sample once and return the unreadable ones (id → reason).
        Without: stop at the first missing file (cheap, before any compute)."""
        if not self.options.skip_bad:
            problems = self.dataset.problems()
            if problems:
                raise problems[0][1]
            return {}
        with progress_bar("img", self.options.show_progress) as bar:
            task = bar.add_task(f"check {self.dataset.name}/{self.p.split}", total=len(self.dataset))
            bad = find_bad_samples(self.dataset, self.options.workers, lambda n: bar.advance(task, n))
        return {self.dataset.ids[i]: reason for i, reason in bad.items()}

    def layout(self, n_images: int) -> StoreLayout:
        spec, _ = parse_backbone(self.p.backbone)
        grid = self.p.res // spec.patch_size
        return StoreLayout(
            n_images=n_images, grid=(grid, grid), channels=spec.embed_dim, pixels=(self.p.res, self.p.res),
            labelled=self.dataset.labelled, with_images=self.p.store_images, shard_images=self.options.shard_images,
            flip=self.p.flip, attention=self.p.attention,
        )

    def owns(self, shard: int) -> bool:
        return shard % self.options.world == self.options.rank

    def _open_or_create(self, force: bool) -> FeatureStore:
        if not force:
            store = cache_schema.resume_store(self.output, self.key, self.owns if self.options.world > 1 else None)
            if store is not None and self.options.skip_bad and not store.attrs.bad_samples_checked:
                # Started without --skip-bad (it stopped at a bad sample, most likely): its rows
                # still hold that sample, so the store is made again with bad samples left out.
                if self.options.world > 1:
                    raise StoreError(f"{store.path}: started without --skip-bad, so its rows include unchecked samples; "
                                     "rerun every rank with --skip-bad --force to make it again without bad samples")
                console.print(f"[yellow]{store.path}: started without --skip-bad; made again with bad samples left out "
                              f"({store.layout.n_shards - len(store.pending_shards())} finished shards are redone)[/]",
                              soft_wrap=True)  # a path and an option are never broken across lines
                store = None
            if store is not None:
                if cache_schema.read_sources(store.path) is None:  # killed right after creating the store
                    cache_schema.write_sources(store.path, self.source_rows)
                return store  # resume: its own shard size, layout and skipped samples win
        skipped = self.find_skipped()
        n_images = len(self.samples(skipped))
        if n_images == 0:
            raise DatasetError(self.dataset.root, f"no readable samples in split {self.p.split!r}")
        layout = self.layout(n_images)
        sizes = layout.array_bytes()
        listed = ", ".join(f"{name} {_size(size)}" for name, size in sizes.items())
        console.print(f"{self.dataset.name}/{self.p.split} @{self.p.res}: {n_images:,} images, about {_size(sum(sizes.values()))} "
                      f"before compression ({listed})", highlight=False)
        store = cache_schema.create_feature_store(self.output, layout, self.store_attrs(skipped))
        cache_schema.write_sources(self.output, self.source_rows)
        return store

    def store_attrs(self, skipped: dict[str, str]) -> StoreAttrs:
        """The attributes of this stage's store: its key, parameters, inputs and provenance."""
        _, random = parse_backbone(self.p.backbone)
        device = resolve_device(self.options.device)
        return StoreAttrs(
            key=self.key, stage=self.name, stage_version=self.version,
            params=self.params(), inputs=self.inputs(), dataset=self.p.dataset, split=self.p.split,
            extraction={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.p).items()},
            dataset_root=str(self.data_root), class_names=list(self.dataset.class_names),
            skipped=[SkippedSample(sid, reason) for sid, reason in skipped.items()],
            bad_samples_checked=self.options.skip_bad, pretrained=not random, versions=package_versions(), started=time.time(),
            # not in the key (the same pixels up to JPEG rounding), but traceable: stores decoded on a GPU
            # before the decode was fenced (docs/benchmarks.md, run 4) are the ones without this entry
            extracted_with={"device": str(device), "decode": self.decode_mode(device)},
        )

    def execute(self, force: bool) -> ExtractSummary:
        if self.options.world > 1:
            raise RuntimeError("a rank of several runs through run_rank()")
        start = time.perf_counter()
        return self._fill(self._open_or_create(force), start)

    def _fill(self, store: FeatureStore, start: float) -> ExtractSummary:
        """Write this process's pending shards (all of them when alone, then mark complete)."""
        skipped = {entry.id: entry.reason for entry in store.attrs.skipped}
        samples = self.samples(skipped)
        layout = store.layout
        if len(samples) != layout.n_images:
            raise StoreError(f"{store.path}: holds {layout.n_images} rows but the dataset gives {len(samples)}; re-extract with --force")
        pending = [shard for shard in store.pending_shards() if self.owns(shard)]
        first_batch = (start, 0)
        clock = pipeline_clock(self.options.workers, writer_threads(self.options.writers, resolve_device(self.options.device)))
        if pending:
            first_batch = extract_shards(self, store, layout, samples, pending, clock)
        if self.options.world == 1:
            store.mark_complete(self.held)
        end = time.perf_counter()
        n_new = sum(len(range(*layout.shard_slice(s).indices(layout.n_images))) for s in pending)
        steady = (n_new - first_batch[1]) / max(end - first_batch[0], 1e-9)
        return ExtractSummary(
            store.path, layout.n_images, len(pending), layout.n_shards - len(pending), end - start, n_new / (end - start),
            skipped, steady, clock.profile(),
        )

    def run_rank(self, wait: bool = True, on_wait=None) -> RunResult:
        """This rank's share of the store, beside the other ranks (``world`` > 1).

        The store is created once, under an exclusive lock of its key's ``create`` lock, by
        whichever rank comes first; each rank then writes its own shards (holding its rank's
        lock, and the key's lock shared so that ``gc`` and a single-process run keep off); the
        rank that finds every shard flagged marks the store complete and writes its inventory.
        A killed rank, run again, redoes only its own unflagged shards.
        """
        start = time.perf_counter()
        if self.state() == COMPLETE:
            return RunResult(self, True, time.perf_counter() - start)
        create = cache_schema.lock_path(self.cache_root, f"{self.key}.create")
        with stage_lock(create, wait, on_wait):
            store = self._open_or_create(False)
        rank, world = self.options.rank, self.options.world
        with stage_lock(cache_schema.lock_path(self.cache_root, f"{self.key}.rank{rank}of{world}"), wait, on_wait), \
                stage_lock(cache_schema.lock_path(self.cache_root, self.key), wait, on_wait, shared=True):
            summary = self._fill(store, start)
        with stage_lock(create, wait, on_wait) as held:
            store = cache_schema.open_feature_store(self.output, mode="r+", verify=False)
            left = store.pending_shards()
            if not left and not store.complete:
                store.mark_complete((held,))
        if left:
            console.print(f"{self.dataset.name}/{self.p.split} rank {rank} of {world}: done; {len(left)} shards of "
                          "other ranks are not written yet (the last rank to finish completes the store)", highlight=False)
        return RunResult(self, False, time.perf_counter() - start, summary)


def extract_shards(stage: ExtractStage, store: FeatureStore, layout: StoreLayout, samples: list,
                   pending: list[int], clock: StageClock | None = None,
                   model: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> tuple[float, int] | None:
    """The extraction pipeline of ``stage``: decode (DataLoader workers or the device), the
    backbone, shard buffers and writer threads, over the ``pending`` shards of ``store``.
    ``clock``: where each stage's busy and waiting time goes (``extract --profile``);
    ``model``: a stand-in for the model stage, uint8 pixels on the device → the arrays of a batch
    (benchmarks/extract_pipeline.py's null model). Returns when the first batch arrived and its size."""
    device = resolve_device(stage.options.device)
    on_device = stage.decode_mode(device) == DECODE_DEVICE
    if model is None:
        model = _model_stage(stage, layout, device)
    rows = [r for s in pending for r in range(*layout.shard_slice(s).indices(layout.n_images))]
    view = ExtractionDataset(stage.dataset, stage.p.res, stage.p.interpolation, samples, rows, stage.p.crop_ratio, on_device)
    loader = torch.utils.data.DataLoader(
        view, batch_size=stage.options.batch_size, num_workers=stage.options.workers, pin_memory=device.type == "cuda",
        collate_fn=view.collate,
    )
    writers = writer_threads(stage.options.writers, device)
    clock = clock or NULL_CLOCK
    buffers = _ShardBuffers(layout, stage.row_ids(samples), pinned=device.type == "cuda", slots=writers + 2, clock=clock)
    writer = _ShardWriter(store, buffers, writers, clock)
    label = f"extract {stage.dataset.name}/{stage.p.split} @{stage.p.res}"
    first_batch = None
    with progress_bar("img", stage.options.show_progress) as bar:
        task = bar.add_task(label, total=len(rows))
        compute = _ModelWorker(model, layout, buffers, writer, device, clock, lambda n: bar.advance(task, n))
        try:
            clock.start()  # the decoders start here; the model is built
            batches = iter(loader)
            while True:
                with clock.waiting("decode"):
                    batch = next(batches, None)
                if batch is None:
                    break
                first_batch = first_batch or (time.perf_counter(), len(batch["index"]))
                clock.add("decode", sum(batch["seconds"]))  # the workers' own time
                if on_device:
                    with clock.span("decode", device):
                        pixels = device_pixels(batch, stage.dataset, stage.p.res, stage.p.interpolation, stage.p.crop_ratio, device)
                else:
                    with clock.span("h2d", device):
                        pixels = batch["pixels"].to(device, non_blocking=True)
                compute.put(batch, pixels)
        except DatasetError as exc:
            raise DatasetError.from_worker(exc) from None
        finally:
            try:
                compute.close()
            finally:
                writer.close()
    return first_batch


class _ModelWorker:
    """The model stage and the copies back, in a thread of their own: while it computes one batch
    the main thread fetches and uploads the next (at most ``depth`` wait, which bounds memory).
    Filled shards go to the writer. An error is re-raised in the caller at the next ``put`` or at
    ``close``; after one the thread keeps taking batches, so that the caller never blocks."""

    def __init__(self, model: Callable[[torch.Tensor], dict], layout: StoreLayout, buffers: _ShardBuffers,
                 writer: _ShardWriter, device: torch.device, clock, advance: Callable[[int], None], depth: int = 2):
        self.model, self.layout, self.buffers, self.writer = model, layout, buffers, writer
        self.device, self.clock, self.advance = device, clock, advance
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="extract-model", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.clock.waiting("h2d"):  # the main thread brings batches decoded and uploaded
                item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            batch, pixels = item
            try:
                with self.clock.span("model", self.device):
                    arrays = self.model(pixels)
                if self.layout.labelled:
                    arrays[LABELS] = batch["label"]
                if self.layout.with_images:
                    arrays[IMAGES] = pixels
                with self.clock.span("d2h", self.device):
                    for shard in self.buffers.add(batch["index"].numpy(), arrays):
                        self.writer.put(shard)
                self.advance(len(batch["index"]))
            except BaseException as exc:
                self.error = exc

    def put(self, batch: dict, pixels: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        with self.clock.waiting("model"):
            self.queue.put((batch, pixels))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def choose_decoder(worker_seconds: float, device_rate: float, workers: int, cores: int | None = None) -> tuple[str, str]:
    """The faster decoder, and why: ``workers`` DataLoader processes on at most ``cores`` cores
    that take ``worker_seconds`` an image, or the device at ``device_rate`` images per second."""
    parallel = max(1, min(workers, cores or os.cpu_count() or 1))
    workers_rate = parallel / max(worker_seconds, 1e-9)
    measured = (f"(measured: {device_rate:,.0f} img/s on the device, {workers_rate:,.0f} img/s in {parallel} worker(s) at "
                f"{worker_seconds * 1000:.1f} ms an image; --decode cpu|device overrides)")
    if device_rate > workers_rate:
        return DECODE_DEVICE, f"on the device {measured}"
    return DECODE_CPU, f"in the DataLoader workers {measured}"


def writer_threads(writers: int | None, device: torch.device) -> int:
    """``--writers``, else 2 on CUDA (the disk is the slower side) and 1 on a CPU."""
    return writers or (2 if device.type == "cuda" else 1)


def pipeline_clock(workers: int, writers: int) -> StageClock:
    """The clock of an extraction's stages, in pipeline order, with their workers."""
    return StageClock({"decode": max(1, workers), "h2d": 1, "model": 1, "d2h": 1, "encode": writers, "write": writers})


def _model_stage(stage: ExtractStage, layout: StoreLayout, device: torch.device) -> Callable[[torch.Tensor], dict]:
    """The preset's backbone on ``device`` as the pipeline's model stage (:func:`_forward`)."""
    _, random = parse_backbone(stage.p.backbone)
    if random:
        console.print(f"[bold red]WARNING: {stage.p.backbone} has RANDOM weights (seed {stage.p.seed}), NOT pretrained DINO.[/]")
    backbone = build_backbone(stage.p.backbone, Path(stage.p.weights) if stage.p.weights else None, stage.p.seed).to(device)
    if stage.options.compile:
        backbone = torch.compile(backbone, dynamic=False)
    return lambda pixels: _forward(backbone, pixels, device, layout.flip, layout.attention)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"


@torch.inference_mode()
def _forward(backbone: torch.nn.Module, pixels: torch.Tensor, device: torch.device, flip: bool,
             attention: bool = False) -> dict[str, torch.Tensor]:
    """uint8 pixels (B, H, W, 3) on ``device`` → float16 tokens (B, h, w, C) and float32 pooled
    (B, C), still on ``device``; with ``flip`` also the mirrored image's tokens, mirrored back;
    with ``attention`` HP's local-positive weights (B, h, w, 9) from the last block's attention."""
    x = normalize(pixels)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if attention:
            feats, logits = backbone(x, attention=True)
            prefix = logits.shape[-1] - feats.shape[1] * feats.shape[2]
            weights = attention_neighbour_weights(logits, tuple(feats.shape[1:3]), prefix, **ATTENTION_SPEC)
            feats = feats.float()
        else:
            feats = backbone(x).float()
        out = {TOKENS: feats.half(), POOLED: feats.mean(dim=(1, 2))}
        if attention:
            out[ATTENTION] = weights.half()
        if flip:
            out[TOKENS_FLIP] = backbone(x.flip(3)).flip(2).half()
    return out


@dataclass
class _Shard:
    """A filled shard buffer on its way to the writer (``ready`` is set once its copies land)."""

    index: int
    rows: int
    arrays: dict[str, torch.Tensor]
    ids: np.ndarray
    ready: Any = None  # torch.cuda.Event on CUDA


class _ShardBuffers:
    """Host buffers of whole shards that each batch's rows are copied into.

    Rows arrive in store order, possibly spanning two shards. On CUDA the buffers are pinned and
    the device→host copies asynchronous; a CUDA event marks when a finished shard's copies have
    landed. At most ``slots`` shards are in flight: when all are with the writer, ``add``
    waits for one to come back, which bounds host memory.
    """

    def __init__(self, layout: StoreLayout, ids: list[str], pinned: bool, slots: int, clock=NULL_CLOCK):
        self.layout, self.ids, self.pinned, self.slots, self.clock = layout, ids, pinned, slots, clock
        self.free: queue.Queue = queue.Queue()
        self.made = 0
        self.filling: dict[int, tuple[dict[str, torch.Tensor], int]] = {}  # shard → (buffers, rows so far)

    def _take(self) -> dict[str, torch.Tensor]:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.made < self.slots:
                self.made += 1
                return {}
            with self.clock.waiting("write"):  # every buffer is with the writers
                return self.free.get()

    def release(self, buffers: dict[str, torch.Tensor]) -> None:
        self.free.put(buffers)

    def add(self, indices: np.ndarray, arrays: dict[str, torch.Tensor]) -> Iterator[_Shard]:
        """Copy a batch's rows in; yields each shard as soon as it is full. The caller must hand it
        to the writer before asking for the next, so a batch spanning many shards needs no more
        buffers than one filling shard plus those with the writer."""
        size = self.layout.shard_images
        for shard in np.unique(indices // size):
            shard = int(shard)
            sl = self.layout.shard_slice(shard)
            selected = np.flatnonzero(indices // size == shard)
            first, last = int(selected[0]), int(selected[-1]) + 1
            if not np.array_equal(indices[first:last], np.arange(indices[first], indices[first] + last - first)):
                raise RuntimeError(f"shard {shard}: rows arrived out of order")
            if shard not in self.filling:
                self.filling[shard] = (self._take(), 0)
            buffers, filled = self.filling[shard]
            offset = int(indices[first]) - sl.start
            for name, value in arrays.items():
                if name not in buffers:
                    buffers[name] = torch.empty((size, *value.shape[1:]), dtype=value.dtype, pin_memory=self.pinned)
                buffers[name][offset : offset + last - first].copy_(value[first:last], non_blocking=self.pinned)
            filled += last - first
            self.filling[shard] = (buffers, filled)
            if filled == sl.stop - sl.start:
                del self.filling[shard]
                ready = None
                if self.pinned:
                    ready = torch.cuda.Event()
                    ready.record()
                yield _Shard(shard, filled, buffers, np.array(self.ids[sl], dtype=str), ready)


class _ShardWriter:
    """Threads that write finished shards while the next batches compute.

    zarr writes each shard's arrays as separate files, so shards can be written side by side.
    After writing a shard, a thread makes durable and flags every shard written since the last
    such commit (``FeatureStore.commit``): its own, and those other threads finished meanwhile,
    in one round of flushes (group commit). A shard is flagged before its thread takes the
    next, so a later failure (a full disk) never costs a written shard. An error in a thread is
    re-raised in the caller at the next ``put`` or at ``close``; the threads keep returning
    buffers so that the producer never blocks.
    """

    def __init__(self, store: FeatureStore, buffers: _ShardBuffers, threads: int = 1, clock=NULL_CLOCK):
        self.store, self.buffers, self.clock = store, buffers, clock
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.uncommitted: list[int] = []
        self.lock, self.committing = threading.Lock(), threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"shard-writer-{i}", daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while True:
            with self.clock.waiting("d2h"):  # shards come filled from the main thread
                shard = self.queue.get()
            if shard is None:
                break
            try:
                if self.error is None:
                    if shard.ready is not None:
                        with self.clock.waiting("d2h"):  # its copies from the device
                            shard.ready.synchronize()
                    arrays = {name: value[: shard.rows].numpy() for name, value in shard.arrays.items()}
                    self.store.write_shard(shard.index, {**arrays, IDS: shard.ids}, commit=False, clock=self.clock)
                    with self.lock:
                        self.uncommitted.append(shard.index)
                    self._commit()
            except BaseException as exc:
                self.error = exc
            finally:
                self.buffers.release(shard.arrays)

    def _commit(self) -> None:
        with self.clock.waiting("write"):  # another thread's flushes
            self.committing.acquire()
        try:  # one commit at a time: a thread that waited here finds its shard flagged
            with self.lock:
                shards, self.uncommitted = self.uncommitted, []
            with self.clock.busy("write"):
                self.store.commit(shards)
        finally:
            self.committing.release()

    def put(self, shard: _Shard) -> None:
        self._raise()
        self.queue.put(shard)

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            kept = self.store.layout.n_shards - len(self.store.pending_shards())
            raise StoreError(
                f"{self.store.path}: writing a shard failed ({self.error}). Nothing is marked complete; "
                f"the {kept} shards already written are kept. Fix the cause (e.g. free disk space) and rerun "
                "the same command: it resumes."
            ) from self.error
