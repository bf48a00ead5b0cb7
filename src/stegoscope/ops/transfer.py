"""Host → device copies that do not make the host wait."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: on CUDA through pinned memory,
    copied asynchronously (torch's caching host allocator keeps the pinned block alive until the
    copy is done); unchanged where it already is."""
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or t.device == device:
        return t if t.device == device else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
