"""The head-training base: everything a head trained from cached tokens shares with any other.

A head is a small subclass of :class:`HeadTrainer` that supplies ``make_head()`` and ``loss()``
(STEGO: ``stego.py``). The base gives it, and keeps once:

* cached token batches, resident on the device when the train store fits, else streamed;
* kNN partners, drawn uniformly from ranks 1..``knn_neighbors`` of each image's neighbours;
* STEGO's linear and cluster probes trained alongside on the detached code, one backward of
  the summed losses;
* validation every ``val_every`` steps keeping the head with the best val cluster mIoU (the
  paper's protocol) besides the final one, then the dense CRF evaluation of the best;
* ``log.jsonl`` / TensorBoard logging of whatever the loss reports;
* export of the trained head as a reducer, so ``probe`` can train fresh probes on its codes;
* hooks for what the successors of STEGO add: further per-row inputs (``row_arrays`` of the
  train store, ``extras`` from other artefacts), :meth:`~HeadTrainer.begin` before the first
  step, :meth:`~HeadTrainer.after_backward` and :meth:`~HeadTrainer.after_step` around the
  optimiser step (gradient clipping, EMA teachers), and :meth:`~HeadTrainer.clusters`, a head's
  own cluster assignment that replaces the cluster probe in every evaluation.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..cache_schema import IMAGES, LABELS, TOKENS, TOKENS_FLIP, FeatureStore
from ..ops.kmeans import FixedCentroids
from ..ops.transfer import to_device
from ..probing import CodeSource, Evaluation, Probes, StoreArrays, TokenBatches, TrainingLog, evaluate_with_crf
from ..reducers import Reducer
from ..training import Member, Schedule, SharedBatch, Trained, train_group

if TYPE_CHECKING:
    from ..pipeline import Stage


@dataclass(frozen=True)
class HeadParams:
    """What every head's preset section holds besides its own parameters (paper Table 1)."""

    steps: int = 5000
    batch_size: int = 16
    lr: float = 5e-4  # the head's Adam learning rate
    knn_neighbors: int = 7  # kNN partner drawn from ranks 1..knn_neighbors

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.knn_neighbors) < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size, knn_neighbors and lr must be positive: {self}")

    @property
    def total_steps(self) -> int:
        """The optimiser steps of its batch schedule (a head trained in phases counts them all)."""
        return self.steps


@dataclass(frozen=True)
class HeadRun:
    """One training run of any head: the dataset's classes, the code dimension, the probes and the
    evaluation, and the seed."""

    n_classes: int
    dim: int
    probe_lr: float = 5e-3
    extra_clusters: int = 0
    val_every: int = 100
    seed: int = 0
    crf: bool = False  # evaluate the best head and its probes with the dense CRF too (Table 2)
    extra_as_errors: bool = False  # count pixels of unmatched clusters as errors (not parity)

    def __post_init__(self):
        if min(self.n_classes, self.dim, self.val_every) < 1 or self.extra_clusters < 0:
            raise ValueError(f"n_classes, dim and val_every must be positive and extra_clusters ≥ 0: {self}")


@dataclass
class TokenBatch:
    """One step's inputs: (B, C, h, w) tokens and (B, H, W) labels of the batch rows, the tokens
    of each row's kNN partner (None for heads that use no partners) and the head's further inputs."""

    rows: np.ndarray
    feats: torch.Tensor
    labels: torch.Tensor
    partner_feats: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the rows of ``row_arrays`` and of ``extras``
    step: int = 1  # the step this batch is for, from 1


@dataclass
class HeadResult:
    history: list[dict]
    best: dict
    best_head: Reducer
    best_probes: dict
    final_head: Reducer
    final_probes: dict
    best_crf: dict | None
    resident: bool
    seconds: dict[str, float]  # where the time went: load, train (with validations), crf


