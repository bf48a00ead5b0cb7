"""SmooSeg (Lan et al., NeurIPS 2023) trained from cached tokens (``successors/smooseg.md``).

A projector (STEGO's head shape with SiLU and channel dropout 0.2) maps tokens to a code; K
student prototypes learn from the data loss on the detached code, and K teacher prototypes follow
them by EMA (α = 0.998 after every step). The projector learns only from the smoothness loss on
the teacher's soft assignments, within each image and against one other image of the batch
(``super_perm``, no kNN). The teacher prototypes are the cluster assignment that evaluation uses.

Deviations from the original code (README, "SmooSeg"): tokens come from the cache (the original
runs the backbone each step, under AMP); STEGO's linear probe is trained alongside on the detached
code (SmooSeg has none), so a linear mIoU is reported too; the prototypes' count is ``n_classes +
extra_clusters`` of the run, as the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.stego_head import StegoHead
from ..ops.correlation_loss import super_perm
from ..ops.ema import ema_update
from ..ops.kmeans import FixedCentroids
from ..ops.smoothness_loss import data_loss, prototype_scores, smoothness_term
from .base import HeadParams, HeadTrainer, TokenBatch


@dataclass(frozen=True)
class SmooSegParams(HeadParams):
    """A preset's ``smooseg:`` section. Defaults: the original's Cityscapes block
    (``configs/train_config.yaml``): 3000 steps of batch 32, Adam 1e-4 on the projector (``lr``)
    and 5e-4 on the prototypes, T = 0.1, α = 0.998, dropout 0.2, b_inter 0.5, b_intra −0.02."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-4  # the projector's (lr1)
    prototype_lr: float = 5e-4  # (lr2)
    temperature: float = 0.1
    alpha: float = 0.998  # the teacher prototypes' EMA
    dropout: float = 0.2
    b_intra: float = -0.02  # pos_intra_shift
    b_inter: float = 0.5  # neg_inter_shift
    pointwise: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.prototype_lr <= 0 or self.temperature <= 0 or not 0 <= self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"prototype_lr and temperature must be positive, alpha and dropout in [0, 1): {self}")


class SmooSegHead(nn.Module):
    """The projector and both prototype sets; ``forward`` is the projector (tokens → code)."""

    def __init__(self, in_dim: int, dim: int, n_prototypes: int, dropout: float):
        super().__init__()
        self.projector = StegoHead(in_dim, dim, dropout, activation=nn.SiLU)
        student = nn.init.xavier_normal_(torch.randn(n_prototypes, dim))
        self.student = nn.Parameter(nn.functional.normalize(student, dim=1))  # rows unit at init, then free
        self.register_buffer("teacher", self.student.detach().clone())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats)


class SmooSegTrainer(HeadTrainer):
    params_class = SmooSegParams
    version = 2  # 2: the exported head is its state dict and parameters, not a pickled module
    uses_knn = False
    own_clusters = "cosine"  # the teacher prototypes

    def make_head(self) -> SmooSegHead:
        return SmooSegHead(self.channels, self.run.dim, self.run.n_classes + self.run.extra_clusters, self.params.dropout)

    def optimizer(self, head: SmooSegHead) -> torch.optim.Optimizer:
        return torch.optim.Adam([{"params": head.projector.parameters(), "lr": self.params.lr},
                                 {"params": [head.student], "lr": self.params.prototype_lr}])

    def loss(self, head: SmooSegHead, batch: TokenBatch, generator: torch.Generator):
        p, feats = self.params, batch.feats
        signal = head.projector.dropout(feats)  # a third dropout draw: the features that define F
        code = head(feats)
        s_student, s_teacher = prototype_scores(code, head.student, head.teacher)
        assign = torch.softmax(s_teacher / p.temperature, dim=1)
        perm = super_perm(len(feats), generator, feats.device)
        intra, _ = smoothness_term(signal, signal, assign, assign, p.b_intra, p.pointwise)
        inter, affinity = smoothness_term(signal, signal[perm], assign, assign[perm], p.b_inter, p.pointwise)
        data = data_loss(s_student, s_teacher)
        logged = {"loss/intra": intra, "loss/inter": inter, "loss/data": data, "assign/inter": affinity}
        return code, intra + inter + data, logged

    def after_step(self, head: SmooSegHead, step: int) -> None:
        ema_update(head.teacher, head.student, self.params.alpha)

    def clusters(self, head: SmooSegHead) -> FixedCentroids:
        return FixedCentroids(head.teacher.detach().clone(), self.own_clusters)
