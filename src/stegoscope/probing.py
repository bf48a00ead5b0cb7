"""What every probe and every head trained from the cache shares (reference §7–§10, the study's
§4 protocol).

* :class:`Probes`: STEGO's linear 1×1 probe and cosine cluster probe, trained on detached codes;
* :func:`evaluate` (and :func:`evaluate_with_crf`): val metrics over a whole store, the cluster
  probe Hungarian-matched over all of it, optionally refined by the dense CRF;
* :class:`CodeSource`: codes of a store's images, from a reducer or precomputed, with flip TTA;
* :class:`TokenBatches`: cached token batches, resident or streamed (the loop that draws them
  and trains probes and heads is ``training.py``);
* :class:`TrainingLog`: JSONL (and TensorBoard when installed) logging.

Upsample-then-probe is computed in an equivalent, lighter order: a 1×1 linear map commutes with
bilinear upsampling (its weights sum to one), so logits and cosine numerators are upsampled
instead of D-channel codes; the code norm is accumulated over channel chunks.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import signal
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write_bytes
from .cache_schema import IMAGES, INVENTORY, LABELS, LOG, PROBES, TOKENS, TOKENS_FLIP, FeatureStore, StoreError, open_feature_store
from .compute import distributed_workers
from .ops.crf import crf_argmax, softmax
from .ops.kmeans import CLUSTERERS, ClusterLookup, EuclideanLookup, FixedCentroids, lloyd_kmeans
from .ops.metrics import SegmentationMetrics
from .ops.transfer import to_device
from .pipeline import load_npz, read_manifest
from .progress import console, progress_bar
from .reducers import Reducer
from .storage import as_path, is_remote, stamp

CLUSTER_ALPHA = 2.0  # softmax(2·cos) for the CRF, as STEGO's evaluation
RESIDENT_BYTES = 2e9  # stores whose arrays fit are read into memory once


# -- codes ------------------------------------------------------------------------------------


class StoreArrays:
    """Some arrays of a feature store, placed once where they fit best: on the GPU that computes
    (when they fit in ``DEVICE_SHARE`` of its free memory), else in host memory (when they fit in
    ``limit_bytes``), else read from disk per access (a zarr read of a few rows costs far more than
    the rows). Rows come back in the order asked for.

    Placed arrays are kept for the next stage of the same process that asks for the same arrays
    of the same store (a sweep's probes and heads all read one train and one val store), until a
    placement that is not kept needs their room: see :func:`release_placed`.
    """

    def __init__(self, store: FeatureStore, names=(TOKENS, TOKENS_FLIP, LABELS, IMAGES), limit_bytes: float = RESIDENT_BYTES,
                 device: torch.device | None = None):
        self.store = store
        present = tuple(name for name in names if name in store)
        inventory = store.path / INVENTORY  # rewritten whenever the store is (re)completed
        ident = (str(store.path), store.key, stamp(inventory) if inventory.exists() else None, present, str(device))
        if ident in _KEPT:
            self.placement, self.arrays = _KEPT[ident]
        else:
            release_placed(keep_in_use=True)
            self.placement = placement(sum(store[name].nbytes for name in present), device, limit_bytes)
            self.arrays = {name: store[name] if self.placement == DISK else self._read(name, device) for name in present}
            if self.placement != DISK:
                _KEPT[ident] = (self.placement, self.arrays)
        self.device = device if self.placement == DEVICE else None
        _LIVE.add(self)

    @property
    def resident(self) -> bool:
        return self.placement != DISK

    def _read(self, name: str, device: torch.device | None):
        """The whole array, shard by shard in threads (zarr decodes one shard per call; threads
        overlap them), into host memory or straight to the device (no full copy on the host)."""
        array, layout = self.store[name], self.store.layout
        on_device = self.placement == DEVICE
        if on_device:
            placed = torch.empty(array.shape, dtype=_TORCH_DTYPES[str(array.dtype)], device=device)
        else:
            placed = np.empty(array.shape, array.dtype)

        def read(shard: int) -> None:
            rows = layout.shard_slice(shard)
            values = array[rows]
            placed[rows] = torch.from_numpy(np.ascontiguousarray(values)).to(device) if on_device else values

        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read, range(layout.n_shards)))
        return placed

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __len__(self) -> int:
        return len(self.store)

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The rows as a host array."""
        array, rows = self.arrays[name], np.asarray(rows)
        if self.placement == DEVICE:
            return array[torch.as_tensor(rows, device=self.device)].cpu().numpy()
        if self.placement == HOST:
            return array[rows]
        order = np.argsort(rows, kind="stable")  # zarr reads sorted rows; restore the order asked for after
        return array.get_orthogonal_selection((rows[order],))[np.argsort(order)]

    def tensor(self, name: str, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """The rows as a tensor on ``device`` (gathered there when the array lives there)."""
        if self.placement == DEVICE and self.device == device:
            return self.arrays[name][to_device(torch.as_tensor(np.asarray(rows)), device)]
        return to_device(torch.from_numpy(self.rows(name, rows)), device)


DEVICE, HOST, DISK = "device", "host", "disk"
DEVICE_SHARE = 0.6  # arrays go to a GPU when they fit in this share of its free memory
READ_THREADS = min(8, os.cpu_count() or 1)
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int16": torch.int16, "uint8": torch.uint8,
                 "int32": torch.int32, "int64": torch.int64}


_KEPT: dict[tuple, tuple[str, dict]] = {}  # placed arrays by (store, key, completion, names, device)
_LIVE: weakref.WeakSet[StoreArrays] = weakref.WeakSet()


def release_placed(keep_in_use: bool = False) -> None:
    """Drop the placed arrays kept for later stages (with ``keep_in_use``: those no live
    :class:`StoreArrays` holds), returning their GPU memory."""
    if keep_in_use:
        gc.collect()  # a finished stage's StoreArrays may sit in reference cycles
    in_use = {id(live.arrays) for live in _LIVE} if keep_in_use else set()
    for ident in [i for i, (_, arrays) in _KEPT.items() if id(arrays) not in in_use]:
        del _KEPT[ident]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placement(nbytes: int, device: torch.device | None, host_limit: float) -> str:
    """Where arrays of ``nbytes`` live: on a CUDA ``device`` with room, in host memory, or on disk."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
        if nbytes <= DEVICE_SHARE * free:
            return DEVICE
    return HOST if nbytes <= host_limit else DISK


class CodeSource:
    """Codes of a store's images: ``reducer(tokens)``, or precomputed codes of a derived store.

    With ``flip`` and a ``tokens_flip`` array, the codes of an image and of its mirror image
    (flipped back) are averaged, as STEGO's evaluation. Codes are computed where the tokens are:
    on the GPU that holds them (:meth:`Reducer.transform_tensor`), else on the host.
    """

    def __init__(self, arrays: StoreArrays, reducer: Reducer, derived: StoreArrays | None = None, flip: bool = False):
        self.arrays, self.reducer, self.derived = arrays, reducer, derived
        self.flip = flip and derived is None and TOKENS_FLIP in arrays

    def spec(self) -> tuple:
        """What another process needs to read the same codes: the stores' paths, the arrays, the reducer."""
        derived = None if self.derived is None else (str(self.derived.store.path), tuple(self.derived.arrays))
        return str(self.arrays.store.path), tuple(self.arrays.arrays), self.reducer, derived, self.flip

    @classmethod
    def reopened(cls, spec: tuple) -> CodeSource:
        """The source of :meth:`spec`, its stores read from disk per access (in a dask worker)."""
        path, names, reducer, derived, flip = spec
        open_rows = lambda where, arrays: StoreArrays(open_feature_store(as_path(where), verify=False), arrays, limit_bytes=0)  # noqa: E731
        return cls(open_rows(path, names), reducer, None if derived is None else open_rows(*derived), flip)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.tensor(rows, torch.device("cpu")).numpy()

    def tensor(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """(B, h, w, D) float32 codes on ``device``."""
        if self.derived is not None:
            return self.derived.tensor(TOKENS, rows, device).float()
        names = (TOKENS, TOKENS_FLIP) if self.flip else (TOKENS,)
        if self.arrays.placement == DEVICE:
            codes = [self.reducer.transform_tensor(self.arrays.tensor(name, rows, self.arrays.device)) for name in names]
        else:
            codes = [torch.from_numpy(self.reducer.transform(self.arrays.rows(name, rows))) for name in names]
        codes = codes[0] if len(codes) == 1 else (codes[0] + codes[1]) / 2
        return codes.to(device)


class TokenBatches:
    """Rows of a store's tokens / labels as (B, C, h, w) float and (B, H, W) long tensors on
    ``device``, from wherever :class:`StoreArrays` placed them."""

    def __init__(self, store: FeatureStore, device: torch.device, limit_bytes: float, extra: tuple[str, ...] = ()):
        missing = [name for name in extra if name not in store]
        if missing:
            raise StoreError(f"{store.path}: no {', '.join(missing)} array; it is made by an extraction that declares it "
                             f"(see the head's preset section in the README)")
        self.arrays, self.device = StoreArrays(store, (TOKENS, LABELS, *extra), limit_bytes, device), device
        self.resident = self.arrays.resident

    def extra(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """The rows of a further array, as they are stored."""
        return self.arrays.tensor(name, rows, self.device)

    def __len__(self) -> int:
        return len(self.arrays)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.arrays.tensor(TOKENS, rows, self.device)
        labels = self.arrays.tensor(LABELS, rows, self.device)
        return tokens.permute(0, 3, 1, 2).float(), labels.long()


def load_reducer(artefact: Path, n_components: int | None = None) -> Reducer:
    """A fitted reducer from its artefact directory (``n_components`` truncates one that serves
    every D, such as PCA)."""
    manifest = read_manifest(artefact)
    if manifest is None:
        raise StoreError(f"{artefact}: no manifest, so the run that makes it did not finish; run it (again)")
    if manifest.reducer is None:
        raise StoreError(f"{artefact}: a {manifest.stage} artefact holds no reducer; give the folder of a reduce or head artefact")
    cls = Reducer.by_name(manifest.reducer_class or manifest.method or "")
    try:
        reducer = cls.from_state(manifest.reducer, load_npz(artefact))
    except ValueError as exc:
        raise StoreError(f"{artefact}: {exc}") from None
    if n_components is not None and cls.serves_every_dim:
        reducer = reducer.with_components(n_components)
    return reducer


# -- probes and their evaluation ---------------------------------------------------------------


_LEARNT = {"cosine": ClusterLookup, "euclidean": EuclideanLookup}
FIT_TOKENS = 200_000  # train tokens a fitted clusterer sees (a seeded sample)


class Probes(nn.Module):
    """STEGO's two probes on detached codes: a linear 1×1 classifier (logits bilinearly upsampled
    to the labels, cross-entropy over labelled pixels) and a cluster probe with ``n_classes +
    extra_clusters`` centroids: by default the learnt cosine k-means, else one of ``CLUSTERERS``
    (a fitted one is fitted by :meth:`fit_clusters` before training and then stays fixed)."""

    def __init__(self, dim: int, n_classes: int, extra_clusters: int = 0, clusterer: str = "cosine"):
        super().__init__()
        if clusterer not in CLUSTERERS:
            raise ValueError(f"clusterer must be one of {', '.join(CLUSTERERS)}, not {clusterer!r}")
        self.n_classes, self.extra_clusters, self.clusterer = n_classes, extra_clusters, clusterer
        self.linear = nn.Conv2d(dim, n_classes, 1)
        k = n_classes + extra_clusters
        self.learnt = clusterer in _LEARNT
        metric = "cosine" if clusterer == "spherical-kmeans" else "euclidean"
        self.cluster = _LEARNT[clusterer](dim, k) if self.learnt else FixedCentroids(torch.zeros(k, dim), metric)

    def fit_clusters(self, codes: torch.Tensor, seed: int) -> None:
        """Fit a fixed clusterer's centroids on (N, D) codes."""
        k, x = len(self.cluster.clusters), codes.float()
        if self.clusterer == "minibatch-kmeans":
            from sklearn.cluster import MiniBatchKMeans

            centroids = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096).fit(x.cpu().numpy()).cluster_centers_
        else:
            centroids = lloyd_kmeans(x, k, seed=seed, device=x.device, spherical=self.clusterer == "spherical-kmeans")
        self.cluster.clusters.copy_(torch.as_tensor(centroids, dtype=torch.float32))

    def losses(
        self, code: torch.Tensor, labels: torch.Tensor, linear_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear, cluster) losses of codes (B, D, h, w) against labels (B, H, W); the linear probe
        reads ``linear_input`` instead when given (the same code, not detached)."""
        labels = torch.where((labels >= 0) & (labels < self.n_classes), labels, -1)
        linear_code = code if linear_input is None else linear_input
        logits = F.interpolate(self.linear(linear_code), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        # a batch without a labelled pixel gives no linear loss, decided on the device (no host branch)
        linear = torch.where((labels >= 0).any(), F.cross_entropy(logits, labels, ignore_index=-1), logits.new_zeros(()))
        cluster, _ = self.cluster(code, None)
        return linear, cluster

    def optimizers(self, linear_lr: float, cluster_lr: float) -> list[torch.optim.Optimizer]:
        cluster = [torch.optim.Adam(self.cluster.parameters(), lr=cluster_lr)] if self.learnt else []
        return [torch.optim.Adam(self.linear.parameters(), lr=linear_lr), *cluster]

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of both probes' weights (the ``probes.pt`` layout)."""
        return {"linear": _copy(self.linear), "cluster": _copy(self.cluster)}

    def with_cluster(self, cluster: nn.Module) -> Probes:
        """These probes' linear probe with another cluster assignment (a head's own prototypes)."""
        view = Probes(1, self.n_classes, self.extra_clusters, self.clusterer)
        view.linear, view.cluster, view.learnt = self.linear, cluster, False
        return view

    def restore(self, snapshot: dict[str, dict[str, torch.Tensor]]) -> Probes:
        self.linear.load_state_dict(snapshot["linear"])
        self.cluster.load_state_dict(snapshot["cluster"])
        return self


@dataclass(frozen=True)
class ProbeWeights:
    """An artefact's ``probes.pt``: both probes' weights (:meth:`Probes.snapshot`) at the best
    validation and at the last step. Read with ``weights_only`` (tensors only, nothing runs)."""

    best: dict[str, dict[str, torch.Tensor]]
    final: dict[str, dict[str, torch.Tensor]]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"best": self.best, "final": self.final}, buffer)
        return buffer.getvalue()

    @classmethod
    def read(cls, directory: Path) -> ProbeWeights:
        with (as_path(directory) / PROBES).open("rb") as fh:
            data = torch.load(fh, weights_only=True, map_location="cpu")
        return cls(data["best"], data["final"])

    @property
    def best_centroids(self) -> torch.Tensor:
        """The cluster probe's centroids at the best validation."""
        return self.best["cluster"]["clusters"]

    def best_probes(self, dim: int, n_classes: int, extra_clusters: int = 0, clusterer: str = "cosine",
                    own_clusters: str | None = None, crf_alpha: float | None = None) -> Probes:
        """The probes at the best validation, rebuilt: a probe's (its ``clusterer``), or a head's
        linear probe with the head's own centroids scored by ``own_clusters`` (a metric; ``crf_alpha``
        its CRF temperature, None: the metric's default)."""
        probes = Probes(dim, n_classes, extra_clusters, clusterer)
        if own_clusters is None:
            return probes.restore(self.best)
        probes.linear.load_state_dict(self.best["linear"])
        return probes.with_cluster(FixedCentroids(self.best_centroids, own_clusters, crf_alpha))


