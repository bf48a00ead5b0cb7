import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_directory_dataset(root: Path, n_train: int = 6, n_val: int = 4, size=(40, 32), n_classes: int = 3, seed: int = 0) -> Path:
    """A tiny ``directory`` dataset: mixed image modes and formats, labels with ignore values (255)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "P"]
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(pixels).convert(modes[i % len(modes)])
            suffix = ".jpg" if img.mode in ("RGB", "L") and i % 2 else ".png"
            img.save(root / "imgs" / split / f"img{i:03d}{suffix}")
            label = rng.integers(0, n_classes, (size[1], size[0])).astype(np.uint8)
            label[: size[1] // 4] = 255  # ignore band
            Image.fromarray(label, mode="L").save(root / "labels" / split / f"img{i:03d}.png")
    return root


@pytest.fixture
def directory_dataset(tmp_path: Path) -> Path:
    return write_directory_dataset(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"
