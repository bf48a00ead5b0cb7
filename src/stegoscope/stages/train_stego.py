"""Train the STEGO head from cached tokens only — no backbone anywhere (reference §4.2, §5, §6).

One step, as STEGO's: tokens of a batch and of each image's kNN partner (drawn uniformly from
ranks 1..``knn_neighbors``); channel dropout gives the loss's feature copy and, independently,
each head branch's input; the contrastive correlation loss; the linear and cluster probes on the
detached code at patch resolution; one backward of the sum; Adam 5e-4 on the head, 5e-3 on each
probe. Validation every ``val_every`` steps keeps the head with the best val cluster mIoU (the
paper's protocol) besides the final one. The stored best head is a ``stego`` reducer artefact.

Logged to ``log.jsonl`` (and TensorBoard when installed): loss terms and the mean of each code
correspondence tensor every 10 steps, their histograms every 100 — the diagnostic for tuning b.
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
import torch.nn.functional as F
from torch import nn

from .. import cache_schema
from ..cache_schema import LABELS, TOKENS
from ..models import resolve_device
from ..models.stego_head import StegoHead
from ..ops.correlation_loss import CorrelationLoss
from ..ops.kmeans import ClusterLookup
from ..atomic import atomic_write_bytes, atomic_write_npz
from ..pipeline import Stage, artefact_state, begin_artefact, package_versions, write_manifest
from ..progress import progress_bar
from ..reducers import StegoHeadReducer
from .knn import KnnStage, load_knn
from .probe import METRICS, PROBES, CodeSource, CRFPool, ProbeParams, _copy, _flat, evaluate
from .reduce import open_complete_store

LOG = "log.jsonl"
FINAL = "final.npz"


@dataclass(frozen=True)
class TrainStegoParams:
    n_classes: int
    dim: int
    steps: int
    batch_size: int
    lambda_self: float
    lambda_knn: float
    lambda_rand: float
    b_self: float
    b_knn: float
    b_rand: float
    pointwise: bool = True
    zero_clamp: bool = True
    readd_global_mean: bool = True  # the original code's centring [QUIRK]; False: the paper's F^SC
    lr: float = 5e-4
    probe_lr: float = 5e-3
    dropout: float = 0.1
    feature_samples: int = 11
    neg_samples: int = 5
    knn_neighbors: int = 7
    extra_clusters: int = 0
    val_every: int = 100
    seed: int = 0
    crf: bool = False  # evaluate the best head and its probes with the dense CRF too (Table 2)


class _Tokens:
    """Rows of a store's tokens / labels: from device memory when the store fits, else from disk."""

    def __init__(self, store, device: torch.device, limit_bytes: float):
        self.store, self.device = store, device
        self.resident = store[TOKENS].nbytes + store[LABELS].nbytes <= limit_bytes
        if self.resident:
            self.tokens = torch.from_numpy(store[TOKENS][:]).to(device)
            self.labels = torch.from_numpy(store[LABELS][:]).to(device)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident:
            index = torch.as_tensor(rows, device=self.device)
            tokens, labels = self.tokens[index], self.labels[index]
        else:
            order = np.argsort(rows)  # zarr reads sorted rows; restore the batch order after
            undo = np.argsort(order)
            tokens = torch.from_numpy(self.store[TOKENS].get_orthogonal_selection((rows[order],))[undo]).to(self.device)
            labels = torch.from_numpy(self.store[LABELS].get_orthogonal_selection((rows[order],))[undo]).to(self.device)
        return tokens.permute(0, 3, 1, 2).float(), labels.long()


