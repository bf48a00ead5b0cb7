"""Linear and cluster probes on reduced codes, validated on the val store (reference §7–§10,
the study's §4 protocol).

Training: codes of random train images (patch resolution) → linear 1×1 probe, logits bilinearly
upsampled to the label size, cross-entropy over labelled pixels; cosine k-means cluster probe on
the same codes; Adam 5e-3 each, one backward of the summed losses. Every ``val_every`` steps the
val codes are upsampled to the label size (320 px) before the probes (cluster = cosine argmax,
Hungarian over the whole val set). The artefact keeps every validation, the study's choice (the
step with the best val cluster mIoU, all four metrics from that step), the final step, and the
best step's probes evaluated with the dense CRF.

Upsample-then-probe is computed in an equivalent, lighter order: a 1×1 linear map commutes with
bilinear upsampling (its weights sum to one), so logits and cosine numerators are upsampled
instead of D-channel codes; the code norm is accumulated over channel chunks.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import cache_schema
from ..cache_schema import IMAGES, LABELS, TOKENS, TOKENS_FLIP, FeatureStore, StoreError
from ..models import resolve_device
from ..ops.crf import dense_crf, softmax
from ..ops.kmeans import ClusterLookup
from ..ops.metrics import SegmentationMetrics
from ..atomic import atomic_write_bytes
from ..pipeline import Stage, artefact_state, begin_artefact, package_versions, read_manifest, write_manifest
from ..progress import console, progress_bar
from ..reducers import IdentityReducer, Reducer
from .reduce import load_reducer, open_complete_store

METRICS = "metrics.json"
PROBES = "probes.pt"
CLUSTER_ALPHA = 2.0  # softmax(2·cos) for the CRF, as STEGO's evaluation


@dataclass(frozen=True)
class ProbeParams:
    n_classes: int
    steps: int
    batch_size: int
    linear_lr: float = 5e-3
    cluster_lr: float = 5e-3
    extra_clusters: int = 0
    val_every: int = 100
    seed: int = 0
    crf: bool = True
    extra_as_errors: bool = False  # count pixels of unmatched clusters as errors (not parity)
    flip_tta: bool = True  # average the codes of the flipped val images when the store has them


class CodeSource:
    """Codes of a store's images: ``reducer(tokens)``, or precomputed codes of a derived store.

    With ``flip`` and a ``tokens_flip`` array, the codes of an image and of its mirror image
    (flipped back) are averaged, as STEGO's evaluation.
    """

    def __init__(self, store: FeatureStore, reducer: Reducer, derived: FeatureStore | None = None, flip: bool = False):
        self.store, self.reducer, self.derived = store, reducer, derived
        self.flip = flip and derived is None and TOKENS_FLIP in store

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if self.derived is not None:
            return np.asarray(self.derived[TOKENS].get_orthogonal_selection((rows,)), dtype=np.float32)
        codes = self.reducer.transform(self.store[TOKENS].get_orthogonal_selection((rows,)))
        if self.flip:
            codes = (codes + self.reducer.transform(self.store[TOKENS_FLIP].get_orthogonal_selection((rows,)))) / 2
        return codes


def upsampled_scores(codes: torch.Tensor, linear: nn.Conv2d, cluster: ClusterLookup, size: tuple[int, int],
                     channel_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear logits, cluster cosines) of the codes bilinearly upsampled to ``size``."""
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    logits = up(linear(codes))
    dots = up(torch.einsum("bchw,kc->bkhw", codes, F.normalize(cluster.clusters, dim=1)))
    norm2 = sum(up(codes[:, i : i + channel_chunk]).square().sum(1) for i in range(0, codes.shape[1], channel_chunk))
    return logits, dots / norm2.sqrt().clamp_min(1e-12)[:, None]