class HeadTrainer(ABC):
    """Trains a head from cached tokens only, with STEGO's probes alongside.

    Subclasses set ``params_class`` (their preset section, a :class:`HeadParams` subclass) and
    implement :meth:`make_head` and :meth:`loss`; ``uses_knn = False`` for heads without kNN
    partners, ``version`` is part of their stage key; the other methods are hooks with defaults.
    """

    params_class: ClassVar[type[HeadParams]] = HeadParams
    uses_knn: ClassVar[bool] = True
    version: ClassVar[int] = 1
    row_arrays: ClassVar[tuple[str, ...]] = ()  # further train-store arrays each batch carries
    fixed_dim: ClassVar[bool] = False  # its code dimension follows from its inputs (:meth:`code_dim`), not the sweep
    own_clusters: ClassVar[str | None] = None  # the metric of the head's own centroids (:meth:`clusters`); None: the probe's
    crf_alpha: ClassVar[float | None] = None  # the CRF's unary is softmax(alpha · its cluster scores); None: the evaluation's default
    select: ClassVar[str] = "cluster/mIoU"  # the validation metric whose best step is kept ("step": the last, no selection)

    def __init__(self, params: HeadParams, run: HeadRun, channels: int):
        self.params, self.run, self.channels = params, run, channels

    @abstractmethod
    def make_head(self) -> nn.Module:
        """The trainable head: (B, C, h, w) tokens → (B, dim, h, w) code."""

    @abstractmethod
    def loss(self, head: nn.Module, batch: TokenBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(code of ``batch.feats``, loss, what to log): tensors named ``loss/…`` or any other
        ``group/name``; scalars are logged as they are, larger tensors by mean and histogram."""

    def optimizer(self, head: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(head.parameters(), lr=self.params.lr)

    def export(self, head: nn.Module) -> Reducer:
        """The head in eval mode as a reducer (tokens → code)."""
        return ModuleReducer.of(self, head)

    @classmethod
    def input_stages(cls, params: HeadParams, study: Any, train: Stage, seed: int) -> dict[str, Stage]:
        """The further stages whose artefacts it reads, by the names :meth:`load_inputs` gets them
        under; made by the study's builders (``study.head(method, dim, seed)``,
        ``study.primaps_masks(train, …)``), so that they are shared and cached like every stage."""
        return {}

    @classmethod
    def code_dim(cls, params: HeadParams, channels: int, head_dim: Callable[[str], int]) -> int | None:
        """A ``fixed_dim`` head's code dimension: from the tokens' ``channels`` or another head's D."""
        return None

    def load_inputs(self, inputs: dict[str, Path]) -> dict[str, np.ndarray]:
        """Read the :meth:`input_stages` artefacts (folder by name); returns arrays (or array-likes that
        index by rows) with a row per train image."""
        return {}

    def begin(self, head: nn.Module, data: TokenBatches, generator: torch.Generator) -> None:
        """Before the first step, with the train batches at hand (reference pools, initialisations)."""

    def after_backward(self, head: nn.Module) -> None:
        """Between the backward pass and the optimiser step (gradient clipping)."""

    def after_step(self, head: nn.Module, step: int) -> None:
        """After the optimiser step ``step`` (EMA teachers)."""

    def clusters(self, head: nn.Module) -> FixedCentroids | None:
        """The head's own cluster assignment, which evaluation uses instead of the cluster probe
        trained alongside (None: the probe's)."""
        return None

    @classmethod
    def uses_labels(cls, params: dict[str, Any]) -> bool:
        """Whether a head trained with these (recorded) parameters saw ground-truth labels: its
        results are then labelled so (figures, tables, report)."""
        return False

    def labels_reach_head(self, step: int) -> bool:
        """Whether the linear probe's loss at ``step`` trains the head too (CAUSE's released step 3,
        a leak of the ground truth into the evaluated head, kept only as an option); else the
        probes train on the detached code."""
        return False

    def fit(self, train: FeatureStore, val: FeatureStore, nns: np.ndarray | None, device: torch.device, log: TrainingLog,
            resident_bytes: float = 4e9, crf_workers: int = 2, show_progress: bool = True, label: str = "train",
            extras: dict[str, np.ndarray] | None = None) -> HeadResult:
        """Train on ``train`` (kNN rows ``nns``; ``extras``: further arrays with a row per train
        image, from other artefacts), validate on ``val``; seeded by ``run.seed``. A group of one:
        :func:`fit_heads`."""
        return fit_heads([HeadJob(self, log, extras or {}, label)], train, val, nns, device, resident_bytes, crf_workers,
                         show_progress)[0]

    def schedule(self, nns: np.ndarray | None) -> Schedule:
        """The batch schedule it trains on: heads with equal schedules train in one group."""
        p, run = self.params, self.run
        neighbours = min(p.knn_neighbors, nns.shape[1] - 1) if nns is not None else 0
        return Schedule(p.total_steps, p.batch_size, run.val_every, run.seed, neighbours)

    def exported(self, head: nn.Module, train_after: bool = True) -> Reducer:
        """The head in eval mode as a reducer, from a CPU copy: the live head stays where it trains."""
        head.eval()
        reducer = self.export(copy.deepcopy(head).cpu())
        if train_after:
            head.train()
        return reducer


@dataclass
class HeadJob:
    """One head of a group: its trainer, its log, its further per-row arrays and its label."""

    trainer: HeadTrainer
    log: TrainingLog
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    label: str = "train"


