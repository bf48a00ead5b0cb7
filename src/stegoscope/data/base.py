"""What every dataset reader provides: ids, RGB images, mapped labels, its files, its classes."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

SKIP_HINT = "fix or remove the file, or rerun with --skip-bad to skip such samples"


class DatasetError(ValueError):
    """Bad input: names the file, the cause and what to do."""

    def __init__(self, path: Path | str, cause: str = "", fix: str = ""):
        self.path, self.cause, self.fix = str(path), cause, fix
        super().__init__(f"{path}: {cause}" + (f". {fix}" if fix else "") if cause else str(path))

    @property
    def reason(self) -> str:
        """The file and what is wrong with it, without the fix (what a skipped sample records)."""
        return f"{self.path}: {self.cause}" if self.cause else self.path

    @classmethod
    def from_worker(cls, exc: DatasetError) -> DatasetError:
        """DataLoader workers re-raise with the worker traceback as the message: keep its last line."""
        text = str(exc)
        if "Original Traceback" not in text:
            return exc
        last = text.strip().splitlines()[-1]
        return cls(last.split("DatasetError: ", 1)[-1])


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SegmentationDataset(ABC):
    """One split of a dataset. Labels are returned already mapped to ``[0, n_classes)``, -1 = ignore.

    A reader lists its samples (``ids``) and where each one's files are (``paths``) without
    reading them; ``problems`` finds missing files without decoding anything.
    """

    name: str = ""
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()  # its classes' colours (palettes.py); none: distinct ones

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
    def paths(self, index: int) -> tuple[Path, Path | None]:
        """The image file and (when labelled) the label file of one sample."""

    def read_image(self, path: Path) -> Image.Image:
        return read_rgb(path)

    @abstractmethod
    def read_label(self, path: Path) -> np.ndarray:
        """Raw label file → int class ids, -1 = ignore (raising on values outside the id range)."""

    def extra_files(self) -> list[Path]:
        """Files besides the samples that decide the split (lists, split files)."""
        return []

    def image(self, index: int) -> Image.Image:
        """The RGB image of one sample."""
        return self.read_image(require_file(self.paths(index)[0], f"image of sample {self.ids[index]!r}"))

    def label(self, index: int) -> np.ndarray | None:
        """int class-id map (H, W) of one sample, -1 = ignore; None when unlabelled."""
        if not self.labelled:
            return None
        return self.read_label(require_file(self.paths(index)[1], f"label of sample {self.ids[index]!r}"))

    def sample(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """Image and label of one sample, checked to be the same size."""
        image, label = self.image(index), self.label(index)
        if label is not None:
            self.check_label_size(index, label.shape, image.size)
        return image, label

    def check_label_size(self, index: int, label_shape: tuple[int, int], image_size: tuple[int, int]) -> None:
        """Raise unless a label of ``label_shape`` (H, W) fits an image of ``image_size`` (W, H)."""
        if tuple(label_shape) != (image_size[1], image_size[0]):
            raise DatasetError(
                self.paths(index)[1], f"label is {label_shape[1]}x{label_shape[0]} but its image is {image_size[0]}x{image_size[1]}",
                SKIP_HINT,
            )

    def problems(self) -> list[tuple[int, DatasetError]]:
        """Samples whose files are missing, found without decoding anything."""
        found = []
        for index in range(len(self)):
            for path, what in zip(self.paths(index), ("image", "label")):
                if path is not None and not path.is_file():
                    found.append((index, DatasetError(path, f"{what} of sample {self.ids[index]!r} not found", SKIP_HINT)))
                    break
        return found

    def files(self) -> list[Path]:
        """Every file the split reads (its fingerprint)."""
        out = list(self.extra_files())
        for index in range(len(self)):
            out += [p for p in self.paths(index) if p is not None and p.is_file()]
        return out

    def spec(self) -> dict[str, Any]:
        """Parameters that change what the reader returns (part of the extraction key)."""
        return {"dataset": self.name, "split": self.split, "n_classes": self.n_classes}

    def colormap(self) -> np.ndarray:
        """(n_classes, 3) uint8 colours for figures (PASCAL's bit-shift map unless overridden)."""
        return pascal_colormap(self.n_classes)

    def __len__(self) -> int:
        return len(self.ids)


def pascal_colormap(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: bits of the class index spread over R, G and B."""
    out = np.zeros((n, 3), np.uint8)
    for index in range(n):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[index] = r, g, b
    return out


def describe_ids(ids: np.ndarray) -> str:
    """Sorted ids as runs: ``0–33 and 255``."""
    ids = np.unique(ids)
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append(f"{ids[start]}" if i - 1 == start else f"{ids[start]}–{ids[i - 1]}")
            start = i
    return ", ".join(runs[:-1]) + " and " + runs[-1] if len(runs) > 1 else runs[0]


def check_label_values(path: Path, raw: np.ndarray, valid: np.ndarray) -> None:
    """Raise if the raw label holds a value outside the dataset's id set ``valid``."""
    bad = np.setdiff1d(np.unique(raw), valid)
    if bad.size:
        raise DatasetError(
            path, f"label values {bad[:5].tolist()} are outside this dataset's ids ({describe_ids(valid)})",
            "is this the right dataset / label file? " + SKIP_HINT,
        )


def require_file(path: Path, what: str, fix: str = SKIP_HINT) -> Path:
    if not path.is_file():
        raise DatasetError(path, f"{what} not found", fix)
    return path


MAX_PIXELS = 100_000_000  # an image or label over this is refused from its header, before it is decoded


def check_pixels(path: Path, size: tuple[int, int]) -> None:
    """Refuse an image whose header declares more than ``MAX_PIXELS`` pixels (a decompression
    bomb, or far larger than any dataset's), so that memory stays bounded."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise DatasetError(path, f"its header declares {width} × {height} pixels, over the {MAX_PIXELS:,}-pixel limit "
                                 "(a decompression bomb, or far larger than any dataset's images)", SKIP_HINT)


def _open(path: Path) -> Image.Image:
    """The image at ``path``, opened lazily (header only) and checked against ``MAX_PIXELS``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:  # over twice PIL's own limit: refused while opening
            raise DatasetError(path, f"refused as a decompression bomb ({exc})", SKIP_HINT) from None
    try:
        check_pixels(path, img.size)
    except DatasetError:
        img.close()
        raise
    return img


def read_rgb(path: Path) -> Image.Image:
    """Open an image fully (so truncation is caught here) and convert it to RGB."""
    try:
        with _open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(path, f"cannot decode image ({exc})", SKIP_HINT) from exc


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel 8-bit PNG of class ids (mode L or P) as an int array."""
    try:
        with _open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise DatasetError(
                    path, f"label image has mode {img.mode}; expected a single-channel 8-bit PNG (mode L or P)",
                    "save labels as 8-bit single-channel class-id PNGs, or rerun with --skip-bad",
                )
            return np.asarray(img, dtype=np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(path, f"cannot decode label ({exc})", SKIP_HINT) from exc
