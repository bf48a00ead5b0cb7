"""CAUSE (Kim, Lee, Ro; Pattern Recognition 2024) trained from cached tokens (``successors/cause.md``).

Three steps, the first its own stage:

1. **Mediator** (``stages/cause_mediator.py``): a clusterbook of K concept vectors fitted by the
   differentiable graph modularity over each image's token-affinity graph (grid-sampled tokens),
   then frozen and stored raw.
2. **Frontdoor** (``steps``): a head — ``mlp`` (two 1×1 branches) or ``tr`` (a one-layer transformer
   decoder whose queries are the tokens' concept vectors plus a learned positional embedding) —
   and a 2048-d projection, with an EMA teacher of both. The loss is the concept-wise InfoNCE:
   two tokens are positives when their concepts' cosine is > 0.3, negatives when < 0.1, against
   the teacher's projections in the batch and a per-concept FIFO bank of earlier ones.
3. **Cluster probe** (``probe_steps``): n_classes centroids fitted by the modularity objective on
   the teacher's grid-sampled codes, the head frozen (``label_leak: true`` instead trains the teacher
   with the linear probe's cross-entropy, as the released scripts do).

The evaluated model is the teacher: flip TTA in code space, log-softmax of 3·cosine, the dense
CRF, the Hungarian mapping; the last step is kept (no checkpoint selection).

[QUIRK]s kept by default, each with its fix as an option: the teacher aliases the student until
the first EMA update (``ema_alias``), the teacher's dropout is active (``teacher_dropout``), and
images without positive pairs count in the loss's divisor (``count_empty_terms``). Deviations
(README, "CAUSE"): one process (the released scripts train four independent models and keep rank
0's: the single-process equivalent is rank 0's learning rate and its batch size over the whole
split), fp32 (no autocast), no StepLR in step 3, and STEGO's linear probe trained alongside by the
head-training base (its own Adam; the original clips it together with the head).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache_schema import StoreError
from ..ops.cause import (
    bank_entries,
    bank_init,
    bank_update,
    concept_index,
    concept_infonce,
    device_generator,
    draw_bank_keys,
    draw_grid_order,
    dropout_mask,
    grid_sample,
    init_cluster_probe,
    modularity_loss,
)
from ..ops.ema import ema_update
from ..ops.kmeans import FixedCentroids
from ..pipeline import load_npz
from ..probing import TokenBatches
from .base import HeadParams, HeadTrainer, TokenBatch

VARIANTS = ("mlp", "tr")
CLUSTERBOOK = "clusterbook"  # the cause-mediator artefact's array
CRF_ALPHA = 3.0  # ``forward_centroid``: log_softmax(3 · cos)

Dropout = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class CauseParams(HeadParams):
    """A preset's ``cause-mlp:`` / ``cause-tr:`` section. Defaults: the released scripts on
    Cityscapes in one process (spec §4): batch 16, Adam 4e-3 (rank 0's), 2 epochs of frontdoor
    (466 steps), the probe's epoch (233; TR: 5 epochs, 1165), the mediator's epoch (233)."""

    variant: str = "mlp"  # set by the registration (methods.py)
    steps: int = 466  # step 2, the frontdoor
    probe_steps: int = 233  # step 3, the cluster probe
    batch_size: int = 16
    lr: float = 4e-3
    weight_decay: float = 0.0  # L2 in Adam, on the head (COCO: 1e-4)
    grad_clip: float = 1.0  # over the head's parameters together (COCO: MLP 0.1, TR 2)
    projection_dim: int = 2048
    dropout: float = 0.1
    ema: float = 0.99
    temperature: float = 0.07
    pos_threshold: float = 0.3
    neg_threshold: float = 0.1
    bank_size: int = 100  # per concept
    window: int = 4  # grid sub-sampling: one token per window × window tile
    hidden: int = 2048  # the TR decoder's feed-forward width
    clusters: int = 2048  # K of the clusterbook
    mediator_steps: int = 233  # step 1
    mediator_lr: float = 4e-3
    modularity_temperature: float = 0.1
    cluster_lr: float = 4e-3  # the cluster probe's Adam (step 3)
    mediator_split: str = "train"  # the split the clusterbook is fitted on (faithful: the 320 px crops)
    train_split: str = "train"  # the split the head trains on (TR: its own grid, the 320 px crops)
    label_leak: bool = False  # step 3 trains the teacher with the ground truth, as released (results say so)
    ema_alias: bool = True  # [QUIRK] the teacher is the student until the first EMA update
    teacher_dropout: bool = True  # [QUIRK] the teacher's dropout is active while training
    count_empty_terms: bool = True  # [QUIRK] images without positives count in the loss's divisor

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.probe_steps < 0 or min(self.mediator_steps, self.projection_dim, self.bank_size, self.window, self.hidden,
                                       self.clusters) < 1:
            raise ValueError(f"probe_steps must be ≥ 0; mediator_steps, projection_dim, bank_size, window, hidden and "
                             f"clusters positive: {self}")
        if not 0 <= self.dropout < 1 or not 0 <= self.ema < 1 or self.temperature <= 0 or self.modularity_temperature <= 0:
            raise ValueError(f"dropout and ema must be in [0, 1), the temperatures positive: {self}")
        if not self.neg_threshold <= self.pos_threshold:
            raise ValueError(f"neg_threshold must not exceed pos_threshold: {self}")
        if min(self.cluster_lr, self.mediator_lr, self.grad_clip) <= 0 or self.weight_decay < 0:
            raise ValueError(f"cluster_lr, mediator_lr and grad_clip must be positive, weight_decay ≥ 0: {self}")

    @property
    def total_steps(self) -> int:
        return self.steps + self.probe_steps


# -- the heads: forward passes with every random draw given ------------------------------------------


class MLPHead(nn.Module):
    """``HeadSegment``: y = f1(drop₁(x)) + f2(drop₂(x)) on (B, C, h, w) maps; f1 a 1×1 map C → D, f2
    1×1 C → C, ReLU, 1×1 C → D. ``masks``: the two element-wise dropout keep-masks (scaled), or None."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.f1 = nn.Conv2d(channels, dim, 1)
        self.f2 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, dim, 1))

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        first, second = (x, x) if masks is None else (x * masks[0], x * masks[1])
        return self.f1(first) + self.f2(second)


