"""Linear and cluster probes on frozen codes, validated on the val store (reference §7–§10, the
study's §4 protocol).

Training: codes of random train images (patch resolution) → STEGO's two probes
(``probing.Probes``), Adam each, one backward of the summed losses. Every ``val_every`` steps
the val codes are upsampled to the label size before the probes (cluster = cosine argmax,
Hungarian over the whole val set). The artefact keeps every validation, the study's choice (the
step with the best val cluster mIoU, all four metrics from that step), the final step, and
the best step's probes evaluated with the dense CRF.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from ..atomic import atomic_write_bytes
from ..cache_schema import IMAGES, LABELS, METRICS, PROBES, TOKENS, TOKENS_FLIP, StoreError, open_complete_store
from ..models import resolve_device
from ..pipeline import Stage, artefact_state, begin_artefact, write_manifest
from ..probing import (FIT_TOKENS, BatchOrder, CodeSource, Probes, StoreArrays, evaluate, evaluate_with_crf,
                       load_reducer, sample_codes, train_validated)
from ..reducers import IdentityReducer



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
    clusterer: str = "cosine"  # the cluster probe: one of ops.kmeans.CLUSTERERS


class ProbeStage(Stage):
    name = "probe"
    version = 1

    def __init__(self, cache_root: Path, train: Stage, val: Stage, params: ProbeParams, reducer: Stage | None = None,
                 dim: int | None = None, derived: tuple[Stage, Stage] | None = None, method: str = "dino",
                 device: str = "auto", crf_workers: int = 2, show_progress: bool = True):
        """``reducer``: None (raw tokens, ``method``), or the upstream reduce / head stage or
        finished artefact whose codes are probed (at ``dim`` when it serves every D);
        ``derived``: the stages holding its precomputed train and val codes (h-NNE)."""
        super().__init__(cache_root)
        self.train, self.val, self.p, self.reducer, self.derived = train, val, params, reducer, derived
        self.method = reducer.method if reducer is not None else method
        self.dim, self.device = dim, device
        self.crf_workers, self.show_progress = crf_workers, show_progress

    def params(self) -> dict[str, Any]:
        params = asdict(self.p) | {"dim": self.dim, "method": self.method}
        if params["clusterer"] == "cosine":  # the default keeps the keys made before clusterers were an option
            del params["clusterer"]
        return params

    def upstream(self) -> dict[str, Stage]:
        up = {"train": self.train, "val": self.val}
        if self.reducer is not None:
            up["reducer"] = self.reducer
        if self.derived:
            up["train_codes"], up["val_codes"] = self.derived
        return up

    def inputs(self) -> list[str]:
        keys = [self.train.key, self.val.key, self.reducer.key if self.reducer is not None else "identity"]
        return keys + [stage.key for stage in self.derived or ()]

    @property
    def output(self) -> Path:
        label = self.method + (str(self.dim) if self.dim else "")
        return cache_schema.artefact_dir(self.cache_root, self.name, label, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> dict:
        started = time.time()
        p, device = self.p, resolve_device(self.device)
        train, val = open_complete_store(self.train.output), open_complete_store(self.val.output)
        for store in (train, val):
            if LABELS not in store:
                raise StoreError(f"{store.path}: no labels; probes need a labelled dataset")
        reducer = load_reducer(self.reducer.output, self.dim) if self.reducer is not None else IdentityReducer()
        loading = time.perf_counter()
        train_derived, val_derived = ((StoreArrays(open_complete_store(s.output), (TOKENS,), device=device) for s in self.derived)
                                      if self.derived else (None, None))
        tokens = () if self.derived else (TOKENS, TOKENS_FLIP)  # precomputed codes stand in for the tokens
        images = (IMAGES,) if p.crf else ()
        train_arrays = StoreArrays(train, (*tokens[:1], LABELS), device=device)
        train_codes = CodeSource(train_arrays, reducer, train_derived)
        val_codes = CodeSource(StoreArrays(val, (*tokens, LABELS, *images), device=device), reducer, val_derived, flip=p.flip_tta)
        seconds = {"load": time.perf_counter() - loading}
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        dim = train_codes(np.array([0])).shape[-1]
        probes = Probes(dim, p.n_classes, p.extra_clusters, p.clusterer).to(device)
        if not probes.learnt:
            probes.fit_clusters(sample_codes(train_codes, FIT_TOKENS, np.random.default_rng(p.seed), device), p.seed)
        optimizers = probes.optimizers(p.linear_lr, p.cluster_lr)
        batches = BatchOrder(len(train), p.batch_size, rng)

        def update(step: int) -> dict:
            rows = np.sort(batches.next())
            codes = train_codes.tensor(rows, device).permute(0, 3, 1, 2)
            labels = train_arrays.tensor(LABELS, rows, device).long()
            loss_linear, loss_cluster = probes.losses(codes, labels)
            for opt in optimizers:
                opt.zero_grad()
            (loss_linear + loss_cluster).backward()
            for opt in optimizers:
                opt.step()
            return {"loss_linear": loss_linear.item(), "loss_cluster": loss_cluster.item()}

        training = time.perf_counter()
        history, best, best_state = train_validated(
            p.steps, p.val_every, update, lambda: evaluate(val_codes, probes, device, p.extra_as_errors),
            probes.snapshot, f"probe {self.method}{self.dim or ''}", self.show_progress,
            select="cluster/mIoU" if probes.learnt else "linear/mIoU")
        seconds["train"] = time.perf_counter() - training
        metrics: dict[str, Any] = {"history": history, "best": best, "final": history[-1], "n_classes": p.n_classes}
        final_state = probes.snapshot()
        if p.crf:
            probes.restore(best_state)
            refining = time.perf_counter()
            metrics["best_crf"] = {"step": best["step"], **evaluate_with_crf(val_codes, probes, device, p.extra_as_errors,
                                                                             self.crf_workers, self.show_progress)}
            seconds["crf"] = time.perf_counter() - refining
        metrics["seconds"] = seconds
        begin_artefact(self.output)
        atomic_write_bytes(self.output / METRICS, json.dumps(metrics, indent=1).encode())
        buffer = io.BytesIO()
        torch.save({"best": best_state, "final": final_state}, buffer)
        atomic_write_bytes(self.output / PROBES, buffer.getvalue())
        write_manifest(self.output, self.manifest(started, dataset=train.attrs["params"]["dataset"], method=self.method,
                                                  code_dim=dim, seed=p.seed))
        return metrics
