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
from torch import nn

from .. import cache_schema
from ..cache_schema import StoreError
from ..models import resolve_device
from ..models.stego_head import StegoHead, find_setting, read_stego_checkpoint
from ..ops.kmeans import ClusterLookup
from ..atomic import atomic_write_bytes, atomic_write_npz
from ..pipeline import FileHashMemo, Stage, artefact_state, begin_artefact, package_versions, write_manifest
from ..progress import progress_bar
from ..reducers import StegoHeadReducer
from .probe import METRICS, CodeSource, CRFPool, ProbeParams, _flat, evaluate
from .reduce import open_complete_store


def modules_from_checkpoint(state: dict[str, torch.Tensor]) -> tuple[StegoHead, nn.Conv2d, ClusterLookup]:
    """STEGO's head, linear probe and cluster probe with the checkpoint's weights."""
    w1 = state["net.cluster1.0.weight"]
    dim, in_dim = w1.shape[:2]
    head = StegoHead(in_dim, dim, nonlinear="net.cluster2.0.weight" in state)
    head.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith(("net.cluster1.", "net.cluster2."))})
    linear = nn.Conv2d(dim, state["linear_probe.weight"].shape[0], 1)
    linear.load_state_dict({"weight": state["linear_probe.weight"], "bias": state["linear_probe.bias"]})
    clusters = state["cluster_probe.clusters"]
    cluster = ClusterLookup(dim, clusters.shape[0])
    cluster.load_state_dict({"clusters": clusters})
    return head.eval(), linear.eval(), cluster.eval()


class ImportStegoStage(Stage):
    name = "import-stego"
    version = 1

    def __init__(self, cache_root: Path, checkpoint: Path, val_store: Path, crf: bool = True, flip: bool = True,
                 device: str = "auto", crf_workers: int = 2, show_progress: bool = True):
        super().__init__(cache_root)
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"{self.checkpoint}: checkpoint not found")
        self.val = open_complete_store(val_store)
        self.crf, self.flip, self.device, self.crf_workers, self.show_progress = crf, flip, device, crf_workers, show_progress

    def params(self) -> dict[str, Any]:
        memo = FileHashMemo(cache_schema.memo_path(self.cache_root, "file-hashes"))
        digest = memo.hash(self.checkpoint, full=True)
        memo.save()
        return {"checkpoint_sha256": digest, "crf": self.crf, "flip": self.flip}

    def inputs(self) -> list[str]:
        return [self.val.key]

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, self.checkpoint.stem, self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> dict:
        started = time.time()
        ckpt = read_stego_checkpoint(self.checkpoint)
        head, linear, cluster = modules_from_checkpoint(ckpt["state_dict"])
        channels = self.val.layout.channels
        if head.cluster1[0].in_channels != channels:
            raise StoreError(
                f"{self.checkpoint}: the head expects {head.cluster1[0].in_channels}-channel tokens but {self.val.path} "
                f"holds {channels}; extract the val split with the checkpoint's backbone"
            )
        n_classes = linear.out_channels
        p = ProbeParams(n_classes=n_classes, steps=0, batch_size=0, extra_clusters=cluster.clusters.shape[0] - n_classes)
        reducer = StegoHeadReducer.from_head(head)
        device = resolve_device(self.device)
        linear, cluster = linear.to(device), cluster.to(device)
        source = CodeSource(self.val, reducer, flip=self.flip)
        metrics: dict[str, Any] = {"no_crf": _flat(evaluate(source, self.val, linear, cluster, p, device))}
        if self.crf:
            pool = CRFPool(self.crf_workers)
            try:
                with progress_bar("img", self.show_progress) as bar:
                    task = bar.add_task("dense CRF", total=len(self.val))
                    metrics["crf"] = _flat(evaluate(source, self.val, linear, cluster, p, device, crf=pool,
                                                    progress=lambda n: bar.advance(task, n)))
            finally:
                pool.close()
        hparams = ckpt["hyper_parameters"]
        metrics["checkpoint"] = {k: find_setting(hparams, k) for k in ("model_type", "dino_patch_size", "dim", "dataset_name", "n_classes")}
        begin_artefact(self.output)
        atomic_write_bytes(self.output / METRICS, json.dumps(metrics, indent=1, default=str).encode())
        atomic_write_npz(self.output / cache_schema.PAYLOAD, (reducer.state_dict()))
        write_manifest(self.output, {
            "key": self.key, "stage": self.name, "stage_version": self.version, "method": "stego",
            "reducer": reducer.params(), "params": self.params(), "inputs": self.inputs(),
            "checkpoint": str(self.checkpoint), "started": started, "finished": time.time(), "versions": package_versions(),
        })
        return metrics