class HeadMember(Member):
    """A head and the probes trained alongside it, as one member of a group: STEGO's step (the
    head's loss plus both probes on the detached code, one backward of the sum), validation of
    the head exported as a reducer, and the best step's head and probes."""

    def __init__(self, job: HeadJob, data: TokenBatches, val_arrays: StoreArrays, device: torch.device):
        trainer, run = job.trainer, job.trainer.run
        super().__init__(run.seed)
        self.trainer, self.log, self.extras = trainer, job.log, job.extras
        self.select = trainer.select
        self.data, self.device = data, device
        self.val_arrays = val_arrays
        for name, array in self.extras.items():
            if len(array) != len(data):
                raise ValueError(f"{name}: {len(array)} rows for a train store of {len(data)} images")
        self.generator = torch.Generator().manual_seed(run.seed)
        with self.random.active():
            self.head = trainer.make_head().to(device)
            trainer.begin(self.head, data, self.generator)
            self.probes = Probes(run.dim, run.n_classes, run.extra_clusters).to(device)
        self.optimizers = [trainer.optimizer(self.head), *self.probes.optimizers(run.probe_lr, run.probe_lr)]
        self.current: dict[str, Any] = {}
        self.pending: tuple[int, dict] | None = None

    def backward(self, shared: SharedBatch) -> None:
        trainer, rows = self.trainer, shared.rows
        further = {name: self.data.extra(name, rows) for name in trainer.row_arrays}
        further |= {name: to_device(torch.from_numpy(np.asarray(array[rows])), self.device) for name, array in self.extras.items()}
        partner_feats = shared.partner_feats if trainer.uses_knn else None
        batch = TokenBatch(rows, shared.feats, shared.labels, partner_feats, further, shared.step)
        code, loss, logged = trainer.loss(self.head, batch, self.generator)
        leaked = code if trainer.labels_reach_head(shared.step) else None
        loss_linear, loss_cluster = self.probes.losses(code.detach(), shared.labels, linear_input=leaked)
        total = loss + loss_linear + loss_cluster
        total.backward()
        trainer.after_backward(self.head)
        if self.log.due(shared.step):  # written by flush(), outside the step
            self.pending = (shared.step, {**logged, "loss/linear": loss_linear, "loss/cluster": loss_cluster, "loss/total": total})

    def after_update(self, step: int) -> None:
        self.trainer.after_step(self.head, step)

    def flush(self) -> None:
        if self.pending is not None:
            self.log.write(*self.pending)
            self.pending = None

    def val_codes(self, reducer: Reducer) -> CodeSource:
        return CodeSource(self.val_arrays, reducer, flip=True)  # flip TTA when val has flips

    def evaluated(self) -> Probes:
        """The probes, with the head's own cluster assignment when it has one."""
        own = self.trainer.clusters(self.head)
        return self.probes if own is None else self.probes.with_cluster(own)

    def evaluation(self) -> Evaluation:
        self.current["head"], self.current["probes"] = self.trainer.exported(self.head), self.evaluated()
        return Evaluation(self.val_codes(self.current["head"]), self.current["probes"], self.trainer.run.extra_as_errors)

    def snapshot(self) -> tuple:
        return self.current["head"], self.current["probes"].snapshot(), self.current["probes"].cluster

    def finish(self, trained: Trained, crf_workers: int, show_progress: bool, seconds: dict[str, float]) -> HeadResult:
        """The run's result: the best and the final head, and the best evaluated with the CRF
        when the run asks for it; ``seconds`` (load, train) gains the CRF's."""
        run, probes = self.trainer.run, self.probes
        best_head, best_probes, best_cluster = trained.best_snapshot
        final_head = self.trainer.exported(self.head, train_after=False)
        final_probes = self.evaluated().snapshot()
        best_crf, seconds = None, dict(seconds)
        if run.crf:
            probes.linear.load_state_dict(best_probes["linear"])
            best_probes_on = probes.with_cluster(best_cluster) if best_cluster is not probes.cluster else probes.restore(best_probes)
            refining = time.perf_counter()
            best_crf = {"step": trained.best["step"], **evaluate_with_crf(self.val_codes(best_head), best_probes_on, self.device,
                                                                          run.extra_as_errors, crf_workers, show_progress)}
            seconds["crf"] = time.perf_counter() - refining
        return HeadResult(trained.history, trained.best, best_head, best_probes, final_head, final_probes, best_crf,
                          self.data.resident, seconds)


