"""Dataset readers (one module per dataset) and the torch view used by extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DatasetError, SegmentationDataset
from .directory import DirectoryDataset
from .synthetic import SyntheticDataset, write_synthetic
from .transforms import transform_image, transform_label

DATASETS: dict[str, type[SegmentationDataset]] = {
    "directory": DirectoryDataset,
    "synthetic": SyntheticDataset,
}


def open_dataset(name: str, root: Path, split: str, n_classes: int | None = None) -> SegmentationDataset:
    """The reader of dataset ``name`` for one split under ``root``."""
    if name not in DATASETS:
        raise DatasetError(name, f"unknown dataset; choose one of {', '.join(sorted(DATASETS))}")
    if name == "directory":
        return DirectoryDataset(root, split, n_classes=n_classes)
    return DATASETS[name](root, split)


class ExtractionDataset(torch.utils.data.Dataset):
    """Decoded, resized and centre-cropped samples (runs in DataLoader workers).

    Returns uint8 pixels; normalisation happens on the compute device.
    """

    def __init__(self, dataset: SegmentationDataset, res: int, interpolation: str, indices: list[int]):
        self.dataset, self.res, self.interpolation, self.indices = dataset, res, interpolation, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = self.indices[i]
        pixels = transform_image(self.dataset.image(index), self.res, self.interpolation)
        label = self.dataset.label(index)
        label = transform_label(label, self.res) if label is not None else np.full((self.res, self.res), -1, np.int16)
        return {"index": torch.tensor(index), "pixels": torch.from_numpy(pixels.copy()), "label": torch.from_numpy(label.copy())}


__all__ = [
    "DATASETS", "DatasetError", "DirectoryDataset", "ExtractionDataset", "SegmentationDataset",
    "SyntheticDataset", "open_dataset", "write_synthetic",
]
