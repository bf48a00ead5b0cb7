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

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from .. import methods as registry
from ..cache_schema import IMAGES, LABELS, METRICS, PROBES, TOKENS, TOKENS_FLIP, FeatureStore, StoreError, open_complete_store
from ..models import resolve_device
from ..pipeline import Stage, artefact_state
from ..probing import FIT_TOKENS, CodeSource, Evaluation, Probes, ProbeWeights, StoreArrays, evaluate_with_crf, load_reducer, sample_codes
from ..records import EvalResult
from ..reducers import IdentityReducer, Reducer
from ..training import Member, Schedule, SharedBatch, Trained, train_group


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
                 dim: int | None = None, derived: tuple[Stage, Stage] | None = None, method: str | None = None,
                 device: str = "auto", crf_workers: int = 2, show_progress: bool = True):
        """``reducer``: None (``method``'s codes, the raw tokens by default), or the upstream reduce / head stage or
        finished artefact whose codes are probed (at ``dim`` when it serves every D);
        ``derived``: the stages holding its precomputed train and val codes (h-NNE)."""
        super().__init__(cache_root)
        self.train, self.val, self.p, self.reducer, self.derived = train, val, params, reducer, derived
        self.method = reducer.method if reducer is not None else method or registry.raw_method()
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

    def group_key(self) -> tuple:
        """Probes of every reducer, D and clusterer read the same train rows when they share the
        stores and the batch schedule."""
        p = self.p
        return ("probe", self.train.key, self.val.key, p.steps, p.batch_size, p.val_every, p.seed, self.device)

    def loaded_reducer(self) -> Reducer:
        return load_reducer(self.reducer.output, self.dim) if self.reducer is not None else IdentityReducer()

    def val_source(self, val: FeatureStore, device: torch.device, reducer: Reducer) -> CodeSource:
        """The codes this stage evaluates: ``reducer``'s of the val tokens (or its precomputed val
        codes), with flip TTA as asked, and the images where the CRF refines them."""
        derived = StoreArrays(open_complete_store(self.derived[1].output), (TOKENS,), device=device) if self.derived else None
        tokens = () if self.derived else (TOKENS, TOKENS_FLIP)
        images = (IMAGES,) if self.p.crf else ()
        return CodeSource(StoreArrays(val, (*tokens, LABELS, *images), device=device), reducer, derived, flip=self.p.flip_tta)

    def rebuilt(self, device: torch.device) -> Evaluation:
        """Its best validation, rebuilt from its artefact (nothing retrained): the codes and the best probes."""
        p = self.p
        source = self.val_source(open_complete_store(self.val.output), device, self.loaded_reducer())
        dim = source(np.array([0])).shape[-1]
        probes = ProbeWeights.read(self.output).best_probes(dim, p.n_classes, p.extra_clusters, p.clusterer)
        return Evaluation(source, probes.to(device), p.extra_as_errors)

    def execute(self, force: bool) -> EvalResult:
        return self.execute_group([self], force)[0]

    @classmethod
    def execute_group(cls, stages: list[ProbeStage], force: bool) -> list[EvalResult]:
        """Train the probes of every stage in one pass over the train batches (each member on
        its own reducer's codes, bit for bit what it trains alone), then evaluate each best step
        with the CRF where asked and write each artefact."""
        started = time.time()
        first = stages[0]
        device = resolve_device(first.device)
        train, val = open_complete_store(first.train.output), open_complete_store(first.val.output)
        for store in (train, val):
            if LABELS not in store:
                raise StoreError(f"{store.path}: no labels; probes need a labelled dataset")
        loading = time.perf_counter()
        members = [ProbeMember(stage, train, val, device) for stage in stages]
        load = time.perf_counter() - loading
        training = time.perf_counter()
        arrays = members[0].train_codes.arrays  # every member's train arrays hold the labels
        gather = lambda rows: (None, arrays.tensor(LABELS, rows, device).long())  # noqa: E731  each member gathers its codes
        label = f"probe {first.method}{first.dim or ''}" if len(stages) == 1 else "probes"
        schedule = Schedule(first.p.steps, first.p.batch_size, first.p.val_every, first.p.seed, sort_rows=True)
        trained = train_group(members, schedule, len(train), gather, device, label=label, show_progress=first.show_progress)
        train_seconds = time.perf_counter() - training
        return [member.finish(run, started, {"load": load, "train": train_seconds}) for member, run in zip(members, trained)]


class ProbeMember(Member):
    """The probes of one :class:`ProbeStage` as a member of a group: a head whose code is its
    reducer's, frozen."""

    def __init__(self, stage: ProbeStage, train, val, device: torch.device):
        super().__init__(stage.p.seed)
        p, self.stage, self.device = stage.p, stage, device
        reducer = stage.loaded_reducer()
        train_derived = StoreArrays(open_complete_store(stage.derived[0].output), (TOKENS,), device=device) if stage.derived else None
        tokens = () if stage.derived else (TOKENS,)  # precomputed codes stand in for the tokens
        self.train_codes = CodeSource(StoreArrays(train, (*tokens, LABELS), device=device), reducer, train_derived)
        self.val_codes = stage.val_source(val, device, reducer)
        self.dim = self.train_codes(np.array([0])).shape[-1]
        with self.random.active():
            self.probes = Probes(self.dim, p.n_classes, p.extra_clusters, p.clusterer).to(device)
            if not self.probes.learnt:
                self.probes.fit_clusters(sample_codes(self.train_codes, FIT_TOKENS, np.random.default_rng(p.seed), device), p.seed)
        self.select = "cluster/mIoU" if self.probes.learnt else "linear/mIoU"
        self.optimizers = self.probes.optimizers(p.linear_lr, p.cluster_lr)
        self.losses: tuple[torch.Tensor, torch.Tensor] | None = None

    def backward(self, batch: SharedBatch) -> None:
        codes = self.train_codes.tensor(batch.rows, self.device).permute(0, 3, 1, 2)
        loss_linear, loss_cluster = self.probes.losses(codes, batch.labels)
        (loss_linear + loss_cluster).backward()
        self.losses = (loss_linear.detach(), loss_cluster.detach())  # read at validation, not every step

    def evaluation(self) -> Evaluation:
        return Evaluation(self.val_codes, self.probes, self.stage.p.extra_as_errors)

    def validated(self, metrics: dict[str, Any]) -> dict[str, Any]:
        loss_linear, loss_cluster = torch.stack(self.losses).tolist()
        return {"loss_linear": loss_linear, "loss_cluster": loss_cluster, **metrics}

    def snapshot(self) -> dict:
        return self.probes.snapshot()

    def finish(self, trained: Trained, started: float, seconds: dict[str, float]) -> EvalResult:
        """The CRF on the best step where asked, then the artefact (manifest last)."""
        stage, p = self.stage, self.stage.p
        final_state = self.probes.snapshot()
        seconds, best_crf = dict(seconds), None
        if p.crf:
            self.probes.restore(trained.best_snapshot)
            refining = time.perf_counter()
            best_crf = {"step": trained.best["step"], **evaluate_with_crf(
                self.val_codes, self.probes, self.device, p.extra_as_errors, stage.crf_workers, stage.show_progress)}
            seconds["crf"] = time.perf_counter() - refining
        metrics = EvalResult.of_training(trained.history, trained.best, best_crf, seconds, p.n_classes)
        train = self.train_codes.arrays.store
        files = {METRICS: metrics, PROBES: ProbeWeights(trained.best_snapshot, final_state).to_bytes()}
        stage.publish(started, files, dataset=train.attrs.dataset, method=stage.method,
                      code_dim=self.dim, seed=p.seed)
        return metrics
