"""Released STEGO checkpoints: head + probes from an original ``.ckpt`` (no Lightning needed),
evaluated on a val token store — the "STEGO (released)" rows of Table 2.

The imported head is stored as a ``stego`` reducer artefact, so ``probe --reducer <artefact>``
can train fresh probes on its codes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import cache_schema
from ..cache_schema import METRICS, StoreError, open_complete_store
from ..models import resolve_device
from ..models.stego_head import StegoHead, find_setting, read_stego_checkpoint
from ..pipeline import FileHashMemo, Stage, artefact_state
from ..probing import CodeSource, Probes, StoreArrays, evaluate, evaluate_with_crf
from ..records import EvalResult, StepScores
from ..reducers import StegoHeadReducer


def modules_from_checkpoint(state: dict[str, torch.Tensor]) -> tuple[StegoHead, Probes]:
    """STEGO's head and its linear and cluster probes with the checkpoint's weights."""
    w1 = state["net.cluster1.0.weight"]
    dim, in_dim = w1.shape[:2]
    head = StegoHead(in_dim, dim, nonlinear="net.cluster2.0.weight" in state)
    head.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith(("net.cluster1.", "net.cluster2."))})
    n_classes, n_clusters = state["linear_probe.weight"].shape[0], state["cluster_probe.clusters"].shape[0]
    probes = Probes(dim, n_classes, n_clusters - n_classes)
    probes.restore({"linear": {"weight": state["linear_probe.weight"], "bias": state["linear_probe.bias"]},
                    "cluster": {"clusters": state["cluster_probe.clusters"]}})
    return head.eval(), probes.eval()


class ImportStegoStage(Stage):
    name = "import-stego"
    version = 1

    def __init__(self, cache_root: Path, checkpoint: Path, val: Stage, crf: bool = True, flip: bool = True,
                 device: str = "auto", crf_workers: int = 2, show_progress: bool = True):
        super().__init__(cache_root)
        self.checkpoint, self.val, self.method = Path(checkpoint), val, StegoHeadReducer.method
        self.crf, self.flip, self.device, self.crf_workers, self.show_progress = crf, flip, device, crf_workers, show_progress

    def params(self) -> dict[str, Any]:
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"{self.checkpoint}: checkpoint not found")
        memo = FileHashMemo(cache_schema.memo_path(self.cache_root, "file-hashes"))
        digest = memo.hash(self.checkpoint, full=True)
        memo.save()
        return {"checkpoint_sha256": digest, "crf": self.crf, "flip": self.flip}

    def upstream(self) -> dict[str, Stage]:
        return {"val": self.val}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, self.checkpoint.stem, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> EvalResult:
        started = time.time()
        val = open_complete_store(self.val.output)
        ckpt = read_stego_checkpoint(self.checkpoint)
        head, probes = modules_from_checkpoint(ckpt["state_dict"])
        channels = val.layout.channels
        if head.cluster1[0].in_channels != channels:
            raise StoreError(
                f"{self.checkpoint}: the head expects {head.cluster1[0].in_channels}-channel tokens but {val.path} "
                f"holds {channels}; extract the val split with the checkpoint's backbone"
            )
        reducer = StegoHeadReducer.from_head(head)
        device = resolve_device(self.device)
        probes = probes.to(device)
        source = CodeSource(StoreArrays(val, device=device), reducer, flip=self.flip)
        evaluating = time.perf_counter()
        best = StepScores.from_dict(evaluate(source, probes, device))
        seconds = {"evaluate": time.perf_counter() - evaluating}
        best_crf = None
        if self.crf:
            refining = time.perf_counter()
            best_crf = StepScores.from_dict(evaluate_with_crf(source, probes, device, workers=self.crf_workers,
                                                              show_progress=self.show_progress))
            seconds["crf"] = time.perf_counter() - refining
        hparams = ckpt["hyper_parameters"]
        settings = {k: find_setting(hparams, k) for k in ("model_type", "dino_patch_size", "dim", "dataset_name", "n_classes")}
        metrics = EvalResult(best=best, best_crf=best_crf, seconds=seconds, checkpoint=json.loads(json.dumps(settings, default=str)))
        self.publish(started, {METRICS: metrics, cache_schema.PAYLOAD: reducer.state_dict()},
                     method=self.method, reducer_class=reducer.method, reducer=reducer.params(),
                     checkpoint=str(self.checkpoint), dataset=val.attrs.dataset)
        return metrics
