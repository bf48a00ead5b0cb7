"""PriMaPs-EM (Hahn et al., TMLR 2024; reference ``successors/primaps.md``): principal mask
proposals and the losses of its EM training, as pure functions.

Proposals (§2), once per training image, from the raw patch tokens ``f`` (C, h, w): repeatedly take
the first principal direction of the tokens not yet covered, replace it by the real token most
aligned with it (the anchor), and cut out every uncovered position whose cosine to the anchor is at
least ``threshold`` (relative to the anchor's own, i.e. 1) as one soft mask; stop once 95 % of the
positions are covered. The masks are median-filtered, made binary by a gain of 10, given a
background channel and refined by the dense CRF on the image; the result is a uint8 map of
class-agnostic mask ids 1..N, 255 where the background wins.

EM (§3): the E-step labels every mask with the momentum teacher's majority class
(:func:`majority_labels`); the M-step fits the student with a cross-entropy whose class weights come
from the batch-mean predicted confidence (:func:`class_weighted_ce`); the teacher follows the
student by an EMA with a warm-up (:func:`ema_decay`).

Deviations from the original code, all documented where they occur: the principal direction is
exact with a deterministic sign instead of ``torch.pca_lowrank``'s randomised, arbitrary-signed one
(§7.2; the faithful solver can be passed as ``direction``), the anchor is chosen among uncovered
positions only (identical except in the §7.4 case where the original divides by zero), and empty
inputs that give NaN in the original are guarded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .crf import dense_crf

NO_MASK = 255  # id of "no mask / background" in proposal maps; also the ignore label of §3


def first_principal_direction(x: torch.Tensor) -> torch.Tensor:
    """(N, C) rows → (C,) unit first principal direction of the centred rows.

    Exact, in float64: the top eigenvector of the smaller of the two Gram matrices of the centred
    rows (C×C covariance, or N×N with the direction recovered as ``Xᵀv``). The original uses
    ``torch.pca_lowrank(X, q=3, niter=100)``, randomised and with an arbitrary sign (§7.2); here
    the sign is fixed so that the component of largest magnitude is positive (the first such
    component on ties) — a documented deviation. With a repeated top eigenvalue the direction
    itself is not unique; N = 1 (nothing to centre) gives an arbitrary but deterministic unit vector.
    Returned in x's dtype when that is floating point, else float64.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected (N ≥ 1, C) rows, got shape {tuple(x.shape)}")
    xc = x.detach().to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    n, c = xc.shape
    if n >= c:
        u = torch.linalg.eigh(xc.T @ xc)[1][:, -1]  # eigh sorts eigenvalues ascending
    else:
        u = xc.T @ torch.linalg.eigh(xc @ xc.T)[1][:, -1]
        norm = u.norm()
        u = u / norm if norm > 0 else torch.eye(c, dtype=torch.float64)[0]  # all rows equal
    u = u / u.norm()
    if u[torch.argmax(u.abs())] < 0:  # argmax returns the first of tied maxima
        u = -u
    return u.to(x.dtype if x.is_floating_point() else torch.float64)


