"""STEGO's head trained from cached tokens (reference §4.2, §5, §6).

One step, as STEGO's: tokens of a batch and of each image's kNN partner; channel dropout gives
the loss's feature copy and, independently, each head branch's input; the contrastive
correlation loss; the base adds the probes on the detached code, one backward of the sum, Adam
5e-4 on the head and 5e-3 on each probe. Logged: the loss terms and the code correspondences S
of each term (mean every 10 steps, histograms every 100) — the diagnostic for tuning b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.stego_head import StegoHead
from ..ops.correlation_loss import CorrelationLoss, CorrelationLossConfig
from ..reducers import Reducer, StegoHeadReducer
from .base import HeadParams, HeadTrainer, TokenBatch

TERMS = ("self", "knn", "rand")


@dataclass(frozen=True)
class StegoParams(HeadParams, CorrelationLossConfig):
    """A preset's ``stego:`` section: training (Table 1), the loss's λ and b, and the head's
    channel dropout."""

    dropout: float = 0.1

    def __post_init__(self):
        HeadParams.__post_init__(self)
        CorrelationLossConfig.__post_init__(self)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


class StegoTrainer(HeadTrainer):
    params_class = StegoParams
    version = 2  # 2: the correlation loss in batched kernels (the same terms, summed in another order: within 1e-6)

    def __init__(self, params: StegoParams, run, channels: int):
        super().__init__(params, run, channels)
        self.correlation = CorrelationLoss.of(params)

    def make_head(self) -> StegoHead:
        return StegoHead(self.channels, self.run.dim, self.params.dropout)

    def loss(self, head: StegoHead, batch: TokenBatch, generator: torch.Generator):
        feats, feats_pos = head.dropout(batch.feats), head.dropout(batch.partner_feats)  # the loss's own dropout draw
        code, code_pos = head(batch.feats), head(batch.partner_feats)
        out = self.correlation(feats, feats_pos, code, code_pos, generator=generator)
        logged = {f"loss/{t}": out[t] for t in TERMS} | {"loss/corr": out["total"]} | {f"cd/{t}": out[f"cd_{t}"] for t in TERMS}
        return code, out["total"], logged

    def export(self, head: StegoHead) -> Reducer:
        return StegoHeadReducer.from_head(head)
