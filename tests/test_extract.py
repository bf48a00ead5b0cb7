"""The extract stage end to end on generated fixtures: store contents, reuse, keys (resume: test_reliability)."""


import numpy as np
import pytest
import torch
import xarray
from PIL import Image

from stegoscope import cache_schema
from stegoscope.data import DirectoryDataset
from stegoscope.data.transforms import normalize, transform_image, transform_label
from stegoscope.models.backbone import build_backbone
from stegoscope.pipeline import run_stage
from stegoscope.stages import extract as extract_module
from stegoscope.stages.extract import ExtractParams, ExtractStage

MICRO = "random:vit_micro_patch8"


def make_stage(cache, root, **overrides):
    params = dict(dataset="directory", split="val", res=32, backbone=MICRO, n_classes=3, store_images=True)
    params.update(overrides)
    return ExtractStage(cache, root, ExtractParams(**params), batch_size=3, workers=0, shard_images=2, show_progress=False)


def test_store_holds_the_backbone_tokens_labels_and_pixels(cache, directory_dataset):
    stage = make_stage(cache, directory_dataset)
    result = run_stage(stage)
    assert not result.skipped and result.detail.shards_written == 2

    ds = xarray.open_zarr(stage.output)
    assert ds.tokens.dims == ("image", "y", "x", "channel") and ds.tokens.dtype == np.float16
    assert ds.tokens.shape == (4, 4, 4, 96) and ds.labels.shape == (4, 32, 32)

    store = cache_schema.open_feature_store(stage.output)
    assert store.complete and store.key == stage.key
    reader = DirectoryDataset(directory_dataset, "val", n_classes=3)
    assert store.ids == reader.ids == ["img000", "img001", "img002", "img003"]
    backbone = build_backbone(MICRO)
    for i in range(4):
        pixels = transform_image(reader.image(i), 32)
        with torch.no_grad():
            feats = backbone(normalize(torch.from_numpy(pixels.copy())[None]))[0]
        np.testing.assert_array_equal(store[cache_schema.IMAGES][i], pixels)
        np.testing.assert_array_equal(store[cache_schema.TOKENS][i], feats.half().numpy())
        np.testing.assert_allclose(store[cache_schema.POOLED][i], feats.mean((0, 1)).numpy(), rtol=1e-5, atol=1e-6)
        raw = np.asarray(Image.open(directory_dataset / "labels" / "val" / f"img{i:03d}.png")).astype(int)
        expected = transform_label(np.where(raw == 255, -1, raw), 32)
        np.testing.assert_array_equal(store[cache_schema.LABELS][i], expected)
    labels = ds.labels.values
    assert (labels == -1).any() and labels.min() == -1 and labels.max() <= 2  # 255 in the source → -1


def test_second_run_does_no_backbone_work(cache, directory_dataset, monkeypatch):
    run_stage(make_stage(cache, directory_dataset))

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built on a cached store")

    monkeypatch.setattr(extract_module, "build_backbone", no_backbone)
    again = run_stage(make_stage(cache, directory_dataset))
    assert again.skipped


def test_keyed_parameters_change_the_key(cache, directory_dataset, tmp_path):
    base = make_stage(cache, directory_dataset).key
    assert make_stage(cache, directory_dataset).key == base  # nothing changed: reused
    for change in ({"res": 40}, {"interpolation": "bilinear"}, {"backbone": "random:vit_small_patch8"}, {"seed": 1}, {"split": "train"}):
        assert make_stage(cache, directory_dataset, **change).key != base, change

    # weights: two files with different contents
    w1, w2 = tmp_path / "w1.pth", tmp_path / "w2.pth"
    torch.save(build_backbone("random:vit_small_patch8", seed=1).vit.state_dict(), w1)
    torch.save(build_backbone("random:vit_small_patch8", seed=2).vit.state_dict(), w2)
    k1 = make_stage(cache, directory_dataset, backbone="vit_small_patch8", weights=str(w1)).key
    k2 = make_stage(cache, directory_dataset, backbone="vit_small_patch8", weights=str(w2)).key
    assert len({k1, k2, base}) == 3

    # a dataset file modified, added, removed
    image = directory_dataset / "imgs" / "val" / "img000.png"
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(image)
    modified = make_stage(cache, directory_dataset).key
    assert modified != base
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(directory_dataset / "imgs" / "val" / "extra.png")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(directory_dataset / "labels" / "val" / "extra.png")
    added = make_stage(cache, directory_dataset).key
    assert added not in (base, modified)


