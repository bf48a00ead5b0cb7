"""Dataset readers (one module per dataset) and the torch view used by extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DatasetError, SegmentationDataset
from .cityscapes import Cityscapes27
from .cocostuff import Cocostuff27
from .directory import DirectoryDataset
from .potsdam import Potsdam3, PotsdamRaw
from .synthetic import SyntheticDataset, write_synthetic
from .crops import five_crop_boxes
from .transforms import transform_image, transform_label

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cocostuff27": Cocostuff27,
    "cityscapes": Cityscapes27,
    "potsdam": Potsdam3,
    "potsdamraw": PotsdamRaw,
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
    """Decoded, cropped, resized and centre-cropped samples (runs in DataLoader workers).

    ``samples[row]`` is ``(source index, crop index or None)`` of store row ``row``; ``rows`` are the
    store rows to produce. Returns uint8 pixels; normalisation happens on the compute device.
    """

    def __init__(
        self, dataset: SegmentationDataset, res: int, interpolation: str,
        samples: list[tuple[int, int | None]], rows: list[int], crop_ratio: float = 0.5,
    ):
        self.dataset, self.res, self.interpolation = dataset, res, interpolation
        self.samples, self.rows, self.crop_ratio = samples, rows, crop_ratio

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        source, crop = self.samples[row]
        image, label = self.dataset.sample(source)
        if crop is not None:
            left, top, right, bottom = five_crop_boxes(*image.size, self.crop_ratio)[crop]
            image = image.crop((left, top, right, bottom))
            label = label[top:bottom, left:right] if label is not None else None
        pixels = transform_image(image, self.res, self.interpolation)
        label = transform_label(label, self.res) if label is not None else np.full((self.res, self.res), -1, np.int16)
        return {"index": torch.tensor(row), "pixels": torch.from_numpy(pixels.copy()), "label": torch.from_numpy(label.copy())}


class _Check(torch.utils.data.Dataset):
    def __init__(self, dataset: SegmentationDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, str]:
        index = self.indices[i]
        try:
            self.dataset.sample(index)
        except DatasetError as exc:
            return index, str(exc)
        return index, ""


def find_bad_samples(dataset: SegmentationDataset, workers: int = 0, progress=None) -> dict[int, str]:
    """Every sample that cannot be read (missing file, undecodable, bad label values), by index.

    Missing files are found from the listing; the rest by decoding each sample once in
    DataLoader workers. ``progress(n)`` is called as samples are checked.
    """
    bad = {index: str(exc) for index, exc in dataset.problems()}
    todo = [i for i in range(len(dataset)) if i not in bad]
    if progress is not None and bad:
        progress(len(bad))
    loader = torch.utils.data.DataLoader(_Check(dataset, todo), batch_size=None, num_workers=workers)
    for index, reason in loader:
        if reason:
            bad[int(index)] = reason
        if progress is not None:
            progress(1)
    return dict(sorted(bad.items()))


__all__ = [
    "DATASETS", "DatasetError", "DirectoryDataset", "ExtractionDataset", "SegmentationDataset",
    "SyntheticDataset", "find_bad_samples", "open_dataset", "write_synthetic",
]
