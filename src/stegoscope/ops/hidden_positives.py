"""HP's losses ("Leveraging Hidden Positives", Seong et al. CVPR 2023; spec ``successors/hp.md`` §2–3).

HP replaces STEGO's correlation loss by a supervised-contrastive loss over every patch of the
batch whose positives are "hidden positives": pairs whose similarity exceeds the smaller of the two
patches' thresholds, a patch's threshold being its best similarity to a reference pool of random
patches. Task-agnostic positives come from the (dropped-out, frozen) backbone tokens, task-specific
ones, weighted by a ramp λ, from the EMA head's codes. The loss is computed again on a locally mixed
code (each patch's code averaged over its 3×3 neighbourhood with weights from the last-layer
self-attention, so gradients reach the neighbours), and a consistency term ties the projection to
that of a photometrically augmented view.

Faithful to the original code, quirks included:

* the Bernoulli(ρ) random-negative draw is one (P, B·P) matrix reused for every anchor-image block
  [QUIRK];
* task-specific positives weight the numerator but are not in the denominator set [QUIRK];
* anchors without a task-agnostic positive are dropped even when they have task-specific ones
  [QUIRK];
* the local weights re-softmax the pre-softmax attention logits after a quantile clamp [QUIRK].

Everything random (dropout, pools, the negative draw) is an argument; nothing is drawn here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# (dy, dx) of a 3×3 window in raster order; index 4 is the patch itself.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile q of the last dim, linear interpolation (torch.quantile's default), keepdim.
    Sort-based because torch.quantile refuses inputs above 2**24 elements (B×784×784 is larger)."""
    n = x.shape[-1]
    v = x.sort(dim=-1).values
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return v[..., lo:lo + 1] + frac * (v[..., hi:hi + 1] - v[..., lo:lo + 1])


def _neighbour_index(grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(h·w, 9) flat index of each patch's neighbours (clamped into the grid) and whether in grid."""
    h, w = grid
    y = torch.arange(h, device=device).view(h, 1, 1)
    x = torch.arange(w, device=device).view(1, w, 1)
    off = torch.tensor(NEIGHBOUR_OFFSETS, device=device)
    ny, nx = y + off[:, 0], x + off[:, 1]  # (h, w, 9)
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    idx = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)
    return idx.reshape(h * w, 9), valid.reshape(h * w, 9)


def attention_neighbour_weights(attn_logits: torch.Tensor, grid: tuple[int, int], prefix: int = 1,
                                sigma: float = 28.0, clip: tuple[float, float] = (0.1, 0.9)) -> torch.Tensor:
    """Last-layer pre-softmax attention logits (B, heads, T, T), T = prefix + h*w (prefix = CLS plus any
    register tokens, dropped from rows and columns) -> (B, h, w, 9) local-positive weights: head mean ->
    per-row clamp to the row's [q10, q90] quantiles -> softmax over the h*w keys -> × sigma -> entries below
    the row mean set to 0 -> the 9 entries of each patch's 3x3 neighbourhood (NEIGHBOUR_OFFSETS order), 0
    where the neighbour falls outside the grid."""
    h, w = grid
    b, _, t, t2 = attn_logits.shape
    if t != t2 or t != prefix + h * w:
        raise ValueError(f"attention of {t}×{t2} tokens does not match prefix {prefix} + grid {h}×{w}")
    # [QUIRK] pre-softmax logits, re-softmaxed after clamping (spec §8); float32 like the original.
    a = attn_logits[:, :, prefix:, prefix:].float().mean(dim=1)  # (B, hw, hw)
    a = torch.maximum(torch.minimum(a, _row_quantile(a, clip[1])), _row_quantile(a, clip[0]))
    a = a.softmax(dim=-1) * sigma
    a = a.masked_fill(a < a.mean(dim=-1, keepdim=True), 0.0)  # row mean = sigma / hw
    idx, valid = _neighbour_index(grid, a.device)
    out = a.gather(2, idx.unsqueeze(0).expand(b, -1, -1)) * valid
    return out.reshape(b, h, w, 9)


