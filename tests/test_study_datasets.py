"""The study's datasets in their real formats: mappings, five-crop, extraction end to end, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from typer.testing import CliRunner

from fixtures import write_cityscapes, write_cocostuff, write_potsdam, write_potsdamraw
from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.data import DatasetError, open_dataset
from stegoscope.data.cityscapes import map_label_ids
from stegoscope.data.cocostuff import CLASS_NAMES as COCO_NAMES
from stegoscope.data.cocostuff import FINE_TO_COARSE
from stegoscope.data.crops import five_crop_boxes
from stegoscope.data.potsdam import FINE_TO_COARSE as POTSDAM_MAP
from stegoscope.data.potsdam import PotsdamRaw
from stegoscope.pipeline import run_stage
from stegoscope.stages.extract import ExtractParams, ExtractStage

MICRO = "random:vit_micro_patch8"
REPO = Path(__file__).resolve().parents[1]


# -- label mappings against the reference tables -----------------------------------------------

def test_cocostuff_fine_to_coarse():
    assert FINE_TO_COARSE[170] == 18 and COCO_NAMES[18] == "wall"
    assert FINE_TO_COARSE[0] == 9 and COCO_NAMES[9] == "person"
    assert FINE_TO_COARSE[255] == -1
    assert FINE_TO_COARSE[105] == 23 and FINE_TO_COARSE[156] == 23  # sky
    assert FINE_TO_COARSE[71] == 0 and FINE_TO_COARSE[82] == 1 and FINE_TO_COARSE[181] == 24
    assert (FINE_TO_COARSE[:182] >= 0).all()  # every fine id is mapped
    counts = np.bincount(FINE_TO_COARSE[:182], minlength=27)
    assert counts[18] == 7 and counts[15] == 11 and counts[9] == 1 and counts.sum() == 182


def test_cityscapes_label_ids():
    raw = np.array([7, 6, 33, 0, 26, 34, 255])
    np.testing.assert_array_equal(map_label_ids(raw), [0, -1, 26, -1, 19, -1, -1])


def test_potsdam_merge():
    assert [POTSDAM_MAP[v] for v in (4, 5, 3, 0, 1, 2, 255)] == [0, 1, 2, 0, 1, 2, -1]


def test_readers_apply_the_mappings(tmp_path):
    root = write_cocostuff(tmp_path / "coco")
    coco = open_dataset("cocostuff27", root, "val")
    raw = np.asarray(Image.open(coco.paths(0)[1])).astype(int)
    np.testing.assert_array_equal(coco.label(0), FINE_TO_COARSE[raw])
    assert len(coco) == 2 and "999999999999" not in coco.ids  # only the curated list

    root = write_cityscapes(tmp_path / "city")
    city = open_dataset("cityscapes", root, "train")
    assert city.ids[0] == "aachen/aachen_000000_000019" and len(city) == 4
    raw = np.asarray(Image.open(city.paths(0)[1])).astype(int)
    np.testing.assert_array_equal(city.label(0), np.where((raw >= 7), raw - 7, -1))

    root = write_potsdam(tmp_path / "pots", float_images=True)
    pots = open_dataset("potsdam", root, "val")
    assert pots.ids == ["100", "101"] and pots.image(0).mode == "RGB"
    from scipy.io import loadmat

    img = loadmat(pots.paths(0)[0])["img"]
    np.testing.assert_array_equal(np.asarray(pots.image(0)), (img[:, :, :3] * 255).astype(np.uint8))
    assert not open_dataset("potsdam", root, "all").labelled


def test_potsdamraw_tile_order(tmp_path):
    raw = PotsdamRaw(write_potsdamraw(tmp_path / "raw"), "val", scenes=1)
    assert len(raw) == 225 and raw.ids[:3] == ["0_0_0", "0_0_1", "0_0_2"] and raw.ids[15] == "0_1_0"
    assert np.asarray(raw.image(16))[0, 0, 0] == 16  # tile 0_1_1 was written with value 1*15+1
    assert PotsdamRaw(tmp_path / "raw", "train").problems()[0][1].path.endswith("1_0_0.mat")


# -- five-crop --------------------------------------------------------------------------------

def test_five_crop_of_a_block_image_lands_at_the_expected_rows(tmp_path):
    # 32×32 image of 4×4 blocks (8 px each); block (r, c) has value / label 4r + c.
    blocks = np.arange(16).reshape(4, 4)
    label = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
    pixels = np.stack([label * 10, label * 5, 255 - label * 10], -1).astype(np.uint8)
    for split in ("train",):
        (tmp_path / "d" / "imgs" / split).mkdir(parents=True)
        (tmp_path / "d" / "labels" / split).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "d" / "imgs" / split / "blocks.png")
        Image.fromarray(label).save(tmp_path / "d" / "labels" / split / "blocks.png")
    params = ExtractParams("directory", "train", res=16, backbone=MICRO, n_classes=16, store_images=True, crop="five")
    stage = ExtractStage(tmp_path / "c", tmp_path / "d", params, workers=0, show_progress=False)
    run_stage(stage)
    store = cache_schema.open_feature_store(stage.output)
    assert store.ids == [f"blocks#{k}" for k in range(5)]
    expected_blocks = [blocks[:2, :2], blocks[:2, 2:], blocks[2:, :2], blocks[2:, 2:], blocks[1:3, 1:3]]
    for k, expected in enumerate(expected_blocks):
        want = np.kron(expected, np.ones((8, 8), int))
        np.testing.assert_array_equal(store[cache_schema.LABELS][k], want)
        np.testing.assert_array_equal(store[cache_schema.IMAGES][k][..., 0], want * 10)
    assert five_crop_boxes(33, 21) == [(0, 0, 16, 10), (17, 0, 33, 10), (0, 11, 16, 21), (17, 11, 33, 21), (8, 6, 24, 16)]


# -- extraction end to end through the CLI ------------------------------------------------------

def extract(args, cache):
    common = ["--backbone", MICRO, "--train-res", "16", "--val-res", "24", "--workers", "0", "--no-progress", "--cache", str(cache)]
    return CliRunner().invoke(app, ["extract", *args, *common])


@pytest.mark.parametrize("name,writer,n_train,n_val", [
    ("cocostuff27", write_cocostuff, 3 * 5, 2), ("cityscapes", write_cityscapes, 4 * 5, 4), ("potsdam", write_potsdam, 3, 2),
])
def test_extract_each_paper_dataset(tmp_path, name, writer, n_train, n_val):
    root = writer(tmp_path / "data")
    result = extract(["--preset", name, "--data-root", str(root)], tmp_path / "c")
    assert result.exit_code == 0, result.output
    stores = {p.name.split("-")[1]: cache_schema.open_feature_store(p) for p in cache_schema.list_feature_stores(tmp_path / "c")}
    train, val = stores["train"], stores["val"]
    assert len(train) == n_train and len(val) == n_val and train.complete and val.complete
    n_classes = {"cocostuff27": 27, "cityscapes": 27, "potsdam": 3}[name]
    for store in (train, val):
        labels = store[cache_schema.LABELS][:]
        assert labels.min() >= -1 and labels.max() < n_classes
    assert (name == "potsdam") == ("#" not in train.ids[0])
    assert cache_schema.IMAGES in val and cache_schema.IMAGES not in train
    assert train.attrs.params["crop"] == ("none" if name == "potsdam" else {"type": "five", "ratio": 0.5})
    assert val[cache_schema.TOKENS].shape == (n_val, 3, 3, 96)
    assert f"/train: {n_train} {'images' if name == 'potsdam' else 'crops'}," in result.output  # five-crop rows are crops
    assert val.attrs.params["flip"] and cache_schema.TOKENS_FLIP in val  # the paper presets' eval.flip: val also mirrored


def test_make_features_picks_the_preset(tmp_path):
    root = write_potsdam(tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "features", "DATASET=potsdam", f"DATA_ROOT={root}", f"CACHE={tmp_path / 'c'}",
         f"BIN={Path(sys.executable).parent}", f"ARGS=--backbone {MICRO} --workers 0 --no-progress --train-res 16 --val-res 24"],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "not recognized as a component" not in out.stderr  # zarr's noise about our own files beside the arrays
    names = sorted(p.name for p in cache_schema.list_feature_stores(tmp_path / "c"))
    assert [n.split("-")[:2] for n in names] == [["potsdam", "train"], ["potsdam", "val"]]


def test_presets_hold_table_1():
    from stegoscope.config import load_preset

    city = load_preset("cityscapes")
    city_stego = city.method_params("stego", 100)
    assert city.backbone == "vit_base_patch8" and city.splits["train"].crop == "five" and city.splits["train"].res == 224
    assert city.splits["val"].res == 320 and city.head_dim("stego") == 100 and city_stego.pointwise is False
    assert city_stego.lambda_rand == 0.9058762625226623 and city_stego.b_self == 0.45828472207
    pots = load_preset("potsdam")
    pots_stego = pots.method_params("stego", 70)
    assert pots.backbone == "vit_small_patch8" and pots.splits["train"].crop == "none"
    assert (pots_stego.steps, pots_stego.batch_size, pots.head_dim("stego")) == (5000, 16, 70)
    assert (pots.probe.steps, pots.probe.batch_size) == (5000, 16)  # the probes train as long as the head (Table 1)
    coco = load_preset("cocostuff27")
    coco_stego = coco.method_params("stego", 90)
    assert coco_stego.lambda_rand == 0.1538476246415498 and coco_stego.b_rand == 1.0 and coco.head_dim("stego") == 90
    assert (coco.probe.linear_lr, coco.eval.extra_clusters, coco_stego.feature_samples, coco_stego.neg_samples) == (0.005, 0, 11, 5)
    # the study's protocol: PCA on 5000 images, Gaussian RP, flip TTA at evaluation, h-NNE on Cityscapes only
    assert coco.method_params("pca").max_images == 5000 and coco.method_params("rp").kind == "gaussian" and coco.eval.flip
    assert "hnne" in city.methods and "hnne" not in coco.methods and "hnne" not in pots.methods


# -- bad input: one case each, the message names the file --------------------------------------

def test_missing_split_file_or_folder(tmp_path):
    root = write_potsdam(tmp_path / "p")
    (root / "potsdam" / "labelled_test.txt").unlink()
    with pytest.raises(DatasetError, match="labelled_test.txt: split file"):
        open_dataset("potsdam", root, "val")
    root = write_cocostuff(tmp_path / "c")
    (root / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DatasetError, match="Coco164kFull_Stuff_Coarse_7.txt: curated image list not found"):
        open_dataset("cocostuff27", root, "val")
    root = write_cityscapes(tmp_path / "y")
    import shutil

    shutil.rmtree(root / "cityscapes" / "gtFine" / "val")
    with pytest.raises(DatasetError, match="gtFine/val: split folder"):
        open_dataset("cityscapes", root, "val")
    with pytest.raises(DatasetError, match="nowhere/cityscapes: dataset folder not found"):
        open_dataset("cityscapes", tmp_path / "nowhere", "val")


def test_image_without_label_and_label_without_image(tmp_path):
    root = write_cityscapes(tmp_path / "y")
    label = root / "cityscapes" / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"
    label.unlink()
    [(_, error)] = open_dataset("cityscapes", root, "train").problems()
    assert str(label) in str(error)
    image = root / "cityscapes" / "leftImg8bit" / "val" / "bochum" / "bochum_000000_000019_leftImg8bit.png"
    image.unlink()
    [(_, error)] = open_dataset("cityscapes", root, "val").problems()
    assert str(image) in str(error) and "image of sample" in str(error)
    result = extract(["--preset", "cityscapes", "--data-root", str(root), "--split", "train"], tmp_path / "c")
    assert result.exit_code == 2 and "aachen_000001_000019_gtFine_labelIds.png" in result.output


def test_corrupt_and_truncated_images(tmp_path):
    root = write_cocostuff(tmp_path / "c")
    coco = open_dataset("cocostuff27", root, "val")
    path = coco.paths(0)[0]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated JPEG
    with pytest.raises(DatasetError, match=f"{path.name}: cannot decode image"):
        coco.image(0)
    coco.paths(1)[0].write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=f"{coco.paths(1)[0].name}: cannot decode image"):
        coco.image(1)


def test_label_values_out_of_range(tmp_path):
    root = write_cocostuff(tmp_path / "c")
    coco = open_dataset("cocostuff27", root, "val")
    Image.fromarray(np.full((40, 48), 200, np.uint8)).save(coco.paths(0)[1])
    with pytest.raises(DatasetError, match=r"000000002000.png: label values \[200\] are outside this dataset's ids \(0–181 and 255\)"):
        coco.label(0)
    root = write_cityscapes(tmp_path / "y")
    city = open_dataset("cityscapes", root, "val")
    Image.fromarray(np.full((32, 64), 40, np.uint8)).save(city.paths(0)[1])
    with pytest.raises(DatasetError, match=r"gtFine_labelIds.png: label values \[40\] .*\(0–33 and 255\)"):
        city.label(0)
    root = write_potsdam(tmp_path / "p")
    pots = open_dataset("potsdam", root, "train")
    savemat(pots.paths(0)[1], {"gt": np.full((16, 16), 7, np.uint8)})
    with pytest.raises(DatasetError, match=r"gt/0.mat: label values \[7\] .*\(0–5 and 255\)"):
        pots.label(0)


def test_16_bit_and_multichannel_label_png(tmp_path):
    root = write_cityscapes(tmp_path / "y")
    city = open_dataset("cityscapes", root, "val")
    Image.fromarray(np.full((32, 64), 7, np.uint16)).save(city.paths(0)[1])
    with pytest.raises(DatasetError, match=r"gtFine_labelIds.png: label image has mode I;16"):
        city.label(0)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(city.paths(1)[1])
    with pytest.raises(DatasetError, match=r"gtFine_labelIds.png: label image has mode RGB"):
        city.label(1)


def test_mat_without_the_expected_key(tmp_path):
    root = write_potsdam(tmp_path / "p")
    pots = open_dataset("potsdam", root, "train")
    savemat(pots.paths(1)[0], {"image": np.zeros((16, 16, 4), np.uint8)})
    with pytest.raises(DatasetError, match=r"imgs/1.mat: no key 'img' in the .mat file \(it has \['image'\]\)"):
        pots.image(1)
    savemat(pots.paths(2)[1], {"label": np.zeros((16, 16), np.uint8)})
    with pytest.raises(DatasetError, match=r"gt/2.mat: no key 'gt'"):
        pots.label(2)


def test_bad_sample_stops_extraction_and_nothing_is_marked_complete(tmp_path):
    root = write_potsdam(tmp_path / "p", n_train=6)
    savemat(root / "potsdam" / "gt" / "4.mat", {"gt": np.full((16, 16), 9, np.uint8)})
    result = extract(["--preset", "potsdam", "--data-root", str(root), "--split", "train", "--shard-size", "2",
                      "--batch-size", "2"], tmp_path / "c")
    assert result.exit_code == 2 and "gt/4.mat: label values [9]" in result.output and "Traceback" not in result.output
    [store_path] = cache_schema.list_feature_stores(tmp_path / "c")
    store = cache_schema.open_feature_store(store_path)
    assert not store.complete and 2 in store.pending_shards()
    # the fix the error names, into the same cache: the store is made again without the bad sample
    skipping = extract(["--preset", "potsdam", "--data-root", str(root), "--split", "train", "--shard-size", "2",
                        "--batch-size", "2", "--skip-bad"], tmp_path / "c")
    assert skipping.exit_code == 0 and "started without --skip-bad" in " ".join(skipping.output.split()), skipping.output
    store = cache_schema.open_feature_store(store_path)
    assert store.complete and store.ids == ["0", "1", "2", "3", "5"] and [e.id for e in store.attrs.skipped] == ["4"]


def test_skip_bad_records_and_skips(tmp_path):
    root = write_potsdam(tmp_path / "p", n_train=5)
    savemat(root / "potsdam" / "gt" / "1.mat", {"gt": np.full((16, 16), 9, np.uint8)})
    (root / "potsdam" / "imgs" / "3.mat").write_bytes(b"garbage")
    (root / "potsdam" / "gt" / "4.mat").unlink()
    result = extract(["--preset", "potsdam", "--data-root", str(root), "--split", "train", "--skip-bad"], tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "3 bad samples skipped" in result.output and "gt/4.mat" in result.output
    store = cache_schema.open_feature_store(cache_schema.list_feature_stores(tmp_path / "c")[0])
    assert store.complete and store.ids == ["0", "2"]
    skipped = {entry.id: entry.reason for entry in store.attrs.skipped}
    assert set(skipped) == {"1", "3", "4"} and "label values [9]" in skipped["1"] and "3.mat" in skipped["3"]
    assert not any("--skip-bad" in reason for reason in skipped.values())  # what was wrong, not an advice already taken
    again = extract(["--preset", "potsdam", "--data-root", str(root), "--split", "train", "--skip-bad"], tmp_path / "c")
    assert "cached" in again.output and "3 bad samples skipped" in again.output
    plain = extract(["--preset", "potsdam", "--data-root", str(root), "--split", "train"], tmp_path / "c")
    assert "cached" in plain.output and len(cache_schema.list_feature_stores(tmp_path / "c")) == 1  # --skip-bad is not keyed