def fit_heads(jobs: list[HeadJob], train: FeatureStore, val: FeatureStore, nns: np.ndarray | None, device: torch.device,
              resident_bytes: float = 4e9, crf_workers: int = 2, show_progress: bool = True) -> list[HeadResult]:
    """Train the heads of ``jobs`` as one group: one batch schedule (they must agree on steps,
    batch size, kNN ranks, validation and seed), each batch gathered once, every head stepping
    on it with its own random state; each head's result is what it would be alone."""
    schedules = {job.trainer.schedule(nns) for job in jobs}
    if len(schedules) != 1:
        raise ValueError(f"heads of one group must share a batch schedule, not {sorted(map(str, schedules))}")
    schedule = schedules.pop()
    loading = time.perf_counter()
    row_arrays = tuple(dict.fromkeys(name for job in jobs for name in job.trainer.row_arrays))
    data = TokenBatches(train, device, resident_bytes, row_arrays)
    crf = any(job.trainer.run.crf for job in jobs)
    val_arrays = StoreArrays(val, (TOKENS, TOKENS_FLIP, LABELS, *((IMAGES,) if crf else ())), device=device)
    members = [HeadMember(job, data, val_arrays, device) for job in jobs]
    load = time.perf_counter() - loading
    training = time.perf_counter()
    label = jobs[0].label if len(jobs) == 1 else f"{len(jobs)} heads"
    trained = train_group(members, schedule, len(data), data, device, nns, label, show_progress)
    train_seconds = time.perf_counter() - training
    seconds = {"load": load, "train": train_seconds}
    return [member.finish(run, crf_workers, show_progress, seconds) for member, run in zip(members, trained)]


class ModuleReducer(Reducer):
    """Any trained head module as a reducer: tokens (…, C) → codes (…, D), in eval mode on the CPU.

    Stored as data: the module's state dict and what rebuilds it — the registered method, its
    parameters, the run and the token channels; :meth:`from_state` makes the head through the
    registry and loads the arrays (nothing is unpickled).
    """

    method = "module"
    needs_fit = False

    def __init__(self, n_components: int | None = None, head: dict[str, Any] | None = None):
        self.n_components, self.head = n_components, head

    @classmethod
    def of(cls, trainer: HeadTrainer, module: nn.Module) -> ModuleReducer:
        """The head ``module`` that ``trainer`` made (a CPU copy in eval mode)."""
        from .. import methods

        names = [m.name for m in methods.METHODS.values() if m.cls is type(trainer)]
        if not names:
            raise ValueError(f"{type(trainer).__name__} is not registered; register it in methods.py to export its head")
        head = {"method": names[0], "params": asdict(trainer.params), "run": asdict(trainer.run), "channels": trainer.channels}
        reducer = cls(trainer.run.dim, head)
        reducer.module_ = copy.deepcopy(module).cpu().eval()
        return reducer

    def fit(self, tokens) -> ModuleReducer:
        raise NotImplementedError("a head is trained by `stegoscope train --method <head>`")

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        return self.transform_tensor(torch.from_numpy(np.asarray(tokens, dtype=np.float32))).numpy()

    @torch.no_grad()
    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.float()
        lead = x.shape[:-1]
        maps = x.reshape(-1, *x.shape[-3:]) if x.dim() >= 3 else x.reshape(-1, 1, 1, x.shape[-1])
        codes = self._module_on(x.device)(maps.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return codes.reshape(*lead, codes.shape[-1])

    def _module_on(self, device: torch.device) -> nn.Module:
        """The module on ``device`` (a copy, made once; the stored module stays on the CPU)."""
        if device.type == "cpu":
            return self.module_
        copies = self.__dict__.setdefault("_on_device", {})
        if device not in copies:
            copies[device] = copy.deepcopy(self.module_).to(device)
        return copies[device]

    def params(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "head": self.head}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"module.{key}": value.detach().numpy() for key, value in self.module_.state_dict().items()}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, np.ndarray]) -> ModuleReducer:
        from .. import methods

        if "module_" in state or not params.get("head"):
            raise ValueError("a head exported by an earlier version (its module pickled, which is never read); "
                             "retrain it: its stage's version changed, so `stegoscope study` or `train` does")
        head = params["head"]
        spec = methods.get(head["method"])
        trainer = spec.cls(spec.params(**head["params"]), HeadRun(**head["run"]), head["channels"])
        with torch.random.fork_rng(devices=[]):  # its random initialisation, overwritten next, draws nothing of the caller's
            module = trainer.make_head()
        module.load_state_dict({key.removeprefix("module."): torch.from_numpy(np.array(value)) for key, value in state.items()})
        reducer = cls(params["n_components"], head)
        reducer.module_ = module.eval()
        return reducer