def test_cli_extract_status_and_clear_errors(tmp_path, directory_dataset):
    from typer.testing import CliRunner

    from stegoscope.cli import app

    runner = CliRunner()
    args = ["--preset", "directory", "--data-root", str(directory_dataset), "--backbone", MICRO, "--n-classes", "3",
            "--train-res", "32", "--val-res", "48", "--workers", "0", "--cache", str(tmp_path / "c"), "--no-progress"]
    first = runner.invoke(app, ["extract", *args])
    assert first.exit_code == 0, first.output
    assert "RANDOM weights" in first.output and first.output.count(".zarr") == 2
    second = runner.invoke(app, ["extract", *args])
    assert second.output.count("cached, no backbone work") == 2
    status = runner.invoke(app, ["status", "--cache", str(tmp_path / "c")])
    assert status.exit_code == 0 and status.output.count("complete") == 2

    missing = runner.invoke(app, ["extract", "--preset", "directory", "--data-root", str(tmp_path / "nowhere"),
                                  "--backbone", MICRO, "--cache", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "nowhere/imgs/train" in missing.output and "Traceback" not in missing.output
    offline = runner.invoke(app, ["extract", "--data-root", str(directory_dataset), "--n-classes", "3",
                                  "--cache", str(tmp_path / "c")])
    assert offline.exit_code == 2 and "--weights" in offline.output


@pytest.mark.parametrize("help_for", ["extract", "status", "demo"])
def test_every_option_is_explained(help_for):
    from typer.testing import CliRunner

    from stegoscope.cli import app

    out = CliRunner().invoke(app, [help_for, "--help"], env={"COLUMNS": "200"}).output
    options = [line for line in out.splitlines() if line.strip().startswith(("│ --", "│ -"))]
    assert options
    for line in options:
        text = line.strip("│ ").split(None, 1)
        assert len(text) == 2 and len(text[1].split()) >= 2, f"option without help: {line}"


@pytest.mark.parametrize("split, crop", [("val", "none"), ("train", "five")])
def test_decoding_on_the_device_gives_the_cpu_paths_store(tmp_path, directory_dataset, monkeypatch, split, crop):
    """The GPU path's code (decode_jpeg, tensor crop and resize) run on the CPU: the same store."""
    from stegoscope.data import decode

    decoded = []
    real = decode._decode_jpegs
    monkeypatch.setattr(decode, "_decode_jpegs", lambda encoded, device: decoded.extend(encoded) or real(encoded, device))
    stores = {}
    for mode in ("cpu", "device"):
        params = ExtractParams(dataset="directory", split=split, res=32, backbone=MICRO, n_classes=3, store_images=True, crop=crop)
        stage = ExtractStage(tmp_path / mode, directory_dataset, params, batch_size=3, workers=0, shard_images=4,
                             show_progress=False, decode=mode)
        run_stage(stage)
        stores[mode] = cache_schema.open_feature_store(stage.output)
    jpegs = len(list((directory_dataset / "imgs" / split).glob("*.jpg")))
    assert jpegs and len(decoded) == jpegs * (5 if crop == "five" else 1)  # JPEGs went through decode_jpeg
    cpu, device = stores["cpu"], stores["device"]
    assert cpu.key == device.key and cpu.ids == device.ids
    assert ([cpu.attrs.extracted_with, device.attrs.extracted_with]
            == [{"device": "cpu", "decode": mode} for mode in ("cpu", "device")])
    for name in (cache_schema.IMAGES, cache_schema.LABELS, cache_schema.TOKENS, cache_schema.POOLED):
        np.testing.assert_array_equal(device[name][:], cpu[name][:], err_msg=name)


def test_a_corrupt_jpeg_decoded_on_the_device_is_named(tmp_path, directory_dataset):
    bad = next((directory_dataset / "imgs" / "val").glob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:200])
    params = ExtractParams(dataset="directory", split="val", res=32, backbone=MICRO, n_classes=3)
    stage = ExtractStage(tmp_path / "c", directory_dataset, params, workers=0, show_progress=False, decode="device")
    with pytest.raises(Exception, match=f"{bad.name}: cannot decode image"):
        run_stage(stage)


def test_a_batch_spanning_more_shards_than_buffers_completes(tmp_path):
    """9 one-image shards in one batch with 3 shard buffers: each full shard goes to the writer
    before the next buffer is taken, so nothing waits for a buffer that is never returned."""
    import threading

    from conftest import write_directory_dataset

    root = write_directory_dataset(tmp_path / "data", n_train=1, n_val=9)
    params = ExtractParams(dataset="directory", split="val", res=32, backbone=MICRO, n_classes=3)
    stage = ExtractStage(tmp_path / "c", root, params, batch_size=9, workers=0, shard_images=1, show_progress=False, writers=1)
    run = threading.Thread(target=run_stage, args=(stage,), daemon=True)
    run.start()
    run.join(120)
    assert not run.is_alive(), "extraction is stuck waiting for a shard buffer"
    store = cache_schema.open_feature_store(stage.output)
    assert store.complete and store.ids == [f"img{i:03d}" for i in range(9)]


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_label_of_another_size_is_named(tmp_path, directory_dataset, decode):
    label = directory_dataset / "labels" / "val" / "img001.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(label)  # its image is 40x32
    params = ExtractParams(dataset="directory", split="val", res=32, backbone=MICRO, n_classes=3)
    stage = ExtractStage(tmp_path / "c", directory_dataset, params, workers=0, show_progress=False, decode=decode)
    with pytest.raises(Exception, match="img001.png: label is 12x10 but its image is 40x32"):
        run_stage(stage)


def test_extract_with_a_dinov2_backbone_writes_16x16_tokens(tmp_path):
    from typer.testing import CliRunner

    from conftest import write_directory_dataset
    from stegoscope.cli import app

    data = write_directory_dataset(tmp_path / "data", n_train=2, n_val=1)
    args = ["extract", "--preset", "directory", "--data-root", data, "--split", "train", "--backbone", "random:vit_small_patch14_dinov2",
            "--n-classes", 3, "--train-res", 224, "--workers", 0, "--device", "cpu", "--no-progress", "--cache", tmp_path / "c"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    (path,) = cache_schema.list_feature_stores(tmp_path / "c")
    ds = xarray.open_zarr(path)
    assert ds.tokens.shape == (2, 16, 16, 384) and "random_vit_small_patch14_dinov2" in path.name
    wrong = CliRunner().invoke(app, [str(a) for a in args[:-2] + ["--train-res", 320, "--cache", tmp_path / "d"]])
    assert wrong.exit_code != 0 and "322" in wrong.output  # the nearest multiples of 14 are named


def test_auto_decoding_picks_the_faster_measured_decoder_and_says_why(tmp_path, directory_dataset):
    from stegoscope.stages.extract import choose_decoder

    # 4 workers on 2 cores at 10 ms an image: 200 img/s, against the device's 150 or 250
    assert choose_decoder(0.010, 150.0, workers=4, cores=2)[0] == "cpu"
    mode, reason = choose_decoder(0.010, 250.0, workers=4, cores=2)
    assert mode == "device" and "250 img/s on the device" in reason and "200 img/s in 2 worker(s)" in reason
    assert choose_decoder(0.010, 250.0, workers=8, cores=16)[0] == "cpu"  # 800 img/s in 8 workers
    params = ExtractParams(dataset="directory", split="val", res=32, backbone=MICRO, n_classes=3)
    stage = ExtractStage(tmp_path / "c", directory_dataset, params, workers=0, show_progress=False)
    per_image, device_rate = stage._measure_decoders(torch.device("cpu"), images=3)  # the device path's code, on the CPU
    assert 0 < per_image < 10 and device_rate > 0
    assert stage.decode_mode(torch.device("cpu")) == "cpu"  # no measurement where there is no choice
