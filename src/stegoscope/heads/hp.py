"""HP — "Leveraging Hidden Positives" (Seong et al., CVPR 2023) trained from cached tokens
(``successors/hp.md``).

STEGO's head shape (ReLU, dropout 0.1) gives the code s; an EMA copy of it (updated in the step
before the optimiser, m = ``ema``) gives codes for the task-specific positives; a linear
projection, L2-normalised, gives z. The loss is the supervised-contrastive loss over every patch
of the batch with hidden positives (:func:`~stegoscope.ops.hidden_positives.hidden_positive_loss`),
once on z and once on the attention-mixed code's projection (local positives, weights from the
train store's ``attention_neighbours``, made at extraction). Reference pools: ``pool_size``
random patches of random train images, tokens (task-agnostic, drawn once) and EMA codes
(task-specific, drawn again every ``renew_every`` steps). λ of the task-specific positives ramps
from 0 after ``warmup`` steps to 1 at the last step. STEGO's correlation loss is off, as in every
HP config (weight 0).

Deviations from the original code (README, "HP"): tokens come from the cache; the photometric
consistency term is dropped (it needs a backbone forward of an augmented view per step; HP's own
Potsdam config drops it too); the pools are drawn from the cached tokens with the run's generator,
and renewed every ``renew_every`` global steps (the original counts steps within each epoch);
the probes train at the preset's probe learning rate (HP: linear 1e-3, cluster 5e-3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache_schema import ATTENTION
from ..models.stego_head import StegoHead
from ..ops.ema import ema_update
from ..ops.hidden_positives import hidden_positive_loss, lambda_ramp, neighbour_mix
from ..ops.transfer import to_device
from ..probing import TokenBatches
from .base import HeadParams, HeadTrainer, TokenBatch

LOSS_BYTES = 4e9  # the loss's working memory: how many anchor blocks go through its kernels together (speed only)


@dataclass(frozen=True)
class HPParams(HeadParams):
    """A preset's ``hp:`` section. Defaults: HP's Cityscapes config (``json/server/cityscapes.json``):
    batch 64, ≈ 30 epochs of the 14,875 five-crops (6960 steps), AdamW 5e-4 with weight decay 0.1 on
    the head, Adam 5e-4 on the projection, τ 0.6, ρ 0.02, pools of 2048 renewed every 20 steps, EMA
    0.999, warm-up 50, gradient-norm clip 10, D = 512."""

    steps: int = 6960
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    projection_lr: float = 5e-4
    dropout: float = 0.1
    tau: float = 0.6
    rho: float = 0.02  # share of random negatives in the denominator (1: all)
    pool_size: int = 2048
    renew_every: int = 20
    ema: float = 0.999
    warmup: int = 50
    grad_clip: float = 10.0
    reweighting: bool = True
    local_positives: bool = True  # the loss on the attention-mixed code (needs the train store's attention weights)

    def __post_init__(self):
        super().__post_init__()
        if self.tau <= 0 or not 0 < self.rho <= 1 or min(self.pool_size, self.renew_every) < 1 or self.warmup < 0:
            raise ValueError(f"tau > 0, rho in (0, 1], pool_size and renew_every ≥ 1 and warmup ≥ 0: {self}")
        if not 0 <= self.ema < 1 or not 0 <= self.dropout < 1 or self.grad_clip <= 0 or self.projection_lr <= 0:
            raise ValueError(f"ema and dropout in [0, 1), grad_clip and projection_lr positive: {self}")


class HPHead(nn.Module):
    """The head (``forward``: tokens → code s), its EMA copy and the projection."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.head = StegoHead(in_dim, dim, dropout)
        self.ema_head = copy.deepcopy(self.head).requires_grad_(False)
        self.projection = nn.Linear(dim, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def project(self, code: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) → (B, h·w, D) unit projections."""
        return F.normalize(self.projection(code.flatten(2).transpose(1, 2)), dim=-1)

    @torch.no_grad()
    def update_ema(self, m: float) -> None:
        for ema, live in zip(self.ema_head.state_dict().values(), self.head.state_dict().values()):
            if ema.is_floating_point():
                ema_update(ema, live, m)
            else:  # buffers such as counters are copied
                ema.copy_(live)


class HPTrainer(HeadTrainer):
    params_class = HPParams
    version = 3  # 2: the exported head is arrays, not a pickled module; 3: dropped anchors masked, not indexed out (no host wait)
    uses_knn = False

    def __init__(self, params: HPParams, run, channels: int):
        super().__init__(params, run, channels)
        self.row_arrays = (ATTENTION,) if params.local_positives else ()

    def make_head(self) -> HPHead:
        return HPHead(self.channels, self.run.dim, self.params.dropout)

    def optimizer(self, head: HPHead) -> torch.optim.Optimizer:
        p = self.params  # AdamW with no weight decay is Adam: the projection's
        return torch.optim.AdamW([{"params": head.head.parameters(), "lr": p.lr, "weight_decay": p.weight_decay},
                                  {"params": head.projection.parameters(), "lr": p.projection_lr, "weight_decay": 0.0}])

    def begin(self, head: HPHead, data: TokenBatches, generator: torch.Generator) -> None:
        self.data, self.generator = data, generator
        self.negatives = torch.Generator(data.device).manual_seed(self.run.seed)  # (P, B·P) draws each step: made where they are used
        self.pool_feats = self._pool(lambda tokens: tokens)  # task-agnostic: drawn once
        self.pool_codes = self._pool(lambda tokens: head.ema_head.eval()(tokens))

    @torch.no_grad()
    def _pool(self, encode) -> torch.Tensor:
        """(pool_size, ·) unit vectors: one random patch of each of ``pool_size`` random train images."""
        n, size = len(self.data), self.params.pool_size
        rows = torch.randperm(n, generator=self.generator)[:size] if n >= size else torch.randint(n, (size,), generator=self.generator)
        out = []
        for chunk in rows.split(64):
            maps = encode(self.data(np.sort(chunk.numpy()))[0])  # (b, ·, h, w)
            flat = maps.flatten(2)
            patch = to_device(torch.randint(flat.shape[2], (len(chunk),), generator=self.generator), flat.device)
            out.append(F.normalize(flat[torch.arange(len(chunk), device=flat.device), :, patch].float(), dim=1))
        return torch.cat(out)

    def loss(self, head: HPHead, batch: TokenBatch, generator: torch.Generator):
        p, feats = self.params, batch.feats
        head.update_ema(p.ema)  # in the step's forward, before the optimiser (as HP)
        code = head(feats)
        with torch.no_grad():
            ema_codes = head.ema_head.train()(feats)
            ema_codes = F.normalize(head.head.dropout(ema_codes).flatten(2).transpose(1, 2), dim=-1)  # a further dropout [QUIRK]
            agnostic = F.normalize(head.head.dropout(feats).flatten(2).transpose(1, 2), dim=-1)  # on dropped-out tokens [QUIRK]
        z = head.project(code)
        mixed = neighbour_mix(code, batch.extras[ATTENTION].float()) if p.local_positives else code
        z_mix = head.project(mixed)
        b, n_patches = z.shape[:2]
        if p.rho < 1:
            negatives = torch.rand(n_patches, b * n_patches, generator=self.negatives, device=feats.device) < p.rho
        else:
            negatives = torch.ones(n_patches, b * n_patches, dtype=torch.bool, device=feats.device)
        lam = lambda_ramp(batch.step, p.warmup, p.steps)
        chunk = max(1, int(LOSS_BYTES // (8 * 4 * n_patches * b * n_patches)))  # ≈ 8 float32 (P, N) matrices per block
        loss = hidden_positive_loss(z, z_mix, agnostic, ema_codes, self.pool_feats, self.pool_codes, negatives, lam, p.tau,
                                    reweighting=p.reweighting, blocks_per_chunk=chunk)
        return code, loss, {"loss/hp": loss, "hp/lambda": lam}

    def after_backward(self, head: HPHead) -> None:
        nn.utils.clip_grad_norm_(head.head.parameters(), self.params.grad_clip)

    def after_step(self, head: HPHead, step: int) -> None:
        if step % self.params.renew_every == 0:
            self.pool_codes = self._pool(lambda tokens: head.ema_head.eval()(tokens))