def principal_masks(tokens: torch.Tensor, threshold: float = 0.4, coverage: float = 0.95,
                    direction: Callable[[torch.Tensor], torch.Tensor] = first_principal_direction,
                    max_masks: int = 254) -> torch.Tensor:
    """Soft principal masks (N, h, w) with disjoint supports of one image's raw tokens (C, h, w).

    The loop of §2, in float32 like the original: ``u = direction(raw tokens of uncovered
    positions)`` (its sign is part of the argument: the anchor is taken on the +u side); anchor =
    the L2-normalised token most aligned with u, first in raster order; mask = cosine to the anchor
    with covered positions zeroed, values below ``threshold·max`` zeroed, divided by the max (so a
    mask's values lie in [threshold, 1]). Stops when at least ``coverage`` of the positions are
    covered, when the covered set has not changed over the last three masks (the original's
    stagnation guard, checked from the 4th mask on as there), or at ``max_masks`` masks.

    Guards (the original can produce NaN there): the anchor is chosen among *uncovered* positions
    only — the same anchor as the original whenever some uncovered token has a positive cosine to
    +u, and in the §7.4 case (all ≤ 0) the least negative uncovered token instead of a covered
    one; an anchor whose token is all zeros (cosine undefined) gets a mask of itself alone. Each
    iteration thus covers at least its anchor. ``max_masks`` is not in the original (which has no
    cap): ids 1..254 must fit the uint8 proposal map next to 255.

    Faithful solver: ``direction=lambda x: torch.pca_lowrank(x, q=3, niter=100)[2][:, 0]`` (it
    draws from torch's global RNG).
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens (C, h, w), got shape {tuple(tokens.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], not {threshold}")
    if max_masks < 0:
        raise ValueError(f"max_masks must be ≥ 0, not {max_masks}")
    c, h, w = tokens.shape
    f = tokens.detach().to(torch.float32).reshape(c, h * w)  # (C, P) raw
    fn = F.normalize(f, dim=0)  # cosine per position; all-zero tokens stay zero
    free = torch.ones(h * w, dtype=torch.bool, device=f.device)
    masks: list[torch.Tensor] = []
    history: list[torch.Tensor] = []
    while (~free).sum().item() / free.numel() < coverage and len(masks) < max_masks:
        u = direction(f[:, free].T).to(device=f.device, dtype=torch.float32)
        s = (u @ fn).masked_fill(~free, float("-inf"))  # original: covered → 0 (see docstring)
        anchor = int(torch.argmax(s))  # first maximum in raster order
        s = (fn[:, anchor] @ fn).masked_fill(~free, 0.0)
        top = s.max()
        if top > 0:
            s = torch.where(s < threshold * top, torch.zeros_like(s), s) / top
        else:  # zero-norm anchor token: no cosine to anyone
            s = torch.zeros_like(s)
            s[anchor] = 1.0
        masks.append(s.reshape(h, w))
        free &= ~(s > 0)
        history.append(free.clone())
        if len(history) > 3:  # stagnation guard: never fires here (each mask covers its anchor)
            history.pop(0)
            if all(torch.equal(history[0], m) for m in history[1:]):
                break
    if not masks:
        return torch.zeros(0, h, w, dtype=torch.float32, device=f.device)
    return torch.stack(masks)


def median_filter3x3(masks: torch.Tensor) -> torch.Tensor:
    """(N, h, w) → (N, h, w): 3×3 median per mask, stride 1, reflect padding (needs h, w ≥ 2),
    as the original's ``MedianPool2d(3, 1, padding=1)``. Nine values, so the median is exact."""
    if masks.ndim != 3:
        raise ValueError(f"expected masks (N, h, w), got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return masks.clone()
    x = F.pad(masks[None], (1, 1, 1, 1), mode="reflect")[0]  # (N, h+2, w+2)
    windows = x.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, h, w, 3, 3)
    return windows.reshape(*masks.shape, 9).median(dim=-1).values


def proposal_log_probs(masks: torch.Tensor, gain: float = 10.0) -> torch.Tensor:
    """(N, h, w) soft masks → (N+1, h, w) log-probabilities of [background, mask 1..N].

    M = clip(gain · median3x3(masks), 0, 1) (binary for masks valued in [0.4, 1]); background =
    clip(mean(M[M > 0]) − Σ_k M_k, 0, 1), i.e. 1 where no mask survives; log_softmax over channels.
    If no mask survives the filter (or N = 0), the original's mean of nothing is NaN; here the
    background is then 1 everywhere.
    """
    m = (gain * median_filter3x3(masks.detach().to(torch.float32))).clamp(0.0, 1.0)
    positive = m[m > 0]
    level = positive.mean() if positive.numel() else torch.tensor(1.0, device=m.device)
    bg = (level - m.sum(dim=0)).clamp(0.0, 1.0)
    return F.log_softmax(torch.cat([bg[None], m]), dim=0)