def _crf_argmax(args: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    image, probs = args
    return dense_crf(image, probs).argmax(axis=0)


class CRFPool:
    """Dense CRF over many images in worker processes that cannot hang the run: a spawn
    context, a per-image timeout, and a serial fallback when the pool fails."""

    def __init__(self, workers: int = 2, timeout: float = 120.0):
        self.workers, self.timeout = workers, timeout
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))

    def map(self, images: list[np.ndarray], probs: list[np.ndarray]) -> list[np.ndarray]:
        jobs = list(zip(images, probs))
        if self.pool is not None:
            try:
                futures = [self.pool.submit(_crf_argmax, job) for job in jobs]
                return [f.result(timeout=self.timeout) for f in futures]
            except (FutureTimeout, OSError, RuntimeError) as exc:  # BrokenProcessPool is a RuntimeError
                console.print(f"[yellow]CRF pool failed ({type(exc).__name__}); continuing serially[/]")
                self.close()
        return [_crf_argmax(job) for job in jobs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


@torch.no_grad()
def evaluate(source: CodeSource, store: FeatureStore, linear: nn.Conv2d, cluster: ClusterLookup, p: ProbeParams,
             device: torch.device, crf: CRFPool | None = None, batch: int = 8, progress=None) -> dict[str, dict]:
    """Linear and cluster metrics over the whole val store (Hungarian over all of it)."""
    lin = SegmentationMetrics(p.n_classes)
    clu = SegmentationMetrics(p.n_classes, p.extra_clusters, hungarian=True, extra_as_errors=p.extra_as_errors)
    n = len(store)
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        labels = store[LABELS][rows[0] : rows[-1] + 1]
        codes = torch.from_numpy(source(rows)).permute(0, 3, 1, 2).to(device)
        logits, cosines = upsampled_scores(codes, linear, cluster, labels.shape[-2:])
        if crf is None:
            lin_pred, clu_pred = logits.argmax(1).cpu().numpy(), cosines.argmax(1).cpu().numpy()
        else:
            images = list(store[IMAGES][rows[0] : rows[-1] + 1])
            lin_pred = np.stack(crf.map(images, [softmax(x) for x in logits.cpu().numpy()]))
            clu_pred = np.stack(crf.map(images, [softmax(CLUSTER_ALPHA * x) for x in cosines.cpu().numpy()]))
        lin.update(lin_pred, labels)
        clu.update(clu_pred, labels)
        if progress is not None:
            progress(len(rows))
    return {"linear": lin.compute(), "cluster": clu.compute()}


class ProbeStage(Stage):
    name = "probe"
    version = 1

    def __init__(self, cache_root: Path, train_store: Path, val_store: Path, params: ProbeParams,
                 reducer: Stage | Path | None = None, dim: int | None = None, derived: tuple | None = None,
                 device: str = "auto", crf_workers: int = 2, show_progress: bool = True):
        """``reducer``: None (raw tokens), an upstream reduce / train-stego stage (which need not
        have run yet), or a finished artefact directory; ``derived``: the stages (or store paths)
        holding precomputed train and val codes (h-NNE)."""
        super().__init__(cache_root)
        self.train, self.val = open_complete_store(train_store), open_complete_store(val_store)
        for store in (self.train, self.val):
            if LABELS not in store:
                raise StoreError(f"{store.path}: no labels; probes need a labelled dataset")
        self.p, self.dim, self.device = params, dim, device
        self.crf_workers, self.show_progress = crf_workers, show_progress
        self.reducer_path, self.reducer_key, self.method = None, "identity", "dino"
        if isinstance(reducer, Stage):
            self.reducer_path, self.reducer_key = reducer.output, reducer.key
            self.method = getattr(reducer.p, "method", "stego")
        elif reducer is not None:
            manifest = read_manifest(reducer)
            if manifest is None:
                raise StoreError(f"{reducer}: the reducer fit is not complete; run `stegoscope reduce` first")
            self.reducer_path, self.reducer_key, self.method = Path(reducer), manifest["key"], manifest["method"]
        self.derived = [(d.output, d.key) if isinstance(d, Stage) else (Path(d), open_complete_store(d).key)
                        for d in derived] if derived else None

    def params(self) -> dict[str, Any]:
        return asdict(self.p) | {"dim": self.dim, "method": self.method}

    def inputs(self) -> list[str]:
        return [self.train.key, self.val.key, self.reducer_key] + [key for _, key in self.derived or ()]

    @property
    def output(self) -> Path:
        label = self.method + (str(self.dim) if self.dim else "")
        return cache_schema.artefact_dir(self.cache_root, self.name, label, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def sources(self) -> tuple[CodeSource, CodeSource]:
        reducer = load_reducer(self.reducer_path, self.dim) if self.reducer_path else IdentityReducer()
        train_derived, val_derived = [open_complete_store(path) for path, _ in self.derived] if self.derived else (None, None)
        return (CodeSource(self.train, reducer, train_derived),
                CodeSource(self.val, reducer, val_derived, flip=self.p.flip_tta))

    def execute(self, force: bool) -> dict:
        started = time.time()
        p, device = self.p, resolve_device(self.device)
        train_codes, val_codes = self.sources()
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        dim = train_codes(np.array([0])).shape[-1]
        linear = nn.Conv2d(dim, p.n_classes, 1).to(device)
        cluster = ClusterLookup(dim, p.n_classes + p.extra_clusters).to(device)
        opt_linear = torch.optim.Adam(linear.parameters(), lr=p.linear_lr)
        opt_cluster = torch.optim.Adam(cluster.parameters(), lr=p.cluster_lr)
        order, cursor = rng.permutation(len(self.train)), 0
        history, best, best_state = [], None, None
        with progress_bar("step", self.show_progress) as bar:
            task = bar.add_task(f"probe {self.method}{self.dim or ''}", total=p.steps)
            for step in range(1, p.steps + 1):
                if cursor + p.batch_size > len(order):
                    order, cursor = rng.permutation(len(self.train)), 0
                rows = np.sort(order[cursor : cursor + p.batch_size])
                cursor += p.batch_size
                codes = torch.from_numpy(train_codes(rows)).permute(0, 3, 1, 2).to(device)
                labels = torch.from_numpy(self.train[LABELS].get_orthogonal_selection((rows,)).astype(np.int64)).to(device)
                labels = torch.where((labels >= 0) & (labels < p.n_classes), labels, -1)
                logits = F.interpolate(linear(codes), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                loss_linear = F.cross_entropy(logits, labels, ignore_index=-1) if (labels >= 0).any() else logits.sum() * 0
                loss_cluster, _ = cluster(codes, None)
                opt_linear.zero_grad()
                opt_cluster.zero_grad()
                (loss_linear + loss_cluster).backward()
                opt_linear.step()
                opt_cluster.step()
                if step % p.val_every == 0 or step == p.steps:
                    result = evaluate(val_codes, self.val, linear, cluster, p, device)
                    row = {"step": step, "loss_linear": loss_linear.item(), "loss_cluster": loss_cluster.item(), **_flat(result)}
                    history.append(row)
                    if best is None or row["cluster/mIoU"] > best["cluster/mIoU"]:
                        best = row
                        best_state = {"linear": _copy(linear), "cluster": _copy(cluster)}
                bar.advance(task)
        metrics: dict[str, Any] = {"history": history, "best": best, "final": history[-1], "n_classes": p.n_classes}
        final_state = {"linear": _copy(linear), "cluster": _copy(cluster)}
        if p.crf:
            linear.load_state_dict(best_state["linear"])
            cluster.load_state_dict(best_state["cluster"])
            pool = CRFPool(self.crf_workers)
            try:
                with progress_bar("img", self.show_progress) as bar:
                    task = bar.add_task("dense CRF", total=len(self.val))
                    crf_result = evaluate(val_codes, self.val, linear, cluster, p, device, crf=pool,
                                          progress=lambda n: bar.advance(task, n))
            finally:
                pool.close()
            metrics["best_crf"] = {"step": best["step"], **_flat(crf_result)}
        begin_artefact(self.output)
        atomic_write_bytes(self.output / METRICS, json.dumps(metrics, indent=1).encode())
        import io

        buffer = io.BytesIO()
        torch.save({"best": best_state, "final": final_state}, buffer)
        atomic_write_bytes(self.output / PROBES, buffer.getvalue())
        write_manifest(self.output, {
            "key": self.key, "stage": self.name, "stage_version": self.version, "params": self.params(),
            "dataset": self.train.attrs["params"]["dataset"], "method": self.method, "code_dim": dim, "seed": p.seed,
            "inputs": self.inputs(), "started": started, "finished": time.time(), "seconds": time.time() - started,
            "versions": package_versions(),
        })
        return metrics


def _flat(result: dict[str, dict]) -> dict[str, Any]:
    out = {}
    for probe, values in result.items():
        for key, value in values.items():
            out[f"{probe}/{key}"] = value
    return out


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
