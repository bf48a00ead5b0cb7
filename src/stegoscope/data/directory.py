"""The generic ``directory`` dataset: ``imgs/<split>/*`` and optional ``labels/<split>/*.png``.

Unlike STEGO (which pairs by sorted position and does not convert to RGB), images and labels
are paired by file stem, an unmatched file is reported by name, and every image is converted to
RGB. Label pixel values are class ids; values outside ``[0, n_classes)`` are ignored (-1), as
in STEGO.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .base import IMAGE_SUFFIXES, DatasetError, SegmentationDataset, read_label_png


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
        if not self.labelled:
            return {}
        return _by_stem(sorted(p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"))

    @cached_property
    def ids(self) -> list[str]:
        # An orphan label is a sample too, so that it is reported (or skipped) by name.
        return sorted(set(self._images) | set(self._labels))

    @property
    def labelled(self) -> bool:
        return self.label_dir.is_dir()

    def paths(self, index: int) -> tuple[Path, Path | None]:
        stem = self.ids[index]
        image = self._images.get(stem, self.image_dir / f"{stem}.*")
        return image, (self._labels.get(stem, self.label_dir / f"{stem}.png") if self.labelled else None)

    def read_label(self, path: Path) -> np.ndarray:
        raw = read_label_png(path)
        return np.where((raw >= 0) & (raw < self.n_classes), raw, -1)


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        if path.stem in out:
            raise DatasetError(path, f"two files share the stem {path.stem!r} (also {out[path.stem].name})", "rename one")
        out[path.stem] = path
    return out