class TrainStegoStage(Stage):
    name = "train-stego"
    version = 1

    def __init__(self, cache_root: Path, train_store: Path, val_store: Path, knn: KnnStage, params: TrainStegoParams,
                 device: str = "auto", resident_bytes: float = 4e9, show_progress: bool = True):
        super().__init__(cache_root)
        self.train, self.val = open_complete_store(train_store), open_complete_store(val_store)
        self.knn, self.p, self.device = knn, params, device
        self.resident_bytes, self.show_progress = resident_bytes, show_progress

    def params(self) -> dict[str, Any]:
        return asdict(self.p)

    def inputs(self) -> list[str]:
        return [self.train.key, self.val.key, self.knn.key]

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, "train_stego", f"stego{self.p.dim}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> dict:
        started, p = time.time(), self.p
        device = resolve_device(self.device)
        nns = load_knn(self.knn.output)
        if len(nns) != len(self.train):
            raise cache_schema.StoreError(f"{self.knn.output}: kNN rows ({len(nns)}) do not match the train store ({len(self.train)})")
        torch.manual_seed(p.seed)
        gen = torch.Generator().manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        data = _Tokens(self.train, device, self.resident_bytes)
        head = StegoHead(self.train.layout.channels, p.dim, p.dropout).to(device)
        linear = nn.Conv2d(p.dim, p.n_classes, 1).to(device)
        cluster = ClusterLookup(p.dim, p.n_classes + p.extra_clusters).to(device)
        optimizers = [torch.optim.Adam(head.parameters(), lr=p.lr), torch.optim.Adam(linear.parameters(), lr=p.probe_lr),
                      torch.optim.Adam(cluster.parameters(), lr=p.probe_lr)]
        loss_fn = CorrelationLoss(p.lambda_self, p.lambda_knn, p.lambda_rand, p.b_self, p.b_knn, p.b_rand, p.pointwise,
                                  p.zero_clamp, p.readd_global_mean, p.feature_samples, p.neg_samples)
        probe_params = ProbeParams(p.n_classes, p.steps, p.batch_size, extra_clusters=p.extra_clusters)
        begin_artefact(self.output)
        writer = _tensorboard(self.output)
        log = open(self.output / LOG, "w")
        history, best, best_head = [], None, None
        order, cursor = rng.permutation(len(self.train)), 0
        neighbours = min(p.knn_neighbors, nns.shape[1] - 1)
        try:
            with progress_bar("step", self.show_progress) as bar:
                task = bar.add_task(f"train-stego D={p.dim}", total=p.steps)
                for step in range(1, p.steps + 1):
                    if cursor + p.batch_size > len(order):
                        order, cursor = rng.permutation(len(self.train)), 0
                    rows = order[cursor : cursor + p.batch_size]
                    cursor += p.batch_size
                    partners = nns[rows, rng.integers(1, neighbours + 1, size=len(rows))]
                    f, labels = data(rows)
                    f_pos, _ = data(partners)
                    feats, feats_pos = head.dropout(f), head.dropout(f_pos)  # the loss's own dropout draw
                    code, code_pos = head(f), head(f_pos)
                    out = loss_fn(feats, feats_pos, code, code_pos, generator=gen)
                    detached = code.detach()
                    labels = torch.where((labels >= 0) & (labels < p.n_classes), labels, -1)
                    logits = F.interpolate(linear(detached), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                    loss_linear = F.cross_entropy(logits, labels, ignore_index=-1) if (labels >= 0).any() else logits.sum() * 0
                    loss_cluster, _ = cluster(detached, None)
                    total = out["total"] + loss_linear + loss_cluster
                    for opt in optimizers:
                        opt.zero_grad()
                    total.backward()
                    for opt in optimizers:
                        opt.step()
                    if step % 10 == 0 or step == 1:
                        row = {"step": step, "loss/self": out["self"].item(), "loss/knn": out["knn"].item(),
                               "loss/rand": out["rand"].item(), "loss/corr": out["total"].item(),
                               "loss/linear": loss_linear.item(), "loss/cluster": loss_cluster.item(), "loss/total": total.item(),
                               **{f"cd/{k}": out[f"cd_{k}"].mean().item() for k in ("self", "knn", "rand")}}
                        if step % 100 == 0:
                            row["hist"] = {k: np.histogram(out[f"cd_{k}"].detach().cpu().numpy(), 40, (-1, 1))[0].tolist()
                                           for k in ("self", "knn", "rand")}
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        if writer is not None:
                            for k, v in row.items():
                                if k != "hist":
                                    writer.add_scalar(k, v, step)
                            if "hist" in row:
                                for k in ("self", "knn", "rand"):
                                    writer.add_histogram(f"cd/{k}", out[f"cd_{k}"].detach().cpu(), step)
                    if step % p.val_every == 0 or step == p.steps:
                        head.eval()
                        reducer = StegoHeadReducer.from_head(head.cpu())
                        head.to(device)
                        result = evaluate(CodeSource(self.val, reducer, flip=True), self.val, linear, cluster, probe_params, device)
                        head.train()
                        history.append({"step": step, **_flat(result)})
                        if best is None or history[-1]["cluster/mIoU"] > best["cluster/mIoU"]:
                            best, best_head = history[-1], reducer
                            best_probes = {"linear": _copy(linear), "cluster": _copy(cluster)}
                    bar.advance(task)
        finally:
            log.close()
            if writer is not None:
                writer.close()
        final_head = StegoHeadReducer.from_head(head.eval().cpu())
        final_probes = {"linear": _copy(linear), "cluster": _copy(cluster)}
        atomic_write_npz(self.output / FINAL, (final_head.state_dict()))
        atomic_write_npz(self.output / cache_schema.PAYLOAD, (best_head.state_dict()))
        buffer = io.BytesIO()
        torch.save({"best": best_probes, "final": final_probes}, buffer)
        atomic_write_bytes(self.output / PROBES, buffer.getvalue())
        metrics = {"history": history, "best": best, "final": history[-1]}
        if p.crf:
            linear.load_state_dict(best_probes["linear"])
            cluster.load_state_dict(best_probes["cluster"])
            pool = CRFPool()
            try:
                result = evaluate(CodeSource(self.val, best_head, flip=True), self.val, linear, cluster, probe_params, device, crf=pool)
            finally:
                pool.close()
            metrics["best_crf"] = {"step": best["step"], **_flat(result)}
        atomic_write_bytes(self.output / METRICS, json.dumps(metrics, indent=1).encode())
        write_manifest(self.output, {
            "key": self.key, "stage": self.name, "stage_version": self.version, "method": "stego",
            "dataset": self.train.attrs["params"]["dataset"], "code_dim": p.dim, "seed": p.seed,
            "reducer": best_head.params(), "params": self.params(), "inputs": self.inputs(),
            "resident": data.resident, "started": started, "finished": time.time(), "seconds": time.time() - started,
            "versions": package_versions(),
        })
        return metrics


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory / "tensorboard"))
