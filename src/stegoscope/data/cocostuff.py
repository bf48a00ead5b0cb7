"""Cocostuff-27 (reference §11.1): the IIC curated image lists, fine ids 0–181 → 27 coarse classes.

Layout under ``DATA_ROOT`` (STEGO's ``pytorch_data_dir``; pointing at ``cocostuff/`` works too)::

    cocostuff/images/{train2017,val2017}/<id>.jpg
    cocostuff/annotations/{train2017,val2017}/<id>.png      fine ids 0–181, 255 = unlabeled
    cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt
    cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from . import palettes
from .base import DatasetError, SegmentationDataset, check_label_values, read_label_png, require_file

CLASS_NAMES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle",  # 0–11: things
    "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",  # 12–26: stuff
)
FIRST_STUFF_INDEX = 12

_COARSE_TO_FINE: dict[int, list[int]] = {
    0: list(range(71, 77)), 1: list(range(77, 83)), 2: list(range(51, 61)), 3: list(range(61, 71)),
    4: list(range(83, 91)), 5: list(range(43, 51)), 6: list(range(25, 33)), 7: list(range(15, 25)),
    8: list(range(9, 15)), 9: [0], 10: list(range(33, 43)), 11: list(range(1, 9)),
    12: [101, 102], 13: [100, 113, 114, 115, 116, 117], 14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164], 16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167], 18: list(range(170, 177)), 19: [179, 180],
    20: [94, 95, 127, 150, 157, 165], 21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168], 23: [105, 156], 24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163], 26: [119, 147, 154, 177, 178],
}
UNLABELED = 255

# Lookup table over every byte value: fine id → coarse class, 255 → -1.
FINE_TO_COARSE = np.full(256, -1, dtype=np.int64)
for _coarse, _fines in _COARSE_TO_FINE.items():
    FINE_TO_COARSE[_fines] = _coarse
VALID_FINE = np.array([*range(182), UNLABELED])

SPLITS = {"train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"), "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt")}


def find_subdir(root: Path, name: str, marker: str) -> Path:
    """``root/name`` when it exists, else ``root`` itself if it already is that folder."""
    root = Path(root)
    if (root / name).is_dir():
        return root / name
    if (root / marker).exists():
        return root
    raise DatasetError(root / name, "dataset folder not found", f"DATA_ROOT must contain {name}/ (STEGO's pytorch_data_dir)")


class Cocostuff27(SegmentationDataset):
    name = "cocostuff27"
    class_names = CLASS_NAMES
    palette = palettes.COCOSTUFF_27

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        if split not in SPLITS:
            raise DatasetError(root, f"cocostuff27 has no split {split!r}", f"use one of {list(SPLITS)}")
        self.base = find_subdir(root, "cocostuff", "curated")
        folder, list_name = SPLITS[split]
        self.list_file = require_file(self.base / "curated" / folder / list_name, "curated image list",
                                      "it comes with the IIC curated Cocostuff lists (STEGO's cocostuff.zip)")
        self.image_dir = self.base / "images" / folder
        self.label_dir = self.base / "annotations" / folder

    @cached_property
    def ids(self) -> list[str]:
        ids = [line.strip() for line in self.list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(self.list_file, "the image list is empty")
        return ids

    @property
    def labelled(self) -> bool:
        return True

    def paths(self, index: int) -> tuple[Path, Path]:
        image_id = self.ids[index]
        return self.image_dir / f"{image_id}.jpg", self.label_dir / f"{image_id}.png"

    def read_label(self, path: Path) -> np.ndarray:
        raw = read_label_png(path)
        check_label_values(path, raw, VALID_FINE)
        return FINE_TO_COARSE[raw]

    def extra_files(self) -> list[Path]:
        return [self.list_file]
