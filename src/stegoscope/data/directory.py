"""The generic ``directory`` dataset: ``imgs/<split>/*`` and optional ``labels/<split>/*.png``.

Unlike STEGO (which pairs by sorted position and does not convert to RGB), images and labels
are paired by file stem, any unmatched file is an error, and every image is converted to RGB.
Label pixel values are class ids; values outside ``[0, n_classes)`` are ignored (-1).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .base import IMAGE_SUFFIXES, DatasetError, SegmentationDataset, read_label_png, read_rgb


class DirectoryDataset(SegmentationDataset):
    name = "directory"

    def __init__(self, root: Path, split: str, n_classes: int | None = None, class_names: tuple[str, ...] = ()):
        super().__init__(root, split)
        self.image_dir = self.root / "imgs" / split
        self.label_dir = self.root / "labels" / split
        if not self.image_dir.is_dir():
            raise DatasetError(
                self.image_dir, "image directory not found",
                f"a directory dataset needs {self.root}/imgs/{split}/ (and optionally labels/{split}/)",
            )
        if class_names:
            self.class_names = tuple(class_names)
        elif n_classes:
            self.class_names = tuple(f"class {i}" for i in range(n_classes))
        if self.labelled and not self.class_names:
            raise DatasetError(self.label_dir, "labels found but the number of classes is unknown", "pass --n-classes K")

    @cached_property
    def _images(self) -> dict[str, Path]:
        files = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(self.image_dir, "no images found", f"put images ({', '.join(IMAGE_SUFFIXES)}) there")
        return _by_stem(files)

    @cached_property
    def _labels(self) -> dict[str, Path]:
        if not self.label_dir.is_dir():
            return {}
        labels = _by_stem(sorted(p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"))
        images = self._images
        for stem, path in labels.items():
            if stem not in images:
                raise DatasetError(path, "label without an image of the same stem", f"add {self.image_dir}/{stem}.* or remove it")
        for stem, path in images.items():
            if stem not in labels:
                raise DatasetError(path, "image without a label of the same stem", f"add {self.label_dir}/{stem}.png or remove it")
        return labels

    @property
    def ids(self) -> list[str]:
        return list(self._images)

    @property
    def labelled(self) -> bool:
        return self.label_dir.is_dir()

    def image(self, index: int) -> Image.Image:
        return read_rgb(self._images[self.ids[index]])

    def label(self, index: int) -> np.ndarray | None:
        if not self.labelled:
            return None
        raw = read_label_png(self._labels[self.ids[index]])
        return np.where((raw >= 0) & (raw < self.n_classes), raw, -1)

    def files(self) -> list[Path]:
        return list(self._images.values()) + list(self._labels.values())


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        if path.stem in out:
            raise DatasetError(path, f"two files share the stem {path.stem!r} (also {out[path.stem].name})", "rename one")
        out[path.stem] = path
    return out
