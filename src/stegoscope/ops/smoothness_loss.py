"""SmooSeg's losses (``../shared/reference/successors/smooseg.md`` §2–§3), pure functions.

* :func:`prototype_scores`: cosine scores of the code against the student prototypes (on the
  detached code: only the prototypes learn from them) and against the teacher prototypes
  (detached: only the projector learns from them).
* :func:`smoothness_term`: STEGO's correlation loss turned into a smoothness prior on the
  teacher's soft assignments Π: dense over every pair of the two maps' positions (no point
  sampling), ``mean((F − b) · (1 − ⟨Π̂, Π̂'⟩))`` with no zero clamp, F the cosine affinity of the
  (dropped-out) backbone features, centred per anchor with the global mean re-added.
* :func:`data_loss`: cross-entropy of the student scores, without temperature, against the
  teacher's argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .correlation_loss import norm


def prototype_scores(code: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_s, S_t), each (B, K, h, w): cosines of code (B, D, h, w) to the K prototypes (K, D).

    S_s sees the code detached and S_t the teacher detached, so S_s trains only the student
    prototypes and S_t only what made the code (the asymmetry is in what is detached, not in two
    networks)."""
    unit = norm(code)
    s_student = torch.einsum("bdhw,kd->bkhw", unit.detach(), F.normalize(student, dim=1))
    s_teacher = torch.einsum("bdhw,kd->bkhw", unit, F.normalize(teacher.detach(), dim=1))
    return s_student, s_teacher


def dense_affinity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, h·w, h'·w') cosines between every position of map a (B, C, h, w) and of map b."""
    return torch.einsum("bcp,bcq->bpq", norm(a).flatten(2), norm(b).flatten(2))


def smoothness_term(feats_a: torch.Tensor, feats_b: torch.Tensor, assign_a: torch.Tensor, assign_b: torch.Tensor,
                    shift: float, pointwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One smoothness term and its assignment affinity A (B, h·w, h'·w').

    feats_* (B, C, h, w) are the signal features (no gradient), assign_* (B, K, h, w) the teacher
    soft assignments Π. With ``pointwise``, F is centred per anchor over its partners and the
    global mean of the uncentred F is added back (as STEGO's ``pointwise``).
    """
    with torch.no_grad():
        fd = dense_affinity(feats_a, feats_b)
        if pointwise:
            fd = fd - fd.mean(dim=2, keepdim=True) + fd.mean()
    affinity = dense_affinity(assign_a, assign_b)
    return ((fd - shift) * (1 - affinity)).mean(), affinity


def data_loss(s_student: torch.Tensor, s_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over every pixel of CE(S_s, argmax_k S_t): raw cosines as logits (no temperature),
    no ignore mask; the target carries no gradient."""
    return F.cross_entropy(s_student, s_teacher.detach().argmax(dim=1))