class Attention(nn.Module):
    """One-head attention as ``nn.MultiheadAttention(C, 1)`` (the same parameters and initialisation),
    with the dropout of its weights given as a function."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * channels, channels)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: Dropout = identity) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv)
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.out_proj(drop(weights) @ v)


class TRHead(nn.Module):
    """``TRDecoder``: queries t₀ = the tokens' raw concept vectors, memory m = the tokens, a learned
    positional embedding on the queries (tied to one grid of N tokens);
    t₁ = LN₁(t₀ + dr(SA(t₀+pos, t₀+pos, t₀))), t₂ = LN₂(t₁ + dr(CA(t₁+pos, m, m))),
    t₃ = t₂ + dr(W₂ dr(ReLU(W₁ t₂)))), h = m + LN₃(t₃), then :class:`MLPHead`'s two branches on h.
    ``drop``: every internal dropout (p is the caller's); ``masks``: the branches' keep-masks."""

    def __init__(self, channels: int, dim: int, hidden: int, n_queries: int = 0):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(channels), Attention(channels)
        self.linear1, self.linear2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.query_pos = nn.Parameter(torch.zeros(n_queries, channels))  # drawn by the trainer (randn), sized by the grid
        self.out = MLPHead(channels, dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "query_pos")
        if stored is not None and stored.shape != self.query_pos.shape:  # a head rebuilt from its state: its grid's size
            self.query_pos = nn.Parameter(torch.empty_like(stored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, queries: torch.Tensor, drop: Dropout = identity,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        if h * w != len(self.query_pos):
            raise ValueError(f"CAUSE-TR was trained on {len(self.query_pos)} tokens a map, not {h}×{w}: "
                             f"it reads maps of its own train split's grid (its val split must match it)")
        m = x.flatten(2).transpose(1, 2)  # (B, N, C)
        t, pos = queries, self.query_pos
        t = self.norm1(t + drop(self.self_attn(t + pos, t + pos, t, drop)))
        t = self.norm2(t + drop(self.cross_attn(t + pos, m, m, drop)))
        t = self.norm3(t + drop(self.linear2(drop(F.relu(self.linear1(t))))))
        return self.out((m + t).transpose(1, 2).reshape(b, c, h, w), masks)


class CauseModel(nn.Module):
    """Student and teacher (head and projection), the frozen clusterbook and the cluster probe;
    ``forward`` is the evaluated model: the teacher's code in eval mode, (B, C, h, w) → (B, D, h, w)."""

    def __init__(self, variant: str, channels: int, dim: int, projection_dim: int, hidden: int, clusters: int, n_classes: int):
        super().__init__()
        self.variant = variant
        self.head = MLPHead(channels, dim) if variant == "mlp" else TRHead(channels, dim, hidden)
        self.projection = nn.Conv2d(dim, projection_dim, 1)
        self.teacher_head, self.teacher_projection = copy.deepcopy(self.head), copy.deepcopy(self.projection)
        self.teacher_head.requires_grad_(False)
        self.teacher_projection.requires_grad_(False)
        self.register_buffer("clusterbook", torch.zeros(clusters, channels))  # raw, as fitted [QUIRK: not normalised]
        self.cluster_probe = nn.Parameter(torch.zeros(n_classes, dim))

    def code(self, head: nn.Module, x: torch.Tensor, drop: Dropout = identity,
             masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``head``'s (B, D, h, w) code of (B, C, h, w) tokens."""
        if self.variant == "mlp":
            return head(x, masks)
        queries = self.clusterbook[concept_index(x.flatten(2).transpose(1, 2), self.clusterbook)]
        return head(x, queries, drop, masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(self.teacher_head, x)


def sequence(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h·w, C) in raster order."""
    return maps.flatten(2).transpose(1, 2)


def load_clusterbook(directory: Path, k: int, channels: int) -> torch.Tensor:
    """The (K, C) clusterbook of a ``cause-mediator`` artefact, checked against what reads it."""
    arrays = load_npz(directory)
    if CLUSTERBOOK not in arrays:
        raise StoreError(f"{directory}: no clusterbook; rerun the study (stage cause-mediator)")
    book = np.asarray(arrays[CLUSTERBOOK])
    if book.shape != (k, channels) or not np.isfinite(book).all():
        raise StoreError(f"{directory}: the clusterbook is {book.shape} (finite: {bool(np.isfinite(book).all())}), not the "
                         f"({k}, {channels}) this head needs; rerun the study (stage cause-mediator)")
    return torch.from_numpy(book.astype(np.float32))


def segment(head: CauseModel) -> list[nn.Parameter]:
    """The released scripts' ``segment``: student and teacher, head and projection (one Adam group,
    one gradient-clip budget; the teacher's get gradients only with the label leak)."""
    return [*head.head.parameters(), *head.projection.parameters(), *head.teacher_head.parameters(),
            *head.teacher_projection.parameters()]


class CauseTrainer(HeadTrainer):
    params_class = CauseParams
    uses_knn = False
    own_clusters = "cosine"  # the cluster probe fitted in step 3
    crf_alpha = CRF_ALPHA
    select = "step"  # the released scripts keep the last epoch's checkpoint

    def __init__(self, params: CauseParams, run, channels: int):
        super().__init__(params, run, channels)
        self.clusterbook: torch.Tensor | None = None
        self.bank = None
        self.draws: torch.Generator | None = None  # the steps' draws, on the data's device (seeded in begin)
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def input_stages(cls, params: CauseParams, study, train, seed: int) -> dict:
        return {"mediator": study.cause_mediator(study.extract(params.mediator_split), params, seed)}

    def load_inputs(self, inputs: dict[str, Path]) -> dict[str, np.ndarray]:
        self.clusterbook = load_clusterbook(inputs["mediator"], self.params.clusters, self.channels)
        return {}

    def make_head(self) -> CauseModel:
        p = self.params
        return CauseModel(p.variant, self.channels, self.run.dim, p.projection_dim, p.hidden, p.clusters,
                          self.run.n_classes + self.run.extra_clusters)

    def begin(self, head: CauseModel, data: TokenBatches, generator: torch.Generator) -> None:
        if self.clusterbook is None:
            raise ValueError("CAUSE trains on a fitted clusterbook: load_inputs() reads it from the cause-mediator artefact")
        with torch.no_grad():
            head.clusterbook.copy_(self.clusterbook)
            head.cluster_probe.copy_(init_cluster_probe(*head.cluster_probe.shape, generator))
            if self.params.variant == "tr":
                h, w = data(np.array([0]))[0].shape[-2:]
                head.head.query_pos = nn.Parameter(torch.randn(h * w, self.channels, generator=generator).to(data.device))
            head.teacher_head = copy.deepcopy(head.head).requires_grad_(False)  # the teacher starts as the student
            head.teacher_projection = copy.deepcopy(head.projection).requires_grad_(False)
        self.bank = bank_init(self.params.clusters, self.params.bank_size, self.params.projection_dim, data.device)
        self.draws = device_generator(generator, data.device)

    def optimizer(self, head: CauseModel) -> torch.optim.Optimizer:
        return torch.optim.Adam([{"params": segment(head), "lr": self.params.lr, "weight_decay": self.params.weight_decay},
                                 {"params": [head.cluster_probe], "lr": self.params.cluster_lr}])

    # -- one step ----------------------------------------------------------------------------------
    def _drop(self, generator: torch.Generator) -> Dropout:
        """The TR's internal dropout: element-wise keep-masks drawn from ``generator``."""
        p = self.params.dropout
        return lambda t: t * dropout_mask(tuple(t.shape), p, generator)

    def _masks(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params.dropout
        return dropout_mask(shape, p, generator), dropout_mask(shape, p, generator)

    def _teacher_code(self, head: CauseModel, x: torch.Tensor, steps: torch.Generator) -> torch.Tensor:
        """The teacher's code, its dropout active unless ``teacher_dropout`` is off."""
        if not self.params.teacher_dropout:
            return head.code(head.teacher_head, x)
        return head.code(head.teacher_head, x, self._drop(steps), self._masks(tuple(x.shape), steps))

    def loss(self, head: CauseModel, batch: TokenBatch, generator: torch.Generator):
        # the step's draws come from the generator on the data's device that begin() seeded from ``generator``
        if batch.step > self.params.steps:
            return self._probe_loss(head, batch, self.draws)
        return self._frontdoor_loss(head, batch, self.draws)

    def _frontdoor_loss(self, head: CauseModel, batch: TokenBatch, steps: torch.Generator):
        """Step 2: the concept-wise InfoNCE of the student's projections against the teacher's."""
        p, x = self.params, batch.feats
        b, c, h, w = x.shape
        order = draw_grid_order(b, h, w, steps, p.window)
        if p.variant == "mlp":  # the heads run on the sampled tokens only
            sampled = grid_sample(sequence(x), h, w, order, p.window)  # (B, N', C)
            maps = sampled.transpose(1, 2)[..., None]  # (B, C, N', 1)
            with torch.no_grad():
                zbar = sequence(head.teacher_projection(self._teacher_code(head, maps, steps)))
            z = sequence(head.projection(head.head(maps, self._masks(tuple(maps.shape), steps))))
            with torch.no_grad():  # the linear probe's input: a teacher pass over the whole grid, fresh dropout
                code = self._teacher_code(head, x, steps)
        else:  # the heads run on the whole grid, then every output is sampled in the same order
            with torch.no_grad():
                code = self._teacher_code(head, x, steps)
                zbar = grid_sample(sequence(head.teacher_projection(code)), h, w, order, p.window)
            y = head.code(head.head, x, self._drop(steps), self._masks(tuple(x.shape), steps))
            z = grid_sample(sequence(head.projection(y)), h, w, order, p.window)
            sampled = grid_sample(sequence(x), h, w, order, p.window)
        concepts = concept_index(sampled, head.clusterbook)  # (B, N')
        vectors = F.normalize(head.clusterbook, dim=1)[concepts]
        loss, empty = concept_infonce(z, zbar, vectors, *bank_entries(self.bank, head.clusterbook), p.temperature,
                                      p.pos_threshold, p.neg_threshold, p.count_empty_terms)
        self.pending = (concepts.flatten(), zbar.flatten(0, 1), draw_bank_keys(concepts.numel(), steps))
        return code, loss, {"loss/frontdoor": loss, "frontdoor/empty_terms": empty}

    def _probe_loss(self, head: CauseModel, batch: TokenBatch, steps: torch.Generator):
        """Step 3: the cluster probe by modularity on the teacher's grid-sampled codes (the teacher
        frozen, unless ``label_leak`` lets the linear probe's cross-entropy train it)."""
        p, x = self.params, batch.feats
        b, _, h, w = x.shape
        with torch.set_grad_enabled(p.label_leak):
            code = self._teacher_code(head, x, steps)
        order = draw_grid_order(b, h, w, steps, p.window)
        loss = modularity_loss(grid_sample(sequence(code), h, w, order, p.window), head.cluster_probe, p.modularity_temperature)
        return code, loss, {"loss/modularity": loss}

    @classmethod
    def uses_labels(cls, params: dict) -> bool:
        return bool(params.get("label_leak"))

    def labels_reach_head(self, step: int) -> bool:
        return self.params.label_leak and step > self.params.steps

    def after_backward(self, head: CauseModel) -> None:
        torch.nn.utils.clip_grad_norm_(segment(head), self.params.grad_clip)

    def after_step(self, head: CauseModel, step: int) -> None:
        p = self.params
        if step > p.steps:
            return
        decay = 0.0 if step == 1 and p.ema_alias else p.ema  # [QUIRK] the aliased teacher took the student's first step
        for teacher, student in ((head.teacher_head, head.head), (head.teacher_projection, head.projection)):
            for t, s in zip(teacher.parameters(), student.parameters()):
                ema_update(t, s, decay)
        self.bank = bank_update(self.bank, *self.pending)
        self.pending = None
        if step == p.steps and p.label_leak:  # step 3 of the released scripts: the teacher is trainable
            head.teacher_head.requires_grad_(True)

    def clusters(self, head: CauseModel) -> FixedCentroids:
        return FixedCentroids(head.cluster_probe.detach().clone(), self.own_clusters, CRF_ALPHA)
