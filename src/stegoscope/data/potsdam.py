"""Potsdam-3 and PotsdamRaw (reference §11.3): IIC's ``.mat`` tiles, 6 ISPRS classes merged to 3.

Layout under ``DATA_ROOT`` (or pointing at ``potsdam/``)::

    potsdam/imgs/<id>.mat     key "img": H×W×C, C ≥ 3 (RGB + IR); the first 3 channels are used
    potsdam/gt/<id>.mat       key "gt": H×W, ISPRS ids 0–5, 255 = void
    potsdam/labelled_train.txt  labelled_test.txt  unlabelled_train.txt  all.txt

    potsdamraw/processed/{imgs,gt}/<scene>_<i>_<j>.mat   38 scenes × 15 × 15 tiles, that order

Merge: {0 roads, 4 cars} → 0, {1 buildings, 5 clutter} → 1, {2 low vegetation, 3 trees} → 2,
255 → -1. STEGO maps any other value to 0 silently and treats a missing gt file as all void; here
both are errors that name the file (``--skip-bad`` skips such tiles).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from . import palettes
from .base import SKIP_HINT, DatasetError, SegmentationDataset, check_label_values, require_file
from .cocostuff import find_subdir

CLASS_NAMES = ("roads and cars", "buildings and clutter", "trees and vegetation")
FINE_NAMES = ("impervious surfaces", "buildings", "low vegetation", "trees", "cars", "clutter")
FINE_TO_COARSE = np.full(256, -1, dtype=np.int64)
FINE_TO_COARSE[[0, 4]] = 0
FINE_TO_COARSE[[1, 5]] = 1
FINE_TO_COARSE[[2, 3]] = 2
VALID_FINE = np.array([0, 1, 2, 3, 4, 5, 255])

SPLIT_FILES = {
    "train": ("labelled_train.txt",),
    "val": ("labelled_test.txt",),
    "train+val": ("labelled_train.txt", "labelled_test.txt"),
    "unlabelled_train": ("unlabelled_train.txt",),
    "all": ("all.txt",),
}
UNLABELLED_SPLITS = ("unlabelled_train", "all")


def load_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError … for damaged files
        raise DatasetError(path, f"cannot read .mat file ({exc})", SKIP_HINT) from exc
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise DatasetError(path, f"no key {key!r} in the .mat file (it has {keys})", f"IIC's Potsdam files store {key!r}; " + SKIP_HINT)
    return np.asarray(content[key])


def mat_to_rgb(path: Path, img: np.ndarray) -> Image.Image:
    """The first three channels as an RGB image (uint8 as is; floats in [0, 1] as ToPILImage does)."""
    if img.ndim != 3 or img.shape[2] < 3:
        raise DatasetError(path, f"image array has shape {img.shape}; expected H×W×C with C ≥ 3", SKIP_HINT)
    rgb = img[:, :, :3]
    if rgb.dtype != np.uint8:
        if not np.issubdtype(rgb.dtype, np.floating) or rgb.min() < 0 or rgb.max() > 1:
            raise DatasetError(path, f"image values of dtype {rgb.dtype} in [{rgb.min()}, {rgb.max()}]; "
                                     "expected uint8 or floats in [0, 1]", SKIP_HINT)
        rgb = (rgb * 255).astype(np.uint8)  # ToPILImage: mul(255).byte() truncates
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def map_potsdam_label(path: Path, gt: np.ndarray) -> np.ndarray:
    if gt.ndim != 2:
        raise DatasetError(path, f"gt array has shape {gt.shape}; expected H×W", SKIP_HINT)
    check_label_values(path, gt, VALID_FINE)
    return FINE_TO_COARSE[gt.astype(np.int64)]


class _PotsdamTiles(SegmentationDataset):
    class_names = CLASS_NAMES
    palette = palettes.POTSDAM_3

    def read_image(self, path: Path) -> Image.Image:
        return mat_to_rgb(path, load_mat(path, "img"))

    def read_label(self, path: Path) -> np.ndarray:
        return map_potsdam_label(path, load_mat(path, "gt"))


class Potsdam3(_PotsdamTiles):
    name = "potsdam"

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        if split not in SPLIT_FILES:
            raise DatasetError(root, f"potsdam has no split {split!r}", f"use one of {list(SPLIT_FILES)}")
        self.base = find_subdir(root, "potsdam", "imgs")
        self.split_files = [
            require_file(self.base / name, f"split file of {split!r}", "it comes with IIC's Potsdam (STEGO's potsdam.zip)")
            for name in SPLIT_FILES[split]
        ]

    @cached_property
    def ids(self) -> list[str]:
        ids = [line.strip() for f in self.split_files for line in f.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(self.split_files[0], "the split file lists no tiles")
        return ids

    @property
    def labelled(self) -> bool:
        return self.split not in UNLABELLED_SPLITS

    def paths(self, index: int) -> tuple[Path, Path | None]:
        tile = self.ids[index]
        return self.base / "imgs" / f"{tile}.mat", (self.base / "gt" / f"{tile}.mat" if self.labelled else None)

    def extra_files(self) -> list[Path]:
        return list(self.split_files)


class PotsdamRaw(_PotsdamTiles):
    """All tiles of the 38 scenes in mosaic order ``<scene>_<row>_<col>``; the split is ignored."""

    name = "potsdamraw"
    N_SCENES, GRID = 38, 15

    def __init__(self, root: Path, split: str, scenes: int = N_SCENES):
        super().__init__(root, split)
        self.base = find_subdir(root, "potsdamraw", "processed") / "processed"
        if not self.base.is_dir():
            raise DatasetError(self.base, "folder not found", "PotsdamRaw needs potsdamraw/processed/{imgs,gt}/")
        self.scenes = scenes

    @cached_property
    def ids(self) -> list[str]:
        return [f"{s}_{i}_{j}" for s in range(self.scenes) for i in range(self.GRID) for j in range(self.GRID)]

    @property
    def labelled(self) -> bool:
        return True

    def paths(self, index: int) -> tuple[Path, Path]:
        tile = self.ids[index]
        return self.base / "imgs" / f"{tile}.mat", self.base / "gt" / f"{tile}.mat"
