"""CAUSE's concept clusterbook, fitted once per train split (``successors/cause.md`` §2.1, §3.1).

K prototype vectors in the backbone's token space, initialised U(±1/K), trained by Adam on the
differentiable graph modularity of each image's token-affinity graph, on grid-sampled tokens
(one per 4×4 window); then frozen. Both CAUSE heads read it (``heads/cause.py``), so heads that
agree on the split and these parameters share one artefact. It is stored raw, not normalised
[QUIRK]: CAUSE-TR's decoder reads the raw vectors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache_schema
from ..cache_schema import open_complete_store
from ..heads.cause import CLUSTERBOOK
from ..models import resolve_device
from ..ops.cause import concept_index, device_generator, draw_grid_order, grid_sample, init_clusterbook, modularity_loss
from ..pipeline import Stage, artefact_state
from ..probing import TokenBatches
from ..progress import progress_bar
from ..records import ClusterbookSummary
from ..training import BatchOrder

LOG_EVERY = 10  # steps between the losses kept in the summary


def fit_clusterbook(tokens: TokenBatches, k: int, steps: int, batch_size: int, lr: float, temperature: float, window: int,
                    seed: int, show_progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """The clusterbook (K, C) after ``steps`` Adam steps on the modularity loss, and its loss every
    ``LOG_EVERY`` steps. Every draw comes from ``seed``: the init from one torch generator, the
    grid orders from a generator on the tokens' device seeded by it, the batches' rows from one
    numpy generator (``BatchOrder``)."""
    generator = torch.Generator().manual_seed(seed)
    channels = tokens(np.array([0]))[0].shape[1]
    clusterbook = torch.nn.Parameter(init_clusterbook(k, channels, generator).to(tokens.device))
    orders = device_generator(generator, tokens.device)
    optimizer = torch.optim.Adam([clusterbook], lr=lr)
    order = BatchOrder(len(tokens), min(batch_size, len(tokens)), np.random.default_rng(seed))
    losses = []
    with progress_bar("step", show_progress) as bar:
        task = bar.add_task("CAUSE clusterbook", total=steps)
        for step in range(1, steps + 1):
            x = tokens(order.next())[0]
            b, _, h, w = x.shape
            sampled = grid_sample(x.flatten(2).transpose(1, 2), h, w, draw_grid_order(b, h, w, orders, window), window)
            loss = modularity_loss(sampled, clusterbook, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % LOG_EVERY == 0 or step == steps:
                losses.append(loss.detach())
            bar.advance(task)
    return clusterbook.detach().cpu(), [float(v) for v in losses]  # read once, after the loop


class CauseMediatorStage(Stage):
    name = "cause-mediator"
    version = 1

    def __init__(self, cache_root: Path, train: Stage, clusters: int, steps: int, batch_size: int, lr: float, temperature: float,
                 window: int, seed: int = 0, device: str = "auto", resident_bytes: float = 4e9, show_progress: bool = True):
        super().__init__(cache_root)
        if min(clusters, steps, batch_size, window) < 1 or lr <= 0 or temperature <= 0:
            raise ValueError(f"clusters, steps, batch_size and window must be positive, lr and temperature too: "
                             f"{clusters}, {steps}, {batch_size}, {window}, {lr}, {temperature}")
        self.train, self.clusters, self.steps, self.batch_size = train, clusters, steps, batch_size
        self.lr, self.temperature, self.window, self.seed = lr, temperature, window, seed
        self.device, self.resident_bytes, self.show_progress = device, resident_bytes, show_progress

    def params(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "temperature": self.temperature, "window": self.window, "seed": self.seed, "init": "uniform_1_over_k",
                "optimizer": "adam", "precision": "float32"}

    def upstream(self) -> dict[str, Stage]:
        return {"train": self.train}

    @property
    def output(self) -> Path:
        return cache_schema.artefact_dir(self.cache_root, self.name, f"k{self.clusters}", self.key)

    def state(self) -> str:
        return artefact_state(self.output)

    def execute(self, force: bool) -> torch.Tensor:
        started = time.time()
        store = open_complete_store(self.train.output)
        tokens = TokenBatches(store, resolve_device(self.device), self.resident_bytes)
        book, losses = fit_clusterbook(tokens, self.clusters, self.steps, self.batch_size, self.lr, self.temperature, self.window,
                                       self.seed, self.show_progress)
        used = int(len(np.unique(concepts_of(tokens, book))))
        summary = ClusterbookSummary(self.clusters, book.shape[1], self.steps, losses, used)
        self.publish(started, {cache_schema.PAYLOAD: {CLUSTERBOOK: book.numpy()}, cache_schema.METRICS: summary}, store=str(store.path))
        return book


def concepts_of(tokens: TokenBatches, book: torch.Tensor, rows: int = 64) -> np.ndarray:
    """The concept of every token of the first ``rows`` train images (how many concepts are in use)."""
    x = tokens(np.arange(min(rows, len(tokens))))[0]
    return concept_index(x.flatten(2).transpose(1, 2), book.to(x.device)).cpu().numpy()
