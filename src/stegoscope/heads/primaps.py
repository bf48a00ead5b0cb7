"""PriMaPs-EM (Hahn et al., TMLR 2024) trained from cached tokens (``successors/primaps.md``).

PriMaPs-EM is a clusterer on frozen features, not a dimensionality reduction: K prototypes θ_R
(a bias-free 1×1 map under weight normalisation, direction v_k and gain g_k) and their EMA θ_M.

1. Initialisation (stage A): the first K principal directions of the train tokens, then
   ``init_epochs`` epochs of batch-wise cosine k-means (STEGO's cluster loss) from them. With
   ``base: stego`` (STEGO+PriMaPs-EM) the features are a trained STEGO head's codes and the
   prototypes start from its cluster probe; no stage A.
2. EM (stage B), per batch: E-step — every principal mask proposal of an image (the
   ``primaps-masks`` artefact) takes the teacher θ_M's majority class over its pixels; M-step —
   θ_R fits those pseudo labels by class-weighted cross-entropy ("focal", γ = 2) at the label
   size. θ_M follows θ_R by EMA every ``ema_every`` steps (warm-up: d = min(1 − 1/n, 0.98)).
   Logits are raw dot products; evaluation uses θ_M.

Deviations from the original code (README, "PriMaPs-EM"): tokens and proposals come from the cache;
the student sees the clean view (no photometric augmentation: it needs a backbone forward per
step) and no random horizontal flip (flipped train tokens are not cached); the principal
directions are exact (eigendecomposition, deterministic sign) instead of randomised
(``torch.pca_lowrank``, arbitrary sign), for the mask proposals and the initialisation alike; the
initialisation uses a streamed covariance of up to ``init_images`` train images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache_schema import MASK_IDS, load_mask_ids
from ..ops.ema import ema_update
from ..ops.kmeans import ClusterLookup, FixedCentroids
from ..ops.primaps import class_weighted_ce, ema_decay, majority_labels
from ..probing import ProbeWeights, TokenBatches, load_reducer
from ..reducers import IdentityReducer, Reducer
from ..training import BatchOrder
from .base import HeadParams, HeadTrainer, TokenBatch


@dataclass(frozen=True)
class PrimapsParams(HeadParams):
    """A preset's ``primaps:`` section. Defaults: the one published setting (README, Cityscapes:
    ``train.py`` with ``--pcainit`` then 50 epochs of EM): batch 32, Adam 5e-3, γ = 2, EMA every 10
    steps with β = 0.98, proposals with ψ = 0.4; 50 epochs of Cityscapes' 2975 crops at 320 are
    4600 steps. ``train_split``: the preset's split of train crops at PriMaPs' size with their
    images stored (320 centre crops)."""

    steps: int = 4600
    batch_size: int = 32
    lr: float = 5e-3
    gamma: float = 2.0
    ema_every: int = 10
    ema_beta: float = 0.98
    init_epochs: int = 2  # stage A: cosine k-means from the PCA directions
    init_images: int = 2976  # the PCA initialisation's images (the original's 93 batches of 32)
    threshold: float = 0.4  # the mask proposals' ψ
    coverage: float = 0.95
    gain: float = 10.0
    train_split: str = "train"
    base: str = ""  # a head's name: on the codes of the preset's head at its headline D (STEGO+PriMaPs-EM, methods.py)

    def __post_init__(self):
        super().__post_init__()
        if self.gamma < 0 or self.ema_every < 1 or not 0 <= self.ema_beta <= 1 or self.init_epochs < 0 or self.init_images < 1:
            raise ValueError(f"gamma ≥ 0, ema_every ≥ 1, ema_beta in [0, 1], init_epochs ≥ 0 and init_images ≥ 1: {self}")
        from .. import methods as registry

        if self.base and (self.base not in registry.names(registry.HEAD) or issubclass(registry.get(self.base).params, PrimapsParams)):
            raise ValueError(f"base must be '' (raw DINO tokens) or a head PriMaPs-EM can train on, not {self.base!r}")


class PrimapsHead(nn.Module):
    """θ_R (``v``, ``g``: trained) and θ_M (``teacher_v``, ``teacher_g``: the EMA)."""

    def __init__(self, directions: torch.Tensor):
        super().__init__()
        self.v = nn.Parameter(directions.clone().float())
        self.g = nn.Parameter(torch.ones(len(directions)))
        self.register_buffer("teacher_v", self.v.detach().clone())
        self.register_buffer("teacher_g", self.g.detach().clone())

    def weight(self, teacher: bool = False) -> torch.Tensor:
        """(K, D) prototypes g_k · v_k / ‖v_k‖."""
        v, g = (self.teacher_v, self.teacher_g) if teacher else (self.v, self.g)
        return g[:, None] * F.normalize(v, dim=1)

    def update_teacher(self, decay: float) -> None:
        ema_update(self.teacher_v, self.v, decay)
        ema_update(self.teacher_g, self.g, decay)


def logits(feats: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw dot products (B, K, H, W) of features (B, D, h, w), computed at token resolution and
    bilinearly upsampled (exactly the upsampled features' logits: both maps are linear)."""
    return F.interpolate(torch.einsum("bdhw,kd->bkhw", feats, weight), size=size, mode="bilinear", align_corners=False)


