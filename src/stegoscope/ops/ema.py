"""The exponential moving average every teacher of the successors follows (SmooSeg's
prototypes, HP's head, PriMaPs-EM's θ_M)."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(teacher: torch.Tensor, student: torch.Tensor, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, in place (decay 0: a copy)."""
    teacher.mul_(decay).add_(student.detach(), alpha=1 - decay)