def upsampled_scores(codes: torch.Tensor, probes: Probes, size: tuple[int, int],
                     channel_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear logits, cluster scores) of the codes bilinearly upsampled to ``size``: cosines, or
    the clusterer's own scores where they are affine in the code (Euclidean 2·x·c − ‖c‖², raw
    dot products), which commute with the upsampling as the linear logits do."""
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    logits = up(probes.linear(codes))
    if probes.cluster.metric != "cosine":
        return logits, up(probes.cluster.scores(codes))
    centroids = probes.cluster.clusters
    dots = up(torch.einsum("bchw,kc->bkhw", codes, F.normalize(centroids, dim=1)))
    norm2 = sum(up(codes[:, i : i + channel_chunk]).square().sum(1) for i in range(0, codes.shape[1], channel_chunk))
    return logits, dots / norm2.sqrt().clamp_min(1e-12)[:, None]


class CRFError(RuntimeError):
    """The dense CRF could not finish (a worker hung past its timeout or died, twice)."""


class CRFPool:
    """Dense CRF over many images in spawned worker processes that cannot hang the run.

    Every image has a timeout. A pool that breaks or hangs is killed and a fresh one retries the
    images left; a second failure stops the run with what happened. ``workers=0`` runs the CRF
    in this process instead, without a timeout. :meth:`run` gives any other per-image job (a
    picklable function) the same guard.
    """

    def __init__(self, workers: int = 2, timeout: float = 120.0):
        self.workers, self.timeout = workers, timeout
        self.pool: ProcessPoolExecutor | None = None
        self.pids: Any = None  # a queue each worker puts its pid in when it starts (to kill a hung one)

    def map(self, images: list[np.ndarray], probs: list[np.ndarray]) -> list[np.ndarray]:
        return self.run(crf_argmax, list(zip(images, probs)))

    def run(self, function: Callable[[Any], np.ndarray], jobs: list) -> list[np.ndarray]:
        """``function(job)`` for every job, in order."""
        if self.workers == 0:
            return [function(job) for job in jobs]
        done: list[np.ndarray] = []
        failures = 0
        while True:
            if self.pool is None:
                context = get_context("spawn")
                self.pids = context.SimpleQueue()
                self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_report_pid, initargs=(self.pids,))
            try:
                futures = [self.pool.submit(function, job) for job in jobs[len(done):]]
                for future in futures:
                    done.append(future.result(timeout=self.timeout))
                return done
            except (FutureTimeout, OSError, RuntimeError) as exc:  # BrokenProcessPool is a RuntimeError
                self.close(kill=True)
                failures += 1
                what = f"a worker took over {self.timeout:g} s" if isinstance(exc, FutureTimeout) else f"{type(exc).__name__}: {exc}"
                if failures == 2:
                    raise CRFError(f"the dense CRF failed twice ({what}); rerun with --crf-workers 0 to run it in this "
                                   "process without a timeout, or with --no-crf") from exc
                console.print(f"[yellow]CRF pool failed ({what}); a fresh pool retries the {len(jobs) - len(done)} images left[/]")

    def close(self, kill: bool = False) -> None:
        if self.pool is not None:
            # Unless killing a hung pool, wait for the workers to exit: a worker still starting
            # reads the pid queue's semaphore, which goes when the queue is dropped below.
            self.pool.shutdown(wait=not kill, cancel_futures=True)
            while kill and not self.pids.empty():  # a hung worker would outlive shutdown()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pids.get(), signal.SIGTERM)
            self.pids.close()
            self.pool = self.pids = None


def _report_pid(pids) -> None:
    """A CRF worker's first act: say who it is, so that a pool that hangs can be killed."""
    pids.put(os.getpid())


