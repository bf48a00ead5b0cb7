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

from .transfer import to_device


def norm(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.normalize(t, dim=dim, eps=1e-10)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[…, B, h, w, i, j]: Σ_c a[…, b, c, h, w] · b[…, b, c, i, j] (leading dims broadcast)."""
    return torch.einsum("...nchw,...ncij->...nhwij", a, b)


def sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of map t (B, C, H, W) at coords (B, S, S, 2) in [-1, 1] → (B, C, S, S)."""
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def sample_partners(t: torch.Tensor, coords: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """(N, B, C, S, S): map ``perms[n, i]`` of t (B, C, H, W) sampled at ``coords[i]``, for every
    draw n, in one sampling kernel: every map is sampled at every image's points (the images
    folded into the channels), then the needed pairs are picked. It reads B·C·B·S² values, as
    many as the N·B permuted full maps it replaces (B·S² ≈ N·H·W at STEGO's sizes)."""
    b, c, h, w = t.shape
    s = coords.shape[1]
    grid = coords.permute(0, 2, 1, 3).reshape(1, b * s, s, 2)  # as :func:`sample`'s grid, the images stacked along y
    every = F.grid_sample(t.reshape(1, b * c, h, w), grid, padding_mode="border", align_corners=True)
    every = every.reshape(b, c, b, s, s)  # [map j, channel, points of image i, y, x]
    return every[perms, :, torch.arange(b, device=t.device)]


def super_perm(size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random permutation whose fixed points i are replaced by (i + 1) mod size."""
    perm = torch.randperm(size, generator=generator).to(device)
    ident = torch.arange(size, device=device)
    return torch.where(perm == ident, (ident + 1) % size, perm)


def super_perms(n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, size): ``n`` draws of :func:`super_perm` on the host generator, in the same order."""
    if n == 0:
        return torch.zeros(0, size, dtype=torch.long)
    return torch.stack([super_perm(size, generator) for _ in range(n)])


def correlation_terms(f1, f2, c1, c2, shifts: torch.Tensor, pointwise: bool = True, zero_clamp: bool = True,
                      readd_global_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise losses [T, B, S, S, S, S] of T pairs of sampled, normalised maps at once, and
    the code correspondences S. ``f1``/``c1`` (B, C/D, S, S) are the query maps, ``f2``/``c2``
    (T, B, C/D, S, S) their partners, ``shifts`` (T,) each pair's b; the pointwise centring
    re-adds each pair's own global mean (as one call per pair in the original)."""
    with torch.no_grad():
        fd = tensor_correlation(f1, f2)
        if pointwise:
            old_mean = fd.mean(dim=(1, 2, 3, 4, 5), keepdim=True)
            fd = fd - fd.mean(dim=(4, 5), keepdim=True)
            if readd_global_mean:
                fd = fd + old_mean
    cd = tensor_correlation(c1, c2)
    clamped = cd.clamp(min=0.0) if zero_clamp else cd.clamp(min=-9999.0)
    return -clamped * (fd - shifts.view(-1, 1, 1, 1, 1, 1)), cd


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
        their kNN partners. Coordinates and negative permutations (a list of (B,) or an (N, B)
        tensor) are drawn on the host ``generator`` unless given, and copied without blocking.

        Each sampled map is normalised once; the self, kNN and every negative term are one
        batched correlation (the negatives sampled by :func:`sample_partners`)."""
        b, device, s = feats.shape[0], feats.device, self.feature_samples
        if coords1 is None:
            coords1 = torch.rand(b, s, s, 2, generator=generator) * 2 - 1
        if coords2 is None:
            coords2 = torch.rand(b, s, s, 2, generator=generator) * 2 - 1
        if perms is None:
            perms = super_perms(self.neg_samples, b, generator)
        elif not isinstance(perms, torch.Tensor):
            perms = torch.stack(list(perms)) if len(perms) else torch.zeros(0, b, dtype=torch.long)
        coords1, coords2, perms = (to_device(t, device) for t in (coords1, coords2, perms))
        f1, c1 = norm(sample(feats, coords1)), norm(sample(code, coords1))
        f2 = torch.cat([f1[None], norm(sample(feats_pos, coords2))[None], norm(sample_partners(feats, coords2, perms), dim=2)])
        c2 = torch.cat([c1[None], norm(sample(code_pos, coords2))[None], norm(sample_partners(code, coords2, perms), dim=2)])
        shifts = to_device(torch.tensor([self.b_self, self.b_knn, *[self.b_rand] * len(perms)], dtype=f1.dtype), device)
        loss, cd = correlation_terms(f1, f2, c1, c2, shifts, self.pointwise, self.zero_clamp, self.readd_global_mean)
        means = loss.mean(dim=(1, 2, 3, 4, 5))
        terms = {"self": means[0], "knn": means[1], "rand": means[2:].mean() if len(perms) else means.new_zeros(())}
        total = self.lambda_self * terms["self"] + self.lambda_knn * terms["knn"] + self.lambda_rand * terms["rand"]
        return {"total": total, **terms, "cd_self": cd[0], "cd_knn": cd[1], "cd_rand": cd[2:].flatten(0, 1)}
