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


def test_a_pickle_planted_in_a_head_artefact_is_refused_with_the_artefact_named_and_never_run(tmp_path):
    import numpy.testing._private.utils as np_utils

    preset = write_micro_preset(tmp_path / "micro.yaml", extra="smooseg: {steps: 3, batch_size: 4, dim: 4}\neval: {val_every: 3, crf: none}\n")
    cache, marker = tmp_path / "c", tmp_path / "PWNED"
    runner = CliRunner()
    out = runner.invoke(app, ["study", str(preset), "--cache", str(cache), "--only", "smooseg", "--no-progress"])
    assert out.exit_code == 0, out.output
    (artefact,) = (cache / "artefacts" / "train_smooseg").iterdir()
    # a hostile writer: the payload as an earlier version wrote it, a pickle inside, and a manifest that agrees
    gadget = pickle.dumps(Gadget(np_utils.runstring, f"open({str(marker)!r}, 'w')", {}))
    np.savez(artefact / "payload.npz", module_=np.frombuffer(gadget, dtype=np.uint8))
    manifest = json.loads((artefact / "manifest.json").read_text())
    data = (artefact / "payload.npz").read_bytes()
    manifest["files"]["payload.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (artefact / "manifest.json").write_text(json.dumps(manifest))
    probe = runner.invoke(app, ["probe", "--preset", str(preset), "--cache", str(cache), "--reducer", str(artefact),
                                "--steps", "3", "--no-crf", "--no-progress"], env={"COLUMNS": "300"})
    assert probe.exit_code == 2, probe.output
    assert str(artefact) in probe.output and "never read" in probe.output
    assert not marker.exists()


def test_a_manifest_of_the_wrong_shape_is_a_damaged_manifest_with_the_fix(tmp_path):
    import pytest

    from stegoscope.cache_schema import StoreError
    from stegoscope.pipeline import read_manifest, write_manifest

    folder = tmp_path / "artefacts" / "probe" / "pca4-abc"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    write_manifest(folder, {"key": "abc", "stage": "probe", "params": {}, "inputs": []})
    assert read_manifest(folder)["key"] == "abc"
    good = json.loads((folder / "manifest.json").read_text())
    for damage in ({"files": ["metrics.json"]}, {"key": 3}, {"files": {"metrics.json": {"bytes": "2", "sha256": "x"}}},
                   {"files": {"../../x": {"bytes": 2, "sha256": "x"}}}):
        (folder / "manifest.json").write_text(json.dumps(good | damage))
        with pytest.raises(StoreError, match=r"damaged manifest .*rerun the `stegoscope probe`"):
            read_manifest(folder)
