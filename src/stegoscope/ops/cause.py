"""CAUSE (Kim, Lee, Ro; Pattern Recognition 2024; reference ``successors/cause.md``): the grid
sub-sampler, the concept clusterbook's assignment and modularity objective, the concept-wise
InfoNCE with its per-concept FIFO bank, and the draws of every random quantity, as pure functions.

- Grid sub-sampling (§1): one token per non-overlapping window×window tile, the offset inside the
  tile injected as ``order`` (:func:`draw_grid_order`, :func:`grid_sample`).
- Clusterbook (§2.1): stored raw, a token's concept is argmax_k cos(x, c_k) (:func:`concept_index`);
  fitted by the differentiable graph modularity of §3.1 (:func:`modularity_loss`), which also fits
  step 3's cluster probe.
- Frontdoor loss (§3.2): positives / negatives by concept-to-concept cosine, in-batch and against
  the bank (:func:`concept_infonce`). Bank (§3.3): one FIFO queue of teacher projections per concept,
  held as fixed-size rings so that an update is one vectorised write (:class:`ConceptBank`,
  :func:`bank_update`, :func:`bank_entries`).
- Randomness (§7): every draw is an argument of the math; the ``draw_*``, ``dropout_mask`` and
  ``init_*`` helpers draw it on the CPU from an explicit ``torch.Generator`` (device-independent
  streams), then move it.

The functions used inside a training step (grid_sample, concept_index, modularity_loss,
concept_infonce, bank_update, bank_entries) do no host synchronisation: no ``.item()``, no boolean
indexing, no branch on a tensor's value — only on shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_PRODUCT_BUDGET = 1 << 26  # elements of one chunk of modularity_loss's (B, N, N, K) product tensor


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


# --- grid sub-sampling (§1) ----------------------------------------------------------------------

def draw_grid_order(batch: int, h: int, w: int, generator: torch.Generator, window: int = 4) -> torch.Tensor:
    """(batch·⌊h/window⌋·⌊w/window⌋,) int64 offsets in [0, window²), drawn uniformly from
    ``generator`` (the original's ``torch.randint``) on its device: a training step draws on the
    GPU, with no host copy to wait for."""
    n = batch * (h // window) * (w // window)
    return torch.randint(0, window * window, (n,), generator=generator, dtype=torch.int64, device=generator.device)


def grid_sample(x: torch.Tensor, h: int, w: int, order: torch.Tensor, window: int = 4) -> torch.Tensor:
    """x (B, h·w, C) in raster order → (B, nh·nw, C), one token per window, windows in raster order.

    Window (i, j) of image b keeps x[b, (window·i + o // window)·w + (window·j + o % window)] with
    o = order[b·nh·nw + i·nw + j], nh = ⌊h/window⌋, nw = ⌊w/window⌋. [QUIRK] When h or w is not a
    multiple of ``window`` the last rows / columns are never sampled (DINOv2's 23×23 → 5×5 never
    reaches rows and columns 20–22), as in the original.
    """
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"expected x (B, {h}·{w}, C), got shape {tuple(x.shape)}")
    b = x.shape[0]
    nh, nw = h // window, w // window
    if order.shape != (b * nh * nw,):
        raise ValueError(f"expected order of shape ({b * nh * nw},), got {tuple(order.shape)}")
    o = order.to(device=x.device, dtype=torch.int64).view(b, nh, nw)
    rows = window * torch.arange(nh, device=x.device).view(1, nh, 1) + o // window
    cols = window * torch.arange(nw, device=x.device).view(1, 1, nw) + o % window
    index = (rows * w + cols).view(b, nh * nw, 1).expand(b, nh * nw, x.shape[2])
    return x.gather(1, index)


# --- clusterbook (§2.1, §3.1) --------------------------------------------------------------------

def concept_index(x: torch.Tensor, clusterbook: torch.Tensor) -> torch.Tensor:
    """(..., C) tokens and the raw (K, C) clusterbook → (...) int64 q(x) = argmax_k cos(x, c_k).

    Cosine, not dot product: the stored entries are raw (§2.1, §8) and their norms must not decide.
    Ties go to the smallest k (argmax's first maximum).
    """
    if x.shape[-1] != clusterbook.shape[-1] or clusterbook.ndim != 2:
        raise ValueError(f"expected tokens (..., C) and a (K, C) clusterbook, got {tuple(x.shape)}, {tuple(clusterbook.shape)}")
    book = clusterbook.detach().to(x.dtype)
    return (_normalize(x.detach()) @ _normalize(book).T).argmax(dim=-1)


def modularity_loss(x: torch.Tensor, centroids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """−mean_b trace_b, the differentiable modularity of §3.1 on grid-sampled tokens x (B, N, C).

    x is detached (only ``centroids`` (K, C) receive a gradient); per image, with x̂, ĉ row-normalised:
    A = relu(x̂ x̂ᵀ) with a zero diagonal, d = A·1, e = 1ᵀA1, W = A − d dᵀ/e, M = relu(x̂ ĉᵀ),
    Δ_ij = max_k tanh(M_ik M_jk / τ), trace_b = Σ_ij W_ij Δ_ji / e (the diagonal i = j included).

    Memory: tanh is increasing, so max_k tanh(y_k) = tanh(max_k y_k) with the same maximising k.
    The maximiser of M_ik M_jk is found without autograd, K in chunks (a running max over at most
    ``_PRODUCT_BUDGET`` elements at a time), and only the chosen products are recomputed with a
    gradient: the value and the gradient are those of the full B·N²·K tensor (the gradient goes to
    one maximiser, the first k on exact ties, like ``max(dim)``), the memory is B·N² + one chunk.
    N = 1 gives e = 0 and a NaN loss, as in the original.
    """
    if x.ndim != 3 or centroids.ndim != 2 or x.shape[2] != centroids.shape[1]:
        raise ValueError(f"expected x (B, N, C) and centroids (K, C), got {tuple(x.shape)}, {tuple(centroids.shape)}")
    b, n, _ = x.shape
    k = centroids.shape[0]
    xh = _normalize(x.detach().to(centroids.dtype))
    ch = _normalize(centroids)
    a = torch.relu(xh @ xh.transpose(1, 2))
    a = a * (1.0 - torch.eye(n, dtype=a.dtype, device=a.device))
    d = a.sum(dim=2)  # (B, N)
    e = d.sum(dim=1)  # (B,) = 2m
    wmat = a - d[:, :, None] * d[:, None, :] / e[:, None, None]
    m = torch.relu(xh @ ch.T)  # (B, N, K), carries the gradient
    with torch.no_grad():
        md = m.detach()
        best = torch.full((b, n, n), -1.0, dtype=md.dtype, device=md.device)  # products are ≥ 0
        arg = torch.zeros((b, n, n), dtype=torch.int64, device=md.device)
        step = max(1, _PRODUCT_BUDGET // max(1, b * n * n))
        for start in range(0, k, step):  # over shapes only: no host sync
            part = md[:, :, None, start:start + step] * md[:, None, :, start:start + step]
            value, index = part.max(dim=3)
            better = value > best  # strict: an earlier chunk keeps exact ties
            best = torch.where(better, value, best)
            arg = torch.where(better, index + start, arg)
    mi = m.gather(2, arg)  # [b, i, j] = M[b, i, arg_ij]
    mj = m.gather(2, arg.transpose(1, 2)).transpose(1, 2)  # [b, i, j] = M[b, j, arg_ij]
    delta = torch.tanh(mi * mj / temperature)
    trace = (wmat * delta.transpose(1, 2)).sum(dim=(1, 2)) / e
    return -trace.mean()


# --- concept-wise InfoNCE (§3.2) -----------------------------------------------------------------

def _positive_pair_terms(zh: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, vk: torch.Tensor, allowed: torch.Tensor,
                         temperature: float, pos_threshold: float, neg_threshold: float,
                         batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (sum of ℓ over its positive pairs (B,), number of its positive pairs (B,)).

    zh (R, P) normalised anchors, keys (S, P) normalised constants, v (R, C) / vk (S, C) concept
    vectors, allowed (R, S) or (1, S) bool: pairs that may be positive or negative at all.
    """
    s = zh @ keys.T / temperature
    g = v @ vk.T
    pos = (g > pos_threshold) & allowed
    cand = pos | ((g < neg_threshold) & allowed)  # [Pos ∨ Neg]; pairs between the thresholds drop out
    # Stability: subtract the detached max over the candidates (it cancels); logits of non-candidates
    # become −inf so their exp is 0 with a 0 gradient, and a row without candidates (it has no
    # positives either) gets a denominator of 1 instead of log 0.
    masked = s.masked_fill(~cand, float("-inf"))
    top = masked.detach().amax(dim=1, keepdim=True) if s.shape[1] else s.new_zeros(s.shape[0], 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    denom = torch.exp(masked - top).sum(dim=1, keepdim=True)
    log_denom = torch.log(torch.where(denom > 0, denom, torch.ones_like(denom)))
    loss = torch.where(pos, log_denom - (s - top), torch.zeros_like(s))  # ℓ_ij = −S_ij + log Σ_j' …
    sums = loss.sum(dim=1).view(batch, -1).sum(dim=1)
    counts = pos.sum(dim=1).view(batch, -1).sum(dim=1)
    return sums, counts


def concept_infonce(z: torch.Tensor, zbar: torch.Tensor, concepts: torch.Tensor, bank_z: torch.Tensor | None = None,
                    bank_concepts: torch.Tensor | None = None, bank_valid: torch.Tensor | None = None,
                    temperature: float = 0.07, pos_threshold: float = 0.3, neg_threshold: float = 0.1,
                    count_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_front, n_empty) of §3.2: the concept-wise InfoNCE of student projections against teacher ones.

    z (B, N, P) student projections (the only input that gets a gradient); zbar (B, N, P) teacher
    projections and ``concepts`` (B, N, C) the normalised concept vector ĉ_{q(f)} of each token, both
    constants; the bank: bank_z (M, P) raw teacher projections, bank_concepts (M, C) normalised
    concept vectors, bank_valid (M,) bool (slots that hold an entry), as :func:`bank_entries` gives.

    Over all B·N rows: S = ẑ ẑ̄ᵀ/τ, G = v vᵀ, Pos = G > pos_threshold, Neg = G < neg_threshold, the
    self pair (same row) in neither (its G is 1: it would be a positive); ℓ_ij = −S_ij + log Σ_j'
    [Pos ∨ Neg]_ij' exp(S_ij'); T_a = the flat mean of ℓ over the positive pairs whose anchor is in
    image a. The bank term T'_a is the same against the valid bank slots (no self pair).
    L = (Σ_a T_a + Σ_a T'_a) / (2B) if the bank has a valid slot, else Σ_a T_a / B — chosen on the
    device, so an all-invalid bank is exactly no bank (n_empty included).

    [QUIRK] count_empty=True: a term without positive pairs (NaN in the original) contributes 0 —
    no NaN in the loss or the gradient — and still counts in the divisor B or 2B. count_empty=False
    divides by the number of terms that have positives instead (at least 1). n_empty (a 0-d int64
    tensor) counts the terms without positives, in-batch and (when the bank counts) bank.
    """
    if z.ndim != 3 or zbar.shape != z.shape or concepts.shape[:2] != z.shape[:2]:
        raise ValueError(f"expected z, zbar (B, N, P) and concepts (B, N, C), got {tuple(z.shape)}, {tuple(zbar.shape)}, "
                         f"{tuple(concepts.shape)}")
    b, n, _ = z.shape
    zh = _normalize(z.reshape(b * n, -1))
    keys = _normalize(zbar.detach().reshape(b * n, -1).to(zh.dtype))
    v = concepts.detach().reshape(b * n, -1).to(zh.dtype)
    not_self = ~torch.eye(b * n, dtype=torch.bool, device=z.device)
    sums, counts = _positive_pair_terms(zh, keys, v, v, not_self, temperature, pos_threshold, neg_threshold, b)
    terms = sums / counts.clamp_min(1)
    has = counts > 0
    loss = terms.sum() / (b if count_empty else has.sum().clamp_min(1))
    n_empty = (~has).sum()
    if bank_z is None or bank_z.shape[0] == 0:  # a shape, not a value: no host sync
        return loss, n_empty
    if bank_concepts is None or bank_valid is None or bank_concepts.shape[0] != bank_z.shape[0] or bank_valid.shape != bank_z.shape[:1]:
        raise ValueError("bank_z, bank_concepts and bank_valid must be given together, with the same number of rows")
    valid = bank_valid.to(device=z.device, dtype=torch.bool)
    bank_keys = _normalize(bank_z.detach().to(device=z.device, dtype=zh.dtype))
    bank_v = bank_concepts.detach().to(device=z.device, dtype=zh.dtype)
    bsums, bcounts = _positive_pair_terms(zh, bank_keys, v, bank_v, valid[None, :], temperature, pos_threshold, neg_threshold, b)
    bterms = bsums / bcounts.clamp_min(1)
    bhas = bcounts > 0
    divisor = 2 * b if count_empty else (has.sum() + bhas.sum()).clamp_min(1)
    with_bank = (terms.sum() + bterms.sum()) / divisor
    any_valid = valid.any()
    loss = torch.where(any_valid, with_bank, loss)
    n_empty = n_empty + torch.where(any_valid, (~bhas).sum(), torch.zeros_like(n_empty))
    return loss, n_empty


# --- the bank (§3.3) -----------------------------------------------------------------------------

class ConceptBank(NamedTuple):
    """One FIFO queue per concept as a ring of Q slots: the j-th entry ever appended to queue k sits
    in slot j % Q, so the queue's newest min(count_k, Q) entries are the filled slots."""

    z: torch.Tensor  # (K, Q, P) raw teacher projections
    count: torch.Tensor  # (K,) int64 entries ever appended to each queue


def bank_init(k: int, size: int, dim: int, device=None) -> ConceptBank:
    """K empty queues of ``size`` slots (Q = 100 in the original) of ``dim``-d float32 projections."""
    return ConceptBank(torch.zeros(k, size, dim, dtype=torch.float32, device=device), torch.zeros(k, dtype=torch.int64, device=device))


def draw_bank_keys(m: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of 0..m−1 drawn from ``generator`` on its device: :func:`bank_update`'s keys."""
    return torch.randperm(m, generator=generator, device=generator.device)


def bank_update(bank: ConceptBank, concepts: torch.Tensor, zbar: torch.Tensor, keys: torch.Tensor) -> ConceptBank:
    """The bank after one step's update (§3.3); ``bank`` itself is left as it was.

    concepts (M,) int64 concept of each row in (b, n) raster order, zbar (M, P) the pre-update, raw
    teacher projections, keys (M,) a permutation of 0..M−1. For every concept k: its rows in ascending
    key order (the original's random per-concept permutation, here derived from one permutation),
    the first ⌊n_k/2⌋ of them (a singleton is dropped) appended to queue k, which keeps its newest Q.

    Vectorised: rows are sorted by (concept, key); a row's rank r within its concept makes it the
    (count_k + r)-th entry of queue k, stored in slot (count_k + r) % Q. Of one update only the newest
    Q appended rows of a concept are written (older ones would be overwritten anyway), so the
    written slots are distinct; rows that are not written go to distinct scratch rows past the bank.
    """
    k, q, p = bank.z.shape
    m = concepts.shape[0]
    if concepts.shape != (m,) or zbar.shape != (m, p) or keys.shape != (m,):
        raise ValueError(f"expected concepts (M,), zbar (M, {p}) and keys (M,), got {tuple(concepts.shape)}, {tuple(zbar.shape)}, "
                         f"{tuple(keys.shape)}")
    if m == 0:
        return ConceptBank(bank.z.clone(), bank.count.clone())
    device = bank.z.device
    c = concepts.to(device=device, dtype=torch.int64)
    order = torch.argsort(c * m + keys.to(device=device, dtype=torch.int64))  # unique keys: no ties
    cs = c[order]
    n_k = torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, c, torch.ones_like(c))  # bincount syncs on CUDA
    start = torch.cumsum(n_k, 0) - n_k
    rank = torch.arange(m, device=device) - start[cs]
    appended = n_k // 2
    count = bank.count.to(device)
    write = (rank < appended[cs]) & (rank >= appended[cs] - q)
    slot = cs * q + (count[cs] + rank) % q
    target = torch.where(write, slot, k * q + torch.arange(m, device=device))  # all distinct
    buffer = torch.cat([bank.z.reshape(k * q, p), bank.z.new_zeros(m, p)])
    buffer.index_copy_(0, target, zbar.detach()[order.to(zbar.device)].to(device=device, dtype=bank.z.dtype))
    return ConceptBank(buffer[:k * q].view(k, q, p), count + appended)


def bank_entries(bank: ConceptBank, clusterbook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank_z (K·Q, P) raw, bank_concepts (K·Q, C) the normalised clusterbook row of each slot's
    queue, bank_valid (K·Q,) bool: slot i of queue k holds an entry iff i < min(count_k, Q)).

    Slots are in ring order, not oldest-first as the original's concatenation: the loss sums over
    entries, so their order does not matter (up to float summation order).
    """
    k, q, p = bank.z.shape
    if clusterbook.ndim != 2 or clusterbook.shape[0] != k:
        raise ValueError(f"expected a ({k}, C) clusterbook, got {tuple(clusterbook.shape)}")
    vectors = _normalize(clusterbook.detach().to(bank.z.device))
    concepts = vectors[:, None, :].expand(k, q, vectors.shape[1]).reshape(k * q, -1)
    valid = torch.arange(q, device=bank.z.device)[None, :] < bank.count.clamp_max(q)[:, None]
    return bank.z.reshape(k * q, p), concepts, valid.reshape(k * q)


# --- the other draws (§7) ------------------------------------------------------------------------

def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``generator``: a training loop's per-step
    draws (grid orders, dropout masks, bank keys) then happen where the step runs."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


def dropout_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Element-wise dropout keep-mask (``nn.Dropout``, not Dropout2d): 1/(1−p) with probability 1−p,
    else 0, drawn from ``generator``, float32 on its device (TR's attention masks are B·N² a pass:
    drawn on the host they would leave the GPU waiting). p = 0 gives all ones."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), not {p}")
    keep = torch.rand(shape, generator=generator, device=generator.device) >= p  # rand ∈ [0, 1): p = 0 keeps everything
    return keep.to(torch.float32) / (1.0 - p)


def init_clusterbook(k: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """The clusterbook's init (§2.1): (K, C) float32 U(−1/K, +1/K)."""
    return torch.empty(k, channels, dtype=torch.float32).uniform_(-1.0 / k, 1.0 / k, generator=generator)


def init_cluster_probe(n_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """The cluster probe's init (§2.6): (n_classes, dim) float32 U(−1/n_classes, +1/n_classes)."""
    return torch.empty(n_classes, dim, dtype=torch.float32).uniform_(-1.0 / n_classes, 1.0 / n_classes, generator=generator)
