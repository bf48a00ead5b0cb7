"""Tiny copies of the study's datasets, written in their real on-disk formats."""

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from stegoscope.data.cocostuff import SPLITS as COCO_SPLITS


def write_cocostuff(root: Path, n_train=3, n_val=2, size=(48, 40), seed=0) -> Path:
    """DATA_ROOT/cocostuff/{images,annotations}/<split2017>/<id>.{jpg,png} + curated lists."""
    rng = np.random.default_rng(seed)
    base = root / "cocostuff"
    for split, count in (("train", n_train), ("val", n_val)):
        folder, list_name = COCO_SPLITS[split]
        for sub in ("images", "annotations", "curated"):
            (base / sub / folder).mkdir(parents=True, exist_ok=True)
        ids = [f"{(1000 if split == 'train' else 2000) + i:012d}" for i in range(count)]
        # an unlisted image must be ignored
        for image_id in [*ids, "999999999999"]:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                base / "images" / folder / f"{image_id}.jpg", quality=90)
            fine = rng.choice([0, 5, 17, 105, 170, 181, 255], size=(size[1], size[0])).astype(np.uint8)
            Image.fromarray(fine, mode="L").save(base / "annotations" / folder / f"{image_id}.png")
        (base / "curated" / folder / list_name).write_text("\n".join(ids) + "\n")
    return root


def write_cityscapes(root: Path, per_city=2, cities=("aachen", "bochum"), size=(64, 32), seed=0) -> Path:
    """DATA_ROOT/cityscapes/{leftImg8bit,gtFine}/<split>/<city>/<stem>_{leftImg8bit,gtFine_labelIds}.png"""
    rng = np.random.default_rng(seed)
    base = root / "cityscapes"
    for split in ("train", "val"):
        for city in cities:
            (base / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (base / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for i in range(per_city):
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                ids = rng.integers(0, 34, (size[1], size[0])).astype(np.uint8)
                Image.fromarray(ids, mode="L").save(base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                for extra in ("_gtFine_color.png", "_gtFine_instanceIds.png"):  # present in the real data, unused
                    Image.fromarray(ids, mode="L").save(base / "gtFine" / split / city / f"{stem}{extra}")
    return root


def write_potsdam(root: Path, n_train=3, n_val=2, size=16, seed=0, float_images=False) -> Path:
    """DATA_ROOT/potsdam/{imgs,gt}/<id>.mat (keys img, gt) + labelled_train.txt, labelled_test.txt …"""
    rng = np.random.default_rng(seed)
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    train = [f"{i}" for i in range(n_train)]
    val = [f"{100 + i}" for i in range(n_val)]
    for tile in train + val:
        img = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)  # RGB + IR
        savemat(base / "imgs" / f"{tile}.mat", {"img": img / 255.0 if float_images else img})
        savemat(base / "gt" / f"{tile}.mat", {"gt": rng.choice([0, 1, 2, 3, 4, 5, 255], (size, size)).astype(np.uint8)})
    (base / "labelled_train.txt").write_text("\n".join(train) + "\n")
    (base / "labelled_test.txt").write_text("\n".join(val) + "\n")
    (base / "unlabelled_train.txt").write_text("")
    (base / "all.txt").write_text("\n".join(train + val) + "\n")
    return root


def write_potsdamraw(root: Path, scenes=1, size=8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    base = root / "potsdamraw" / "processed"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    for s in range(scenes):
        for i in range(15):
            for j in range(15):
                value = (s * 225 + i * 15 + j) % 256
                savemat(base / "imgs" / f"{s}_{i}_{j}.mat", {"img": np.full((size, size, 4), value, np.uint8)})
                savemat(base / "gt" / f"{s}_{i}_{j}.mat", {"gt": rng.choice([0, 4], (size, size)).astype(np.uint8)})
    return root
