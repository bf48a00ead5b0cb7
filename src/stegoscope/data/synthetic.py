"""The built-in ``synthetic`` dataset: deterministic scenes with four classes that differ in
colour, texture and shape, written once in the ``directory`` layout so they go through the same
reader as user data.

Classes: 0 sky (smooth blue gradient, top), 1 grass (green stripes below a wavy horizon),
2 disc (red dotted circles), 3 box (yellow checkered rectangles).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .directory import DirectoryDataset

CLASS_NAMES = ("sky", "grass", "disc", "box")
COLORMAP = np.array([[70, 130, 230], [60, 170, 60], [220, 40, 40], [240, 210, 40]], dtype=np.uint8)


def render_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 (H, W, 3) pixels and uint8 (H, W) class ids."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    label = np.zeros((height, width), np.uint8)
    img = np.zeros((height, width, 3), np.float32)

    # sky: vertical gradient of a jittered blue
    sky = COLORMAP[0] + rng.normal(0, 12, 3)
    img[:] = sky * (0.75 + 0.35 * yy[..., None] / height)

    # grass below a wavy horizon, with diagonal stripes
    horizon = height * rng.uniform(0.35, 0.6) + height * 0.08 * np.sin(xx / width * rng.uniform(3, 9) + rng.uniform(0, 6))
    grass = yy > horizon
    stripes = 0.8 + 0.25 * (np.sin((xx + yy) * rng.uniform(0.8, 1.4)) > 0)
    img[grass] = ((COLORMAP[1] + rng.normal(0, 12, 3)) * stripes[..., None])[grass]
    label[grass] = 1

    for _ in range(rng.integers(1, 4)):
        if rng.random() < 0.5:  # disc with dots
            r = rng.uniform(0.1, 0.22) * height
            cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            dots = 1.0 - 0.35 * ((np.mod(yy, 6) < 2) & (np.mod(xx, 6) < 2))
            img[mask] = ((COLORMAP[2] + rng.normal(0, 12, 3)) * dots[..., None])[mask]
            label[mask] = 2
        else:  # box with a checkerboard
            h, w = rng.uniform(0.2, 0.4) * height, rng.uniform(0.15, 0.35) * width
            y0, x0 = rng.uniform(0, height - h), rng.uniform(0, width - w)
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            checker = 0.75 + 0.3 * ((np.floor(yy / 4) + np.floor(xx / 4)) % 2)
            img[mask] = ((COLORMAP[3] + rng.normal(0, 12, 3)) * checker[..., None])[mask]
            label[mask] = 3

    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def write_synthetic(root: Path, seed: int = 0, n_train: int = 64, n_val: int = 32, size: tuple[int, int] = (128, 96)) -> Path:
    """Write the dataset to ``root`` once (atomically); an existing complete copy is reused."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, count, offset in (("train", n_train, 0), ("val", n_val, 1)):
            rng = np.random.default_rng([seed, offset])
            (tmp / "imgs" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(count):
                img, label = render_scene(rng, *size)
                Image.fromarray(img).save(tmp / "imgs" / split / f"{split}_{i:05d}.png")
                Image.fromarray(label, mode="L").save(tmp / "labels" / split / f"{split}_{i:05d}.png")
        (tmp / ".complete").touch()
        if root.exists():  # a half-written copy from a crashed run
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


class SyntheticDataset(DirectoryDataset):
    name = "synthetic"
    class_names = CLASS_NAMES

    def __init__(self, root: Path, split: str):
        super().__init__(root, split, class_names=CLASS_NAMES)

    def colormap(self) -> np.ndarray:
        return COLORMAP.copy()
