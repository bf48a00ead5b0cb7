"""STEGO's contrastive correlation loss (reference §5), with every quirk of the original code.

For a pair of maps, ``F`` is the cosine correspondence of the (dropout-perturbed, frozen)
backbone features at the sampled points, ``S`` the cosine correspondence of the codes, and the
element-wise loss is ``−max(S, 0) · (F' − b)`` where ``F'`` is ``F`` centred per query point with
the global mean of ``F`` re-added [QUIRK; ``readd_global_mean=False`` gives the paper's F^SC].
Terms: self (same points), kNN partner and ``neg_samples`` random partners drawn by
``super_perm`` (a "permutation" whose fixed points are shifted by one, so it may repeat
[QUIRK]). Each term is mean-reduced and weighted by its λ.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, h, w, i, j]: Σ_c a[b, c, h, w] · b[b, c, i, j]."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of map t (B, C, H, W) at coords (B, S, S, 2) in [-1, 1] → (B, C, S, S)."""
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def super_perm(size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random permutation whose fixed points i are replaced by (i + 1) mod size."""
    perm = torch.randperm(size, generator=generator).to(device)
    ident = torch.arange(size, device=device)
    return torch.where(perm == ident, (ident + 1) % size, perm)


def correlation_term(f1, f2, c1, c2, shift: float, pointwise: bool = True, zero_clamp: bool = True,
                     readd_global_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise loss [B, S, S, S, S] of one pair of sampled maps, and the code correspondence S."""
    with torch.no_grad():
        fd = tensor_correlation(norm(f1), norm(f2))
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            if readd_global_mean:
                fd = fd + old_mean
    cd = tensor_correlation(norm(c1), norm(c2))
    clamped = cd.clamp(min=0.0) if zero_clamp else cd.clamp(min=-9999.0)
    return -clamped * (fd - shift), cd


@dataclass(frozen=True)
class CorrelationLossConfig:
    """λ (weights) and b (shifts) of the three terms and how the correspondences are formed:
    declared once, here, and used as they are by presets, stage parameters and the loss.
    Defaults: STEGO's Potsdam values (paper Table 1)."""

    lambda_self: float = 0.67  # pos_intra_weight
    lambda_knn: float = 0.25  # pos_inter_weight
    lambda_rand: float = 0.63  # neg_inter_weight
    b_self: float = 0.08  # pos_intra_shift
    b_knn: float = 0.02  # pos_inter_shift
    b_rand: float = 0.76  # neg_inter_shift
    pointwise: bool = True  # centre F per query point
    zero_clamp: bool = True  # clamp S at 0
    readd_global_mean: bool = True  # the original code's centring [QUIRK]; False: the paper's F^SC
    feature_samples: int = 11  # 11×11 sample points
    neg_samples: int = 5

    def __post_init__(self):
        if self.feature_samples < 1 or self.neg_samples < 0:
            raise ValueError(f"feature_samples must be ≥ 1 and neg_samples ≥ 0, not {self.feature_samples}, {self.neg_samples}")


class CorrelationLoss(CorrelationLossConfig):
    """The loss of a :class:`CorrelationLossConfig`."""

    @classmethod
    def of(cls, config: CorrelationLossConfig) -> CorrelationLoss:
        """The loss of ``config``, or of the loss fields of a config that extends it."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(CorrelationLossConfig)})

    def __call__(self, feats, feats_pos, code, code_pos, coords1=None, coords2=None, perms=None, generator=None) -> dict:
        """Loss terms of a batch. ``feats``/``code`` (B, C/D, h, w) of the images, ``*_pos`` of
        their kNN partners. Coordinates and negative permutations are drawn unless given."""
        b, device, s = feats.shape[0], feats.device, self.feature_samples
        if coords1 is None:
            coords1 = torch.rand(b, s, s, 2, generator=generator).to(device) * 2 - 1
        if coords2 is None:
            coords2 = torch.rand(b, s, s, 2, generator=generator).to(device) * 2 - 1
        if perms is None:
            perms = [super_perm(b, generator, device) for _ in range(self.neg_samples)]
        f1, c1 = sample(feats, coords1), sample(code, coords1)
        f2, c2 = sample(feats_pos, coords2), sample(code_pos, coords2)
        opts = dict(pointwise=self.pointwise, zero_clamp=self.zero_clamp, readd_global_mean=self.readd_global_mean)
        self_loss, self_cd = correlation_term(f1, f1, c1, c1, self.b_self, **opts)
        knn_loss, knn_cd = correlation_term(f1, f2, c1, c2, self.b_knn, **opts)
        neg = [correlation_term(f1, sample(feats[p], coords2), c1, sample(code[p], coords2), self.b_rand, **opts) for p in perms]
        rand_loss, rand_cd = torch.cat([n[0] for n in neg]), torch.cat([n[1] for n in neg])
        terms = {"self": self_loss.mean(), "knn": knn_loss.mean(), "rand": rand_loss.mean()}
        total = self.lambda_self * terms["self"] + self.lambda_knn * terms["knn"] + self.lambda_rand * terms["rand"]
        return {"total": total, **terms, "cd_self": self_cd, "cd_knn": knn_cd, "cd_rand": rand_cd}