def neighbour_mix(code: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """code (B, D, h, w), weights (B, h, w, 9) -> (B, D, h, w): m_i = (1/|N(i)|) Σ_{j∈N(i)} w_ij · s_j with
    |N(i)| the number of in-grid neighbours incl. self (4 corner, 6 edge, 9 interior). Gradients flow into
    the neighbours' codes."""
    _, _, h, w = code.shape
    if weights.shape[1:] != (h, w, 9):
        raise ValueError(f"weights {tuple(weights.shape)} do not match a {h}×{w} grid")
    weights = weights.to(code.dtype)
    padded = F.pad(code, (1, 1, 1, 1))  # out-of-grid neighbours read 0
    mixed = torch.zeros_like(code)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        mixed = mixed + weights[..., k].unsqueeze(1) * padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    # |N(i)| = (in-grid rows) × (in-grid columns) of the 3×3 window
    rows = 3 - (torch.arange(h, device=code.device) == 0).int() - (torch.arange(h, device=code.device) == h - 1).int()
    cols = 3 - (torch.arange(w, device=code.device) == 0).int() - (torch.arange(w, device=code.device) == w - 1).int()
    count = (rows.view(h, 1) * cols.view(1, w)).to(code.dtype)
    return mixed / count


def pool_thresholds(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """x (N, C) and pool (S, C), both already L2-normalised -> (N,) max similarity of each row to the pool."""
    chunk = max(1, 2 ** 26 // max(1, pool.shape[0]))  # keep each (chunk, S) similarity block modest
    return torch.cat([(x[i:i + chunk] @ pool.T).amax(dim=1) for i in range(0, x.shape[0], chunk)])


def lambda_ramp(step: int, warmup: int, total: int) -> float:
    """λ(t) of the task-specific positives: 0 for t ≤ warmup, else (t − warmup)/(total − warmup) (clipped to 1)."""
    if step <= warmup:
        return 0.0
    if total <= warmup:  # degenerate schedule: full weight straight after warm-up
        return 1.0
    return min(1.0, (step - warmup) / (total - warmup))


def _pair_mask(sim: torch.Tensor, r_rows: torch.Tensor, r_all: torch.Tensor, self_cols: torch.Tensor) -> torch.Tensor:
    """(P, N) hidden positives of a block: sim above the anchor's or the partner's threshold, no self."""
    mask = (sim > r_rows.unsqueeze(1)) | (sim > r_all.unsqueeze(0))
    mask[torch.arange(sim.shape[0], device=sim.device), self_cols] = False
    return mask


def _block_loss(z: torch.Tensor, z_mix: torch.Tensor, feats: torch.Tensor, ema: torch.Tensor, r: torch.Tensor,
                r_ema: torch.Tensor, random_negatives: torch.Tensor, first: int, stop: int, lam: float, tau: float,
                base_temperature: float, reweighting: bool) -> torch.Tensor:
    """Σ_b (L_b + L^mix_b) over the anchor blocks first … stop − 1 (block b: rows b·P … b·P + P − 1 of
    the flat (N, ·) inputs), computed together; every mean and ω stays per block."""
    p = random_negatives.shape[0]
    k = stop - first
    rows = slice(first * p, stop * p)
    self_cols = torch.arange(first * p, stop * p, device=z.device)
    every = torch.arange(k * p, device=z.device)
    block = every // p  # each row's block, 0 … k − 1
    with torch.no_grad():
        m_ag = _pair_mask(feats[rows] @ feats.T, r[rows], r, self_cols)
        m_sp = _pair_mask(ema[rows] @ ema.T, r_ema[rows], r_ema, self_cols)
        # [QUIRK] anchors without task-agnostic positives are dropped: masked to weight 0 rather than
        # indexed out, so no step waits for the host to learn how many are left. The original takes
        # the mean of an empty set (NaN); here a block without a kept anchor contributes 0.
        keep = m_ag.any(dim=1)
        # [QUIRK] the same ρ-draw for every block; M_sp is not part of the denominator set
        den = m_ag | random_negatives.repeat(k, 1)
        den[every, self_cols] = False
        den |= ~keep.unsqueeze(1)  # a dropped anchor's row: any finite denominator (its term is zeroed)
        weight = (m_ag.to(z.dtype) + lam * m_sp.to(z.dtype)) * keep.unsqueeze(1)
        wsum = weight.sum(dim=1)
        kept = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(0, block, keep.to(z.dtype))
        mean_w = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(0, block, wsum) / kept.clamp(min=1)
        omega = torch.where(keep, wsum / mean_w[block].clamp(min=1e-30), 0.0) if reweighting else keep.to(z.dtype)
        divisor = torch.where(keep, wsum, 1.0)
    total = z.new_zeros(())
    for x in (z, z_mix):
        logits = (x[rows] @ x.T) / tau
        # logsumexp subtracts the row max over the denominator set (float32 at least, see caller)
        lse = torch.logsumexp(logits.masked_fill(~den, float("-inf")), dim=1, keepdim=True)
        ell = (weight * (logits - lse)).sum(dim=1) / divisor
        per_block = torch.zeros(k, dtype=ell.dtype, device=z.device).index_add(0, block, omega * ell) / kept.clamp(min=1)
        total = total - (tau / base_temperature) * per_block.sum()  # blocks without a kept anchor add 0
    return total


def hidden_positive_loss(z: torch.Tensor, z_mix: torch.Tensor, feats: torch.Tensor, ema_codes: torch.Tensor,
                         pool_feats: torch.Tensor, pool_codes: torch.Tensor, random_negatives: torch.Tensor,
                         lam: float, tau: float, base_temperature: float = 0.07, reweighting: bool = True,
                         blocks_per_chunk: int = 1) -> torch.Tensor:
    """L_HP of spec §3 for one step. z, z_mix: (B, P, D) L2-normalised projections (z_mix of the neighbour-mixed
    code); feats: (B, P, C) L2-normalised (dropped-out) backbone tokens, no grad; ema_codes (B, P, D)
    L2-normalised EMA-head codes, no grad; pool_feats (S_ag, C), pool_codes (S_sp, D) normalised reference
    pools; random_negatives: (P, B*P) bool, the Bernoulli(ρ) draw shared by every anchor-image block [QUIRK];
    returns the scalar (1/(2B)) Σ_b (L_b + L^mix_b).

    Masks, thresholds, W and ω carry no gradient; only z and z_mix do. A block without any kept anchor
    contributes 0 (the divisor stays 2B). Computed in float32 (float64 inputs stay float64) with autocast
    off. Memory: one block's (P, N) matrices at a time — when a gradient is needed each block is
    checkpointed, i.e. recomputed in the backward pass instead of keeping every block's graph.
    ``blocks_per_chunk`` anchor blocks go through each kernel together (the same loss, fewer and
    larger kernels: memory grows with it)."""
    b, p, d = z.shape
    n = b * p
    if z_mix.shape != z.shape or feats.shape[:2] != (b, p) or ema_codes.shape != z.shape:
        raise ValueError(f"shapes do not match: z {tuple(z.shape)}, z_mix {tuple(z_mix.shape)}, "
                         f"feats {tuple(feats.shape)}, ema_codes {tuple(ema_codes.shape)}")
    if random_negatives.shape != (p, n):
        raise ValueError(f"random_negatives must be ({p}, {n}), not {tuple(random_negatives.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf, zmf = z.reshape(n, d).to(dtype), z_mix.reshape(n, d).to(dtype)
        with torch.no_grad():
            f = feats.detach().reshape(n, -1).to(dtype)
            e = ema_codes.detach().reshape(n, d).to(dtype)
            r = pool_thresholds(f, pool_feats.detach().to(dtype))
            r_ema = pool_thresholds(e, pool_codes.detach().to(dtype))
            neg = random_negatives.to(device=z.device, dtype=torch.bool)
        args = (f, e, r, r_ema, neg)
        opts = (lam, tau, base_temperature, reweighting)
        grad = torch.is_grad_enabled() and (zf.requires_grad or zmf.requires_grad)
        total = zf.new_zeros(())
        for first in range(0, b, max(1, blocks_per_chunk)):
            stop = min(b, first + max(1, blocks_per_chunk))
            if grad:
                total = total + checkpoint(_block_loss, zf, zmf, *args, first, stop, *opts, use_reentrant=False)
            else:
                total = total + _block_loss(zf, zmf, *args, first, stop, *opts)
    return total / (2 * b)


def consistency_loss(z: torch.Tensor, z_aug: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mean over rows of ‖z − z_aug + eps‖₂ (torch PairwiseDistance semantics), z (…, D)."""
    d = z.shape[-1]
    return F.pairwise_distance(z.reshape(-1, d), z_aug.reshape(-1, d), p=2.0, eps=eps).mean()
