"""What stegoscope reads holds data, not code: a head artefact is its state dict and parameters,
rebuilt through the registry; a pickle planted in one is refused and never run."""

import hashlib
import io
import json
import pickle

import numpy as np
import torch
from typer.testing import CliRunner

from conftest import write_micro_preset
from stegoscope.cli import app
from stegoscope.heads.base import HeadRun, ModuleReducer
from stegoscope.heads.smooseg import SmooSegParams, SmooSegTrainer
from test_import_stego import Gadget


def test_a_head_reducer_round_trips_through_arrays_and_json_and_computes_the_heads_code():
    torch.manual_seed(0)
    trainer = SmooSegTrainer(SmooSegParams(), HeadRun(n_classes=3, dim=4), channels=6)
    head = trainer.make_head().eval()
    exported = ModuleReducer.of(trainer, head)
    buffer = io.BytesIO()
    np.savez(buffer, **exported.state_dict())
    buffer.seek(0)
    with np.load(buffer) as arrays:  # allow_pickle=False: object arrays would not load
        state = {key: arrays[key] for key in arrays.files}
    rebuilt = ModuleReducer.from_state(json.loads(json.dumps(exported.params())), state)
    tokens = torch.randn(2, 5, 5, 6)
    with torch.no_grad():
        expected = head(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(rebuilt.transform_tensor(tokens), expected, rtol=0, atol=1e-6)
    assert all(array.dtype != object for array in state.values())


def plant(artefact, **arrays) -> None:
    """A hostile writer: ``payload.npz`` replaced by ``arrays``, the manifest made to agree."""
    np.savez(artefact / "payload.npz", **arrays)
    manifest = json.loads((artefact / "manifest.json").read_text())
    data = (artefact / "payload.npz").read_bytes()
    manifest["files"]["payload.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (artefact / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickle_planted_in_a_head_artefact_is_refused_with_the_artefact_named_and_never_run(tmp_path):
    import numpy.testing._private.utils as np_utils

    preset = write_micro_preset(tmp_path / "micro.yaml", extra="smooseg: {steps: 3, batch_size: 4, dim: 4}\n"
                                "eval: {val_every: 3, crf: none, keep_predictions: none}\n")
    cache, marker = tmp_path / "c", tmp_path / "PWNED"
    runner = CliRunner()
    out = runner.invoke(app, ["study", str(preset), "--cache", str(cache), "--only", "smooseg", "--no-progress"])
    assert out.exit_code == 0, out.output
    (artefact,) = (cache / "artefacts" / "train_smooseg").iterdir()
    # a hostile writer: the payload as an earlier version wrote it, a pickle inside, and a manifest that agrees
    gadget = pickle.dumps(Gadget(np_utils.runstring, f"open({str(marker)!r}, 'w')", {}))
    plant(artefact, module_=np.frombuffer(gadget, dtype=np.uint8))
    probe = runner.invoke(app, ["probe", "--preset", str(preset), "--cache", str(cache), "--reducer", str(artefact),
                                "--steps", "3", "--no-crf", "--no-progress"], env={"COLUMNS": "300"})
    assert probe.exit_code == 2, probe.output
    assert str(artefact) in probe.output and "never read" in probe.output
    assert not marker.exists()


def test_a_pickle_planted_in_an_hnne_fit_is_refused_with_the_artefact_named_and_never_run(tmp_path):
    import numpy.testing._private.utils as np_utils

    preset = write_micro_preset(tmp_path / "micro.yaml")
    cache, marker = tmp_path / "c", tmp_path / "PWNED"
    common = ["--preset", str(preset), "--cache", str(cache), "--no-progress"]
    runner = CliRunner()
    assert runner.invoke(app, ["extract", *common, "--no-flip"]).exit_code == 0
    out = runner.invoke(app, ["reduce", *common, "--method", "hnne", "--dim", "3", "--fit-tokens", "300"])
    assert out.exit_code == 0, out.output
    (artefact,) = (cache / "artefacts" / "reduce").iterdir()
    state = dict(np.load(artefact / "payload.npz", allow_pickle=False))
    assert all(array.dtype != object for array in state.values())
    gadget = Gadget(np_utils.runstring, f"open({str(marker)!r}, 'w')", {})
    # as an earlier version stored the fit (pickled bytes), and as an object array (np.save pickles it)
    for payload, said in (({**state, "model_": np.frombuffer(pickle.dumps(gadget), dtype=np.uint8)}, "never read"),
                          ({**state, "map_anchors": np.array([gadget], dtype=object)}, "allow_pickle=False")):
        plant(artefact, **payload)
        probe = runner.invoke(app, ["probe", *common, "--reducer", str(artefact), "--steps", "3", "--no-crf"],
                              env={"COLUMNS": "300"})
        assert probe.exit_code == 2, probe.output
        assert str(artefact) in probe.output and said in probe.output
        assert not marker.exists()


def test_a_manifest_of_the_wrong_shape_is_a_damaged_manifest_with_the_fix(tmp_path):
    import pytest

    from stegoscope.cache_schema import StoreError
    from stegoscope.pipeline import read_manifest, write_manifest
    from stegoscope.records import Manifest

    folder = tmp_path / "artefacts" / "probe" / "pca4-abc"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    write_manifest(folder, Manifest(key="abc", stage="probe"))
    assert read_manifest(folder).key == "abc"
    good = json.loads((folder / "manifest.json").read_text())
    for damage in ({"files": ["metrics.json"]}, {"key": 3}, {"files": {"metrics.json": {"bytes": "2", "sha256": "x"}}},
                   {"files": {"../../x": {"bytes": 2, "sha256": "x"}}}):
        (folder / "manifest.json").write_text(json.dumps(good | damage))
        with pytest.raises(StoreError, match=r"damaged manifest .*rerun the `stegoscope probe`"):
            read_manifest(folder)


def bomb_png(path, width=30_000, height=30_000):
    """A PNG whose header declares width × height grey pixels, with almost no data (the check
    must refuse it from the header, before anything is decoded)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_hostile_images_are_named_refused_or_skipped_with_memory_bounded(tmp_path, directory_dataset):
    import resource

    from conftest import write_directory_dataset
    from stegoscope.data.base import MAX_PIXELS, DatasetError, read_label_png, read_rgb

    assert MAX_PIXELS < 12_000 * 10_000 < 2 * 89_478_485 < 30_000 * 30_000  # ours refuses the first, PIL's the second
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for bomb in (bomb_png(tmp_path / "bomb.png"), bomb_png(tmp_path / "big.png", 12_000, 10_000)):
        for reader in (read_rgb, read_label_png):
            try:
                reader(bomb)
            except DatasetError as exc:
                assert str(exc).startswith(str(bomb)) and "decompression bomb" in str(exc)
            else:
                raise AssertionError(f"{bomb.name} was read")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near 360 MB was decoded
    root = write_directory_dataset(tmp_path / "hostile", n_train=6, n_val=2)
    images = sorted((root / "imgs" / "train").iterdir())
    bomb_png(images[0].with_suffix(".png"))
    images[0].unlink() if images[0].suffix != ".png" else None
    images[1].write_bytes(b"")  # a 0-byte file
    images[2].write_bytes(b"not an image at all")
    cache = tmp_path / "c"
    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\ndataset: directory\nbackbone: random:vit_micro_patch8\nn_classes: 3\n"
                      "extract:\n  splits:\n    train: {res: 32}\n    val: {res: 32}\n")
    common = ["extract", "--preset", str(preset), "--data-root", str(root), "--cache", str(cache), "--split", "train",
              "--workers", "0", "--no-progress"]
    runner = CliRunner()
    refused = runner.invoke(app, common, env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "decompression bomb" in refused.output, refused.output
    assert not list(cache.glob("features/*.zarr/zarr.json")) or "complete" not in "".join(
        p.read_text() for p in cache.glob("features/*.zarr/zarr.json"))
    skipped = runner.invoke(app, [*common, "--skip-bad"], env={"COLUMNS": "300"})  # the same cache: the fix the error names
    assert skipped.exit_code == 0, skipped.output
    import zarr

    (store,) = cache.glob("features/*.zarr")
    assert zarr.open_group(str(store), mode="r")["tokens"].shape[0] == 3  # the three hostile files skipped