class PrimapsTrainer(HeadTrainer):
    params_class = PrimapsParams
    uses_knn = False
    own_clusters = "dot"  # θ_M's prototypes, scored by raw dot products
    fixed_dim = True

    def __init__(self, params: PrimapsParams, run, channels: int):
        super().__init__(params, run, channels)
        self.base: Reducer | None = None
        self.base_centroids: torch.Tensor | None = None

    @classmethod
    def input_stages(cls, params: PrimapsParams, study, train, seed: int) -> dict:
        """Its train split's mask proposals and, for STEGO+PriMaPs-EM, the base head (at its headline D)."""
        stages = {"masks": study.primaps_masks(train, params.threshold, params.coverage, params.gain)}
        return stages | ({"base": study.head(params.base, None, seed)} if params.base else {})

    @classmethod
    def code_dim(cls, params: PrimapsParams, channels: int, head_dim) -> int:
        return head_dim(params.base) if params.base else channels

    def load_inputs(self, inputs: dict[str, Path]) -> dict[str, np.ndarray]:
        if "base" in inputs:
            self.base = load_reducer(inputs["base"])
            self.base_centroids = ProbeWeights.read(inputs["base"]).best_centroids
        return {MASK_IDS: load_mask_ids(inputs["masks"])}

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) tokens → (B, D, h, w) features: the tokens, or the base head's codes."""
        if self.base is None:
            return tokens
        return self.base.transform_tensor(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def make_head(self) -> PrimapsHead:
        return PrimapsHead(torch.zeros(self.run.n_classes + self.run.extra_clusters, self.run.dim))

    def begin(self, head: PrimapsHead, data: TokenBatches, generator: torch.Generator) -> None:
        if self.base_centroids is not None:
            directions = self.base_centroids.to(data.device)
        else:
            directions = self._kmeans(self._principal_directions(data, len(head.v), generator), data, generator)
        with torch.no_grad():
            head.v.copy_(directions)
            head.g.fill_(1.0)
            head.teacher_v.copy_(directions)
            head.teacher_g.fill_(1.0)

    @torch.no_grad()
    def _principal_directions(self, data: TokenBatches, k: int, generator: torch.Generator) -> torch.Tensor:
        """The first k principal directions (k, D) of the tokens of up to ``init_images`` random
        train images, from a streamed float64 covariance; each signed so its largest component is
        positive (the original's randomised solver leaves the sign to chance)."""
        rows = torch.randperm(len(data), generator=generator)[: self.params.init_images].sort().values.numpy()
        total, outer, count = 0.0, 0.0, 0
        for chunk in np.array_split(rows, max(1, -(-len(rows) // 64))):
            x = self.features(data(chunk)[0]).permute(0, 2, 3, 1).reshape(-1, self.run.dim).double()
            total, outer, count = total + x.sum(0), outer + x.T @ x, count + len(x)
        mean = total / count
        _, vectors = torch.linalg.eigh(outer / count - torch.outer(mean, mean))
        top = vectors[:, -k:].flip(1).T  # descending variance
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        return (top * signs).float()

    def _kmeans(self, directions: torch.Tensor, data: TokenBatches, generator: torch.Generator) -> torch.Tensor:
        """Stage A: ``init_epochs`` epochs of batch-wise cosine k-means (Adam at ``lr``) from ``directions``."""
        lookup = ClusterLookup(self.run.dim, len(directions)).to(data.device)
        with torch.no_grad():
            lookup.clusters.copy_(directions)
        optimizer = torch.optim.Adam(lookup.parameters(), lr=self.params.lr)
        order = BatchOrder(len(data), min(self.params.batch_size, len(data)), np.random.default_rng(self.run.seed))
        for _ in range(self.params.init_epochs * max(1, len(data) // self.params.batch_size)):
            loss, _ = lookup(self.features(data(order.next())[0]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return F.normalize(lookup.clusters.detach(), dim=1)

    def loss(self, head: PrimapsHead, batch: TokenBatch, generator: torch.Generator):
        p = self.params
        done = batch.step - 1  # the original's global_step: the updates before this step's
        if done > 0 and done % p.ema_every == 0:
            head.update_teacher(ema_decay(done // p.ema_every, p.ema_beta))
        with torch.no_grad():
            feats = self.features(batch.feats)
        size = batch.labels.shape[-2:]
        ids = batch.extras[MASK_IDS]
        if ids.shape[-2:] != size:
            raise ValueError(f"mask proposals are {tuple(ids.shape[-2:])} pixels but the train labels {tuple(size)}")
        with torch.no_grad():
            teacher = logits(feats, head.weight(teacher=True), size).argmax(1)
            target = majority_labels(teacher, ids)
        loss = class_weighted_ce(logits(feats, head.weight(), size), target, p.gamma)
        supervised = (target != 255).float().mean()
        return feats, loss, {"loss/em": loss, "em/supervised": supervised}

    def clusters(self, head: PrimapsHead) -> FixedCentroids:
        return FixedCentroids(head.weight(teacher=True).detach().clone(), self.own_clusters)

    def export(self, head: PrimapsHead) -> Reducer:
        """The features θ_M reads: the base head, or the raw tokens."""
        return self.base if self.base is not None else IdentityReducer(self.run.dim)
