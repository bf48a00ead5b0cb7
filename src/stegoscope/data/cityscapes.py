"""Cityscapes-27 (reference §11.2): all 27 non-void labelIds, class = labelId − 7.

Layout under ``DATA_ROOT`` (or pointing at ``cityscapes/``)::

    cityscapes/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from . import palettes
from .base import DatasetError, SegmentationDataset, check_label_values, read_label_png
from .cocostuff import find_subdir

CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
COLORMAP = np.array([
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
FIRST_NONVOID = 7
# labelIds 0–33, and 255: the license plate's id −1 written as a byte.
VALID_LABEL_IDS = np.array([*range(34), 255])

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def map_label_ids(raw: np.ndarray) -> np.ndarray:
    """labelId → class: ``id − 7``; ids < 7 (void) and results ≥ 27 are ignored (−1)."""
    cls = raw.astype(np.int64) - FIRST_NONVOID
    return np.where((cls >= 0) & (cls < len(CLASS_NAMES)), cls, -1)


class Cityscapes27(SegmentationDataset):
    name = "cityscapes"
    class_names = CLASS_NAMES
    palette = palettes.CITYSCAPES_27

    def __init__(self, root: Path, split: str):
        super().__init__(root, split)
        self.base = find_subdir(root, "cityscapes", "leftImg8bit")
        self.image_dir = self.base / "leftImg8bit" / split
        self.label_dir = self.base / "gtFine" / split
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DatasetError(folder, f"split folder of {split!r} not found", "Cityscapes needs leftImg8bit/ and gtFine/")

    @cached_property
    def _stems(self) -> tuple[dict[str, Path], dict[str, Path]]:
        images = {f"{p.parent.name}/{p.name[: -len(IMAGE_SUFFIX)]}": p for p in self.image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
        labels = {f"{p.parent.name}/{p.name[: -len(LABEL_SUFFIX)]}": p for p in self.label_dir.glob(f"*/*{LABEL_SUFFIX}")}
        if not images:
            raise DatasetError(self.image_dir, f"no <city>/*{IMAGE_SUFFIX} images found")
        return images, labels

    @cached_property
    def ids(self) -> list[str]:
        images, labels = self._stems
        return sorted(set(images) | set(labels))  # unmatched files surface as problems

    @property
    def labelled(self) -> bool:
        return True

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = self.ids[index]
        return self.image_dir / f"{stem}{IMAGE_SUFFIX}", self.label_dir / f"{stem}{LABEL_SUFFIX}"

    def read_label(self, path: Path) -> np.ndarray:
        raw = read_label_png(path)
        check_label_values(path, raw, VALID_LABEL_IDS)
        return map_label_ids(raw)

    def colormap(self) -> np.ndarray:
        return COLORMAP.copy()
