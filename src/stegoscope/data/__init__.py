"""Dataset readers (one module per dataset) and the torch view used by extraction."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import palettes
from .base import DatasetError, SegmentationDataset
from .cityscapes import Cityscapes27
from .cocostuff import Cocostuff27
from .crops import five_crop_boxes
from .decode import encoded_jpeg
from .directory import DirectoryDataset
from .potsdam import Potsdam3, PotsdamRaw
from .synthetic import SyntheticDataset, write_synthetic
from .transforms import transform_image, transform_label

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cocostuff27": Cocostuff27,
    "cityscapes": Cityscapes27,
    "potsdam": Potsdam3,
    "potsdamraw": PotsdamRaw,
    "directory": DirectoryDataset,
    "synthetic": SyntheticDataset,
}


def declared_classes(name: str, n_classes: int | None = None) -> int | None:
    """How many classes dataset ``name`` has, without opening it: its readers' class names, else
    ``n_classes`` (a directory dataset's, from its preset); None when neither says."""
    known = len(DATASETS[name].class_names) if name in DATASETS else 0
    return known or n_classes


def palette_of(name: str, n_classes: int) -> np.ndarray:
    """(n_classes, 3) uint8: the colours of dataset ``name``'s classes (``palettes.py``), or
    distinct ones where it declares none (a directory dataset)."""
    own = DATASETS[name].palette if name in DATASETS else ()
    return np.asarray(own[:n_classes], np.uint8).reshape(-1, 3) if len(own) >= n_classes else palettes.distinct(n_classes)


def open_dataset(name: str, root: Path, split: str, n_classes: int | None = None) -> SegmentationDataset:
    """The reader of dataset ``name`` for one split under ``root``."""
    if name not in DATASETS:
        raise DatasetError(name, f"unknown dataset; choose one of {', '.join(sorted(DATASETS))}")
    if name == "directory":
        return DirectoryDataset(root, split, n_classes=n_classes)
    return DATASETS[name](root, split)


class ExtractionDataset(torch.utils.data.Dataset):
    """Samples for extraction, prepared in DataLoader workers.

    ``samples[row]`` is ``(source index, crop index or None)`` of store row ``row``; ``rows`` are the
    store rows to produce. By default a sample's image is decoded, cropped, resized and centre-cropped
    here (uint8 pixels; normalisation happens on the compute device). With ``decode_on_device`` a
    JPEG is only read (its bytes) and :func:`.decode.device_pixels` finishes it where the model
    runs; labels are always finished here.
    """

    def __init__(
        self, dataset: SegmentationDataset, res: int, interpolation: str,
        samples: list[tuple[int, int | None]], rows: list[int], crop_ratio: float = 0.5, decode_on_device: bool = False,
    ):
        self.dataset, self.res, self.interpolation = dataset, res, interpolation
        self.samples, self.rows, self.crop_ratio = samples, rows, crop_ratio
        self.decode_on_device = decode_on_device

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        start = time.perf_counter()
        row = self.rows[i]
        source, crop = self.samples[row]
        sample = self._undecoded(row, source, crop) if self.decode_on_device else self._decoded(row, source, crop)
        return {**sample, "seconds": time.perf_counter() - start}  # the worker's time (extract --profile)

    def _decoded(self, row: int, source: int, crop: int | None) -> dict:
        image, label = self.dataset.sample(source)
        if crop is not None:
            left, top, right, bottom = five_crop_boxes(*image.size, self.crop_ratio)[crop]
            image = image.crop((left, top, right, bottom))
            label = label[top:bottom, left:right] if label is not None else None
        pixels = transform_image(image, self.res, self.interpolation)
        return {"index": torch.tensor(row), "pixels": torch.from_numpy(pixels.copy()), "label": self._label(label)}

    def _label(self, label: np.ndarray | None) -> torch.Tensor:
        if label is None:
            return torch.full((self.res, self.res), -1, dtype=torch.int16)
        return torch.from_numpy(transform_label(label, self.res).copy())

    def _undecoded(self, row: int, source: int, crop: int | None) -> dict:
        jpeg = encoded_jpeg(self.dataset, source)
        image = None if jpeg is not None else torch.from_numpy(np.asarray(self.dataset.image(source)).copy()).permute(2, 0, 1)
        label = self.dataset.label(source)
        label_shape = None if label is None else tuple(label.shape)
        if crop is not None and label is not None:  # the label is the image's size (checked after decoding)
            left, top, right, bottom = five_crop_boxes(label.shape[1], label.shape[0], self.crop_ratio)[crop]
            label = label[top:bottom, left:right]
        return {"index": torch.tensor(row), "label": self._label(label), "source": source, "crop": crop,
                "jpeg": jpeg, "image": image, "label_shape": label_shape}

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Stack what has one shape; keep lists of the encoded or variable-size rest."""
        out = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            out[key] = torch.stack(values) if key in ("index", "pixels", "label") else values
        return out


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
            return index, exc.reason
        return index, ""


def find_bad_samples(dataset: SegmentationDataset, workers: int = 0, progress=None) -> dict[int, str]:
    """Every sample that cannot be read (missing file, undecodable, bad label values), by index.

    Missing files are found from the listing; the rest by decoding each sample once in
    DataLoader workers. ``progress(n)`` is called as samples are checked.
    """
    bad = {index: exc.reason for index, exc in dataset.problems()}
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
    "DATASETS", "DatasetError", "palette_of", "DirectoryDataset", "ExtractionDataset", "SegmentationDataset",
    "SyntheticDataset", "find_bad_samples", "open_dataset", "write_synthetic",
]