@dataclass
class Evaluation:
    """Probes to score on a source's codes of the val store (cluster unmatched pixels as errors
    with ``extra_as_errors``)."""

    source: CodeSource
    probes: Probes
    extra_as_errors: bool = False

    def counters(self) -> tuple[SegmentationMetrics, SegmentationMetrics]:
        """Empty (linear, cluster) confusion counts."""
        n_classes = self.probes.n_classes
        return (SegmentationMetrics(n_classes),
                SegmentationMetrics(n_classes, self.probes.extra_clusters, hungarian=True, extra_as_errors=self.extra_as_errors))


@torch.no_grad()
def evaluate(source: CodeSource, probes: Probes, device: torch.device, extra_as_errors: bool = False,
             crf: CRFPool | None = None, batch: int = 8, progress=None) -> dict[str, Any]:
    """Linear and cluster metrics over every image of the source's (val) store (Hungarian over
    all of them), flattened to ``linear/mIoU``, ``cluster/Accuracy`` …

    Batches are counted in this process (on the GPU that holds the codes, or on the host; the
    CRF in ``crf``'s pool), or, under a dask.distributed scheduler (``--scheduler
    local-cluster|tcp://…``), as one task per batch that reads its rows from the store by its
    path and runs the CRF itself, each within ``crf.timeout`` per image; the confusion counts
    are the same either way."""
    lin, clu = Evaluation(source, probes, extra_as_errors).counters()
    n = len(source.arrays)
    batches = [np.arange(start, min(start + batch, n)) for start in range(0, n, batch)]
    workers = distributed_workers() if device.type != "cuda" else 0
    if workers:
        spec = source.spec()
        for first in range(0, len(batches), 2 * workers):
            group = batches[first : first + 2 * workers]
            # the CRF's time: linear and cluster of each image, for the tasks each worker runs in turn
            timeout = None if crf is None else crf.timeout * 2 * batch * -(-len(group) // workers)
            for lin_part, clu_part in _gathered([dask.delayed(_counted)(spec, probes, rows, crf is not None) for rows in group],
                                                timeout):
                lin.merge(lin_part), clu.merge(clu_part)
            if progress is not None:
                progress(sum(len(rows) for rows in group))
    else:
        for rows in batches:
            _count(source, probes, device, rows, lin, clu, crf)
            if progress is not None:
                progress(len(rows))
    return _scored(lin, clu)


@torch.no_grad()
def evaluate_together(evaluations: list[Evaluation], device: torch.device, batch: int = 8) -> list[dict[str, Any]]:
    """:func:`evaluate` (without the CRF) of every evaluation in one pass over the val rows: each
    batch's labels gathered once per store, every evaluation counted where its scores are, the
    counts read once at the end. Under dask.distributed, each evaluation as :func:`evaluate`'s tasks."""
    if device.type != "cuda" and distributed_workers():
        return [evaluate(e.source, e.probes, device, e.extra_as_errors, batch=batch) for e in evaluations]
    n = len(evaluations[0].source.arrays)
    if any(len(e.source.arrays) != n for e in evaluations):
        raise ValueError("evaluations read val stores of different lengths")
    counters = [e.counters() for e in evaluations]
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        labels: dict[str, torch.Tensor] = {}  # by store path: the group's members read one val store
        for e, (lin, clu) in zip(evaluations, counters):
            store = str(e.source.arrays.store.path)
            if store not in labels:
                labels[store] = e.source.arrays.tensor(LABELS, rows, device)
            _count(e.source, e.probes, device, rows, lin, clu, labels=labels[store])
    return [_scored(lin, clu) for lin, clu in counters]


def _scored(lin: SegmentationMetrics, clu: SegmentationMetrics) -> dict[str, Any]:
    out = flat({"linear": lin.compute(), "cluster": clu.compute()})
    modes = clu.compute_modes()  # the other mappings of clusters to classes, from the same confusion
    for mode, prefix in (("errors", "cluster_extra_as_errors"), ("many_to_one", "cluster_many_to_one")):
        out |= {f"{prefix}/{key}": modes[mode][key] for key in ("mIoU", "Accuracy")}
    return out


def predict(source: CodeSource, probes: Probes, device: torch.device, rows: np.ndarray, size: tuple[int, int],
            crf: CRFPool | None = None) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
    """One batch's (linear class, cluster) predictions at ``size`` (the labels'): on the device
    that holds the scores, or, refined by the dense CRF in ``crf``'s pool, on the host."""
    codes = source.tensor(rows, device).permute(0, 3, 1, 2)
    logits, cosines = upsampled_scores(codes, probes, size)
    if crf is None:
        return logits.argmax(1), cosines.argmax(1)
    images = list(source.arrays.rows(IMAGES, rows))
    lin_pred = np.stack(crf.map(images, [softmax(x) for x in logits.cpu().numpy()]))
    alpha = getattr(probes.cluster, "crf_alpha", None) or CLUSTER_ALPHA
    return lin_pred, np.stack(crf.map(images, [softmax(alpha * x) for x in cosines.cpu().numpy()]))


def _count(source: CodeSource, probes: Probes, device: torch.device, rows: np.ndarray, lin: SegmentationMetrics,
           clu: SegmentationMetrics, crf: CRFPool | None = None, labels: torch.Tensor | None = None) -> None:
    """Add one batch's linear and cluster predictions (± the CRF) to the confusion counts
    (``labels``: the rows' labels on ``device``, when already gathered), where the predictions
    are (a GPU, without copying label maps back)."""
    if labels is None:
        labels = source.arrays.tensor(LABELS, rows, device)
    lin_pred, clu_pred = predict(source, probes, device, rows, tuple(labels.shape[-2:]), crf)
    if crf is not None:
        labels = labels.cpu().numpy()
    lin.update(lin_pred, labels)
    clu.update(clu_pred, labels)


@torch.no_grad()
def _counted(spec: tuple, probes: Probes, rows: np.ndarray, crf: bool = False) -> tuple[SegmentationMetrics, SegmentationMetrics]:
    """One batch's confusion counts in a dask worker: the store reopened by its path (or URL),
    rows read from it, the CRF (``crf``) run in the task."""
    lin = SegmentationMetrics(probes.n_classes)
    clu = SegmentationMetrics(probes.n_classes, probes.extra_clusters)
    _count(CodeSource.reopened(spec), probes, torch.device("cpu"), rows, lin, clu, CRFPool(0) if crf else None)
    return lin, clu


def _gathered(tasks: list, timeout: float | None) -> list:
    """The results of dask ``tasks`` on the active dask.distributed client, all within
    ``timeout`` seconds (the CRF's; None: no limit). Tasks past it, or whose workers keep dying
    while they run the CRF, stop the run with the fix (dask already retries a task whose worker
    died, and names it when that keeps happening)."""
    from dask.distributed import KilledWorker, TimeoutError, get_client, wait

    client = get_client()
    futures = client.compute(tasks)
    try:
        wait(futures, timeout=timeout)
        return client.gather(futures)
    except (TimeoutError, KilledWorker) as exc:
        client.cancel(futures)
        if timeout is None:
            raise
        what = f"a task took over {timeout:g} s" if isinstance(exc, TimeoutError) else f"its workers died ({exc})"
        raise CRFError(f"the dense CRF on the dask cluster failed: {what}; rerun with the threads scheduler, "
                       "--crf-workers 0, or --no-crf") from exc


def sample_codes(source: CodeSource, n_tokens: int, rng: np.random.Generator, device: torch.device, batch: int = 32) -> torch.Tensor:
    """(≤ n_tokens, D) codes of a seeded sample of the source's images, then of their tokens."""
    per_image = int(np.prod(source.arrays.store.layout.grid))
    rows = np.sort(rng.choice(len(source.arrays), size=min(len(source.arrays), -(-n_tokens // per_image)), replace=False))
    codes = torch.cat([source.tensor(rows[i : i + batch], device).flatten(0, -2) for i in range(0, len(rows), batch)])
    return codes[torch.as_tensor(np.sort(rng.choice(len(codes), size=min(len(codes), n_tokens), replace=False)), device=device)]


def evaluate_with_crf(source: CodeSource, probes: Probes, device: torch.device, extra_as_errors: bool = False,
                      workers: int = 2, show_progress: bool = True) -> dict[str, Any]:
    """:func:`evaluate` with every prediction refined by the dense CRF (STEGO's parameters), in a
    worker pool that cannot hang the run."""
    pool = CRFPool(workers)
    try:
        with progress_bar("img", show_progress) as bar:
            task = bar.add_task("dense CRF", total=len(source.arrays))
            return evaluate(source, probes, device, extra_as_errors, crf=pool, progress=lambda n: bar.advance(task, n))
    finally:
        pool.close()


# -- logging ---------------------------------------------------------------------------------


class TrainingLog:
    """``log.jsonl`` (and TensorBoard when installed): scalars every ``every`` steps and at step 1,
    histograms of the non-scalar tensors every ``hist_every`` steps. On object storage the log
    is PUT whole at most every ``put_seconds`` and at the end (no TensorBoard there)."""

    def __init__(self, directory: Path, every: int = 10, hist_every: int = 100, put_seconds: float = 60.0):
        self.every, self.hist_every = every, hist_every
        self.path = as_path(directory) / LOG
        self.remote = is_remote(self.path)
        self.rows: list[str] = []
        self.put_seconds, self.put_at = put_seconds, time.monotonic()
        self.file = None if self.remote else self.path.open("w")
        self.writer = None if self.remote else _tensorboard(self.path.parent)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == 1

    def write(self, step: int, values: dict[str, torch.Tensor | float]) -> None:
        """Scalars are logged as they are, tensors by their mean (and histogram when due)."""
        row: dict[str, Any] = {"step": step}
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel() > 1}
        means = [v.detach().float().mean() for v in values.values() if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(means).tolist() if means else [])  # one copy to the host for the whole row
        for name, value in values.items():
            row[name] = next(read) if isinstance(value, torch.Tensor) else float(value)
        if step % self.hist_every == 0 and tensors:
            row["hist"] = {k: np.histogram(v.detach().cpu().numpy(), 40, (-1, 1))[0].tolist() for k, v in tensors.items()}
        if self.remote:
            self.rows.append(json.dumps(row) + "\n")
            if time.monotonic() - self.put_at > self.put_seconds:
                self._put()
        else:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer is not None:
            for name, value in row.items():
                if name not in ("step", "hist"):
                    self.writer.add_scalar(name, value, step)
            if "hist" in row:
                for name, value in tensors.items():
                    self.writer.add_histogram(name, value.detach().cpu(), step)

    def _put(self) -> None:
        atomic_write_bytes(self.path, "".join(self.rows).encode())
        self.put_at = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self._put()
        else:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory / "tensorboard"))


def flat(result: dict[str, dict]) -> dict[str, Any]:
    """``{"linear": {"mIoU": …}}`` → ``{"linear/mIoU": …}``."""
    return {f"{probe}/{key}": value for probe, values in result.items() for key, value in values.items()}


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
