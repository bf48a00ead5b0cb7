import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per xdist worker (and its subprocesses), set before numpy and torch load:
    # two workers of two threads each on two cores spin-wait on each other (README, "Install and test").
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

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


def invoke(*args):
    """The command line in this process (wide lines, arguments as strings); never a traceback."""
    from typer.testing import CliRunner

    from stegoscope.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    assert "Traceback" not in result.output, result.output
    return result


def ok(*args) -> str:
    """:func:`invoke` that must succeed; its output."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


MICRO_PRESET = """name: {name}
dataset: synthetic
backbone: random:vit_micro_patch8
seed: 0
extract:
  batch_size: 8
  shard_images: 8
  splits:
    train: {train}
    val: {{res: 32, store_images: true}}
synthetic: {{seed: 0, n_train: 16, n_val: 6, size: [48, 40]}}
methods: [pca, stego]
dims: [4]
stego: {{steps: 6, batch_size: 4, dim: 4}}
probe: {{steps: 6, batch_size: 4}}
eval: {{val_every: 3, keep_predictions: none}}  # tests/test_predictions.py keeps them
"""


def write_micro_preset(path: Path, name: str = "micro", extra: str = "", train: str = "{res: 32}") -> Path:
    """A study small enough for an end-to-end test: 16 + 6 synthetic images at 32 px, a random
    micro ViT, PCA and STEGO at D = 4 for 6 steps; ``extra`` YAML lines are appended; ``train``:
    the train split's settings."""
    path.write_text(MICRO_PRESET.format(name=name, train=train) + extra)
    return path


@pytest.fixture
def directory_dataset(tmp_path: Path) -> Path:
    return write_directory_dataset(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"
