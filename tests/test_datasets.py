"""The directory reader (pairing by stem, RGB conversion, ignore values) and the synthetic dataset."""

import numpy as np
import pytest
from PIL import Image

from stegoscope.data import DatasetError, DirectoryDataset, SyntheticDataset, write_synthetic
from stegoscope.data.synthetic import CLASS_NAMES


def test_directory_pairs_by_stem_and_converts_to_rgb(directory_dataset):
    ds = DirectoryDataset(directory_dataset, "train", n_classes=3)
    assert ds.ids == [f"img{i:03d}" for i in range(6)] and ds.labelled
    for i in range(len(ds)):
        assert ds.image(i).mode == "RGB"
        label = ds.label(i)
        assert set(np.unique(label)) <= {-1, 0, 1, 2} and (label[:8] == -1).all()
    assert len(ds.files()) == 12


def test_directory_unmatched_files_are_named(directory_dataset):
    (directory_dataset / "labels" / "train" / "img002.png").unlink()
    ds = DirectoryDataset(directory_dataset, "train", n_classes=3)
    [(index, error)] = ds.problems()
    assert ds.ids[index] == "img002" and "labels/train/img002.png: label of sample 'img002' not found" in str(error)
    with pytest.raises(DatasetError, match="img002.png"):
        ds.label(index)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(directory_dataset / "labels" / "val" / "orphan.png")
    ds = DirectoryDataset(directory_dataset, "val", n_classes=3)
    [(index, error)] = ds.problems()
    assert ds.ids[index] == "orphan" and "imgs/val/orphan.*: image of sample 'orphan' not found" in str(error)


def test_directory_missing_split_and_unknown_classes(tmp_path, directory_dataset):
    with pytest.raises(DatasetError, match="imgs/test.*not found"):
        DirectoryDataset(directory_dataset, "test")
    with pytest.raises(DatasetError, match="--n-classes"):
        DirectoryDataset(directory_dataset, "train")
    (tmp_path / "bare" / "imgs" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bare" / "imgs" / "train" / "a.jpg")
    bare = DirectoryDataset(tmp_path / "bare", "train")
    assert not bare.labelled and bare.label(0) is None


def test_directory_rejects_bad_label_and_corrupt_image(directory_dataset):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(directory_dataset / "labels" / "train" / "img000.png")
    ds = DirectoryDataset(directory_dataset, "train", n_classes=3)
    with pytest.raises(DatasetError, match="img000.png.*mode RGB"):
        ds.label(0)
    (directory_dataset / "imgs" / "train" / "img001.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DatasetError, match="img001.jpg.*cannot decode"):
        ds.image(1)


def test_synthetic_is_deterministic_and_has_distinct_classes(tmp_path):
    a = write_synthetic(tmp_path / "a", seed=5, n_train=6, n_val=3, size=(64, 48))
    b = write_synthetic(tmp_path / "b", seed=5, n_train=6, n_val=3, size=(64, 48))
    c = write_synthetic(tmp_path / "c", seed=6, n_train=6, n_val=3, size=(64, 48))
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 18
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)

    ds = SyntheticDataset(a, "train")
    assert ds.class_names == CLASS_NAMES and ds.n_classes == 4
    pixels = np.stack([np.asarray(ds.image(i)) for i in range(len(ds))]).reshape(-1, 3).astype(float)
    labels = np.stack([ds.label(i) for i in range(len(ds))]).reshape(-1)
    present = np.unique(labels)
    assert len(present) >= 3 and labels.min() >= 0
    means = np.stack([pixels[labels == k].mean(0) for k in present])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(present), 1)]
    assert gaps.min() > 40  # classes differ in colour


def test_each_dataset_colours_its_classes_with_its_conventional_palette_and_ignored_pixels_black():
    from stegoscope.data import palette_of
    from stegoscope.data.cityscapes import CLASS_NAMES as CITYSCAPES
    from stegoscope.data.palettes import colorize, distinct, voc_colormap

    # PASCAL VOC's colour map, by hand: background, aeroplane, bicycle, bird, boat, …, person (15)
    voc = voc_colormap()
    assert [tuple(voc[i]) for i in (0, 1, 2, 3, 4, 8, 15)] == [
        (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (64, 0, 0), (192, 128, 128)]
    coco = palette_of("cocostuff27", 27)
    assert coco.shape == (27, 3) and tuple(coco[0]) == (128, 0, 0) and tuple(coco[26]) == tuple(voc[27])  # from entry 1
    city = palette_of("cityscapes", 27)
    colours = {name: tuple(city[CITYSCAPES.index(name)]) for name in ("road", "sky", "car", "bicycle")}
    assert colours == {"road": (128, 64, 128), "sky": (70, 130, 180), "car": (0, 0, 142), "bicycle": (119, 11, 32)}
    assert [tuple(c) for c in palette_of("potsdam", 3)] == [(255, 255, 255), (0, 0, 255), (0, 255, 0)]  # ISPRS: impervious, building, tree
    own = palette_of("directory", 7)
    assert np.array_equal(own, distinct(7)) and len({tuple(c) for c in own}) == 7 and not (own == 0).all(1).any()

    labels = np.array([[0, 1, -1], [2, 26, 255]])
    rgb = colorize(labels, city)
    for (y, x), k in np.ndenumerate(labels):
        assert tuple(rgb[y, x]) == (tuple(city[k]) if 0 <= k < 27 else (0, 0, 0))