def proposal_ids(image: np.ndarray, log_probs: torch.Tensor, crf: Callable = dense_crf) -> np.ndarray:
    """uint8 RGB image (H, W, 3) and (N+1, h, w) log-probs → (H, W) uint8 mask ids 1..N, 255 where
    the background channel (0) wins after the CRF.

    The log-probs are bilinearly upsampled to (H, W) with ``align_corners=False``, as the
    original's (STEGO's) ``dense_crf`` does, then softmaxed; ``crf(image, probs (C, H, W))`` returns
    refined marginals whose argmax is taken. ``crf`` is injectable (tests run without pydensecrf).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if log_probs.ndim != 3 or not 1 <= log_probs.shape[0] <= NO_MASK:
        raise ValueError(f"expected (N+1, h, w) log-probs with N ≤ 254, got shape {tuple(log_probs.shape)}")
    size = image.shape[:2]
    up = F.interpolate(log_probs.detach().to(torch.float32)[None], size=size, mode="bilinear", align_corners=False)[0]
    probs = up.softmax(dim=0).cpu().numpy()
    label = np.asarray(crf(image, probs)).argmax(axis=0)
    ids = label.astype(np.uint8)
    ids[label == 0] = NO_MASK
    return ids


def proposal_masks_for_image(tokens: torch.Tensor, image: np.ndarray, threshold: float = 0.4,
                             direction: Callable[[torch.Tensor], torch.Tensor] = first_principal_direction,
                             crf: Callable = dense_crf, *, coverage: float = 0.95, gain: float = 10.0,
                             max_masks: int = 254) -> np.ndarray:
    """The proposal map (H, W) uint8 of one image (§2): tokens (C, h, w) and its uint8 RGB crop
    (H, W, 3) → :func:`principal_masks` → :func:`proposal_log_probs` → :func:`proposal_ids`."""
    masks = principal_masks(tokens, threshold=threshold, coverage=coverage, direction=direction, max_masks=max_masks)
    return proposal_ids(image, proposal_log_probs(masks, gain=gain), crf=crf)


def majority_labels(teacher: torch.Tensor, ids: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """E-step: pseudo labels (B, H, W) long from the teacher's class predictions (B, H, W) and the
    proposal ids (B, H, W) in 0..255 (255 = no mask).

    Every pixel of mask m of image b gets the most frequent teacher class over that mask; pixels
    with id 255 get ``ignore``. Ties go to the smallest class (what the original's ``torch.mode``
    returns on CPU; here by a bincount and the first maximum, deterministic on any device).
    """
    if teacher.shape != ids.shape or teacher.ndim != 3:
        raise ValueError(f"expected teacher and ids of the same (B, H, W) shape, got {tuple(teacher.shape)}, {tuple(ids.shape)}")
    t, m = teacher.long(), ids.long()
    if t.numel() == 0:
        return t.clone()
    if t.min() < 0:
        raise ValueError("teacher classes must be ≥ 0")
    if m.min() < 0 or m.max() > NO_MASK:
        raise ValueError("mask ids must lie in 0..255")
    b, k = t.shape[0], int(t.max()) + 1
    valid = m != NO_MASK
    batch = torch.arange(b, device=t.device).view(b, 1, 1).expand_as(t)
    key = ((batch * 256 + m) * k + t)[valid]
    counts = torch.bincount(key, minlength=b * 256 * k).view(b, 256, k)
    mode = counts.argmax(dim=-1)  # (B, 256): first maximum → smallest class on ties
    out = mode.gather(1, m.reshape(b, -1)).view_as(t)
    return torch.where(valid, out, torch.full_like(out, ignore))


def class_weighted_ce(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore: int = 255,
                      *, count_ignored: bool = True) -> torch.Tensor:
    """M-step loss (§3, §7.7; the original's "FocalLoss"): logits (B, K, H, W), target (B, H, W).

    w_k = (1 − mean over all B·H·W pixels of softmax(logits)_k)^γ, detached (ignored pixels count
    in the mean too); loss = Σ_pixels [target ≠ ignore] · w_target · CE / (B·H·W): ignored pixels
    count in the denominator [QUIRK: the original's ``reduction="none"`` then ``.mean()``];
    ``count_ignored=False`` divides by the number of supervised pixels instead.
    """
    if logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected logits (B, K, ...) and target (B, ...), got {tuple(logits.shape)}, {tuple(target.shape)}")
    with torch.no_grad():
        p = logits.detach().softmax(dim=1)
        dims = (0,) + tuple(range(2, p.ndim))
        weight = (1.0 - p.mean(dim=dims)) ** gamma
    ce = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore, reduction="none")  # 0 where ignored
    if count_ignored:
        return ce.mean()
    return ce.sum() / (target != ignore).sum().clamp(min=1)


def ema_decay(n: int, beta: float = 0.98) -> float:
    """Decay d of the n-th EMA update θ_M ← d·θ_M + (1 − d)·θ_R (n ≥ 1), §3.

    0 (a hard copy) for n ≤ 2, else min(1 − 1/n, beta): reaches 0.98 at n = 50. In the original
    (ema-pytorch, ``update_after_step=0``) the 1st call copies; the 2nd copies (first "initted"
    update) and then averages with d = 1/2 — a no-op after the copy, so effectively d = 0. A
    ``beta`` of exactly 0 or 1 is used as the decay itself from n = 3 on, as the original does
    [QUIRK: beta = 1 freezes the teacher after the copies].
    """
    if n < 1:
        raise ValueError(f"EMA updates are counted from 1, not {n}")
    if n <= 2:
        return 0.0
    if beta in (0.0, 1.0):
        return float(beta)
    return float(max(0.0, min(1.0 - 1.0 / n, beta)))
