"""Train a registered head from cached tokens only — no backbone anywhere.

The training itself is the head's :class:`~stegoscope.heads.base.HeadTrainer`; this stage keys
it (stage ``train-<method>``, the head's version, the run and the head's parameters, the train
and val stores and the kNN pairs) and writes the artefact: the best-by-val head as a reducer
(``payload.npz``, which ``probe --reducer`` accepts), the final head (``final.npz``), both
probes (``probes.pt``), every validation (``metrics.json``), the training log (``log.jsonl``),
and ``manifest.json`` last.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import cache_schema
from .. import methods as registry
from ..cache_schema import FINAL, IMAGES, LABELS, METRICS, NNS, PROBES, TOKENS, TOKENS_FLIP, open_complete_store
from ..heads.base import HeadJob, HeadResult, HeadRun, fit_heads
from ..models import resolve_device
from ..pipeline import Stage, artefact_state, begin_artefact, load_npz
from ..probing import CodeSource, Evaluation, ProbeWeights, StoreArrays, TrainingLog, load_reducer
from ..records import EvalResult


class TrainHeadStage(Stage):
    version = 1

    def __init__(self, cache_root: Path, method: str, params: Any, run: HeadRun, train: Stage, val: Stage, knn: Stage | None,
                 device: str = "auto", resident_bytes: float = 4e9, crf_workers: int = 2, show_progress: bool = True,
                 inputs: dict[str, Stage] | None = None):
        super().__init__(cache_root)
        self.inputs_ = dict(inputs or {})
        self.method, self.p, self.run = method, params, run
        self.trainer_cls = registry.get(method).cls
        self.name, self.version = f"train-{method}", self.trainer_cls.version
        if self.trainer_cls.uses_knn and knn is None:
            raise ValueError(f"{method} trains with kNN partners: give it the kNN stage")
        self.train, self.val, self.knn = train, val, knn if self.trainer_cls.uses_knn else None
        self.device, self.resident_bytes, self.crf_workers, self.show_progress = device, resident_bytes, crf_workers, show_progress

    def params(self) -> dict[str, Any]:
        run = asdict(self.run)
        if not run["extra_as_errors"]:  # added later: left out at its default, so earlier keys stay valid
            del run["extra_as_errors"]
        return run | asdict(self.p)

    def upstream(self) -> dict[str, Stage]:
        up = {"train": self.train, "val": self.val}
        if self.knn is not None:
            up["knn"] = self.knn
        return up | self.inputs_

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, f"{self.method}{self.run.dim}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def group_key(self) -> tuple:
        """Heads of every D, λ, b (and method) read the same batches when they share the stores,
        the kNN pairs and the batch schedule."""
        p, run = self.p, self.run
        return ("train", self.train.key, self.val.key, self.knn.key if self.knn is not None else None, p.total_steps, p.batch_size,
                p.knn_neighbors, run.val_every, run.seed, self.device, self.resident_bytes)

    def rebuilt(self, device: torch.device) -> Evaluation:
        """Its best validation, rebuilt from its artefact (nothing retrained): the best head's
        codes of the val tokens (flip TTA where val has flips), and the probes it was scored with."""
        run = self.run
        arrays = StoreArrays(open_complete_store(self.val.output), (TOKENS, TOKENS_FLIP, LABELS, *((IMAGES,) if run.crf else ())),
                             device=device)
        probes = ProbeWeights.read(self.output).best_probes(run.dim, run.n_classes, run.extra_clusters,
                                                            own_clusters=self.trainer_cls.own_clusters,
                                                            crf_alpha=self.trainer_cls.crf_alpha)
        return Evaluation(CodeSource(arrays, load_reducer(self.output), flip=True), probes.to(device), run.extra_as_errors)

    def execute(self, force: bool) -> EvalResult:
        return self.execute_group([self], force)[0]

    @classmethod
    def execute_group(cls, stages: list[TrainHeadStage], force: bool) -> list[EvalResult]:
        """Train the heads of every stage in one pass over the train batches (each bit for bit
        what it trains alone), then write each artefact."""
        started = time.time()
        first = stages[0]
        train, val = open_complete_store(first.train.output), open_complete_store(first.val.output)
        nns = None
        if first.knn is not None:
            nns = load_npz(first.knn.output)[NNS]
            if len(nns) != len(train):
                raise cache_schema.StoreError(f"{first.knn.output}: kNN rows ({len(nns)}) do not match the train store ({len(train)})")
        jobs = []
        with ExitStack() as logs:
            for stage in stages:
                trainer = stage.trainer_cls(stage.p, stage.run, train.layout.channels)
                extras = trainer.load_inputs({name: up.output for name, up in stage.inputs_.items()})
                begin_artefact(stage.output)
                log = TrainingLog(stage.output)
                logs.callback(log.close)
                jobs.append(HeadJob(trainer, log, extras, f"{stage.name} D={stage.run.dim}"))
            results = fit_heads(jobs, train, val, nns, resolve_device(first.device), first.resident_bytes, first.crf_workers,
                                first.show_progress)
        return [stage.save(result, train, started) for stage, result in zip(stages, results)]

    def save(self, result: HeadResult, train, started: float) -> EvalResult:
        """The artefact of a trained head (manifest last); returns its metrics."""
        metrics = EvalResult.of_training(result.history, result.best, result.best_crf, result.seconds)
        files = {FINAL: result.final_head.state_dict(), cache_schema.PAYLOAD: result.best_head.state_dict(),
                 PROBES: ProbeWeights(result.best_probes, result.final_probes).to_bytes(), METRICS: metrics}
        self.publish(
            started, files, method=self.method, reducer_class=result.best_head.method, reducer=result.best_head.params(),
            dataset=train.attrs.dataset, code_dim=self.run.dim, seed=self.run.seed, resident=result.resident)
        return metrics
