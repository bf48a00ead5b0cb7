"""What every dataset reader provides: ids, RGB images, mapped labels, its files, its classes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """Bad input: names the file, the cause and what to do."""

    def __init__(self, path: Path | str, cause: str, fix: str = ""):
        self.path, self.cause, self.fix = str(path), cause, fix
        super().__init__(f"{path}: {cause}" + (f". {fix}" if fix else ""))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SegmentationDataset(ABC):
    """One split of a dataset. Labels are returned already mapped to ``[0, n_classes)``, -1 = ignore."""

    name: str = ""
    class_names: tuple[str, ...] = ()

    def __init__(self, root: Path, split: str):
        self.root = Path(root)
        self.split = split

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    @abstractmethod
    def ids(self) -> list[str]:
        """Stable id of each sample, in extraction order."""

    @property
    @abstractmethod
    def labelled(self) -> bool: ...

    @abstractmethod
    def image(self, index: int) -> Image.Image:
        """The RGB image of one sample."""

    @abstractmethod
    def label(self, index: int) -> np.ndarray | None:
        """int class-id map (H, W) of one sample, -1 = ignore; None when unlabelled."""

    @abstractmethod
    def files(self) -> list[Path]:
        """Every file the split reads (its fingerprint)."""

    def spec(self) -> dict[str, Any]:
        """Parameters that change what the reader returns (part of the extraction key)."""
        return {"dataset": self.name, "split": self.split, "n_classes": self.n_classes}

    def colormap(self) -> np.ndarray:
        """(n_classes, 3) uint8 colours for figures; deterministic."""
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(self.n_classes, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ids)


def read_rgb(path: Path) -> Image.Image:
    """Open an image fully (so truncation is caught here) and convert it to RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(path, f"cannot decode image ({exc})", "replace the file or rerun with --skip-bad") from exc


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel 8-bit PNG of class ids (mode L or P) as an int array."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise DatasetError(
                    path, f"label image has mode {img.mode}; expected a single-channel 8-bit PNG (mode L or P)",
                    "save labels as 8-bit class-id PNGs",
                )
            return np.asarray(img, dtype=np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(path, f"cannot decode label ({exc})", "replace the file or rerun with --skip-bad") from exc
