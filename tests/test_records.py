"""Typed records: round trips, refusals that name the file and the field, and files written
before typed records (record version 1) read through the one compatibility function."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from stegoscope import cache_schema
from stegoscope.records import (
    RECORD_VERSION,
    EvalResult,
    FileEntry,
    LevelScores,
    Manifest,
    RecordError,
    Scores,
    StepScores,
    StoreAttrs,
    StudyNode,
    StudyRecord,
    experiment_id,
)

ROW = {"step": 40, "linear/mIoU": 31.5, "linear/Accuracy": 70.25, "linear/per_class_iou": [12.0, float("nan"), 51.0],
       "cluster/mIoU": 20.0, "cluster/Accuracy": 55.5, "cluster/assignment": [2, 0, 1], "loss_linear": 0.75}


def test_every_record_reads_back_what_it_wrote_through_json():
    step = StepScores.from_dict(ROW)
    records = [
        Manifest(key="k" * 64, stage="probe", params={"steps": 40}, inputs=["a", "b"], files={"metrics.json": FileEntry(10, "f" * 64)},
                 dataset="potsdam", method="pca", code_dim=8, seed=1),
        StoreAttrs(key="k" * 64, stage="extract", schema_version=1, params={"res": 224}, dataset="potsdam", split="train",
                   skipped=[], pixels=[224, 224]),
        EvalResult(best=step, final=step, history=[step], n_classes=3, seconds={"train": 1.5},
                   levels=[LevelScores(0, 5, Scores(10.0, 20.0), Scores(30.0, 40.0))]),
        StudyRecord(study="demo", experiment="base", preset_sha256="p", updated=1.0,
                    nodes={"probe pca 8": StudyNode(key="k", output="artefacts/probe/x", kind="result", stage="probe", dim=8)}),
    ]
    for record in records:
        text = json.dumps(record.to_dict())
        again = type(record).from_dict(json.loads(text))
        assert json.dumps(again.to_dict()) == text  # NaN per-class values included
        assert json.loads(text)["record_version"] == RECORD_VERSION


def test_a_validation_row_keeps_its_flat_form_and_reads_as_probes_and_losses():
    step = StepScores.from_dict(ROW)
    assert step.step == 40 and step.losses == {"loss_linear": 0.75}
    assert step.probes["cluster"] == Scores(20.0, 55.5, assignment=[2, 0, 1])
    assert step.score("linear", "Accuracy") == 70.25 and np.isnan(step.score("cluster_many_to_one", "mIoU"))
    assert json.dumps(step.to_dict()) == json.dumps(ROW)


@pytest.mark.parametrize("damage, field", [
    ({"code_dim": "8"}, "code_dim"),  # a string where an integer belongs
    ({"files": {"payload.npz": {"bytes": "2", "sha256": "x"}}}, "bytes"),
    ({"inputs": "abc"}, "inputs"),
    ({"resident": "no"}, "resident"),  # not a bool
    ({"surprise": 1}, "surprise"),  # a field no manifest has
])
def test_a_damaged_manifest_names_the_file_and_the_field(damage, field):
    good = Manifest(key="k", stage="probe").to_dict()
    with pytest.raises(RecordError, match=rf"^x/manifest\.json: .*{field}"):
        Manifest.from_dict(good | damage, "x/manifest.json")


def test_a_record_of_a_newer_stegoscope_is_refused_with_the_fix():
    with pytest.raises(RecordError, match="record version 3.*upgrade stegoscope"):
        Manifest.from_dict({"record_version": RECORD_VERSION + 1, "key": "k", "stage": "probe"}, "m.json")


def test_version_1_files_read_through_the_compatibility_function():
    # as the code before typed records wrote them
    config = {"stage": "reduce", "params": {"dim": 8, "seed": 3}, "inputs": {}}
    manifest = Manifest.from_dict({"key": "k" * 64, "stage": "reduce", "params": {}, "inputs": [], "config": config,
                                   "train_store": "/c/features/x.zarr", "files": {}, "dataset": "potsdam"})
    assert manifest.store == "/c/features/x.zarr" and manifest.experiment == experiment_id(config)
    masks = Manifest.from_dict({"key": "k", "stage": "primaps_masks", "store": "s", "images": 4, "masks_per_image": 2.5,
                                "images_without_masks": 0, "files": {}})
    assert masks.store == "s"
    attrs = StoreAttrs.from_dict({"key": "k", "stage": "extract", "schema_version": 1, "spec": {"res": 224},
                                  "params": {"dataset": "cityscapes", "split": "val", "res": 224}, "status": "complete"})
    assert (attrs.params, attrs.dataset, attrs.split, attrs.extraction["res"]) == ({"res": 224}, "cityscapes", "val", 224)
    projected = StoreAttrs.from_dict({"key": "k", "stage": "project", "schema_version": 1, "spec": {"reducer": "r"}})
    assert projected.params == {"reducer": "r"} and projected.dataset is None
    row = {"linear/mIoU": 1.0, "linear/Accuracy": 2.0, "cluster/mIoU": 3.0, "cluster/Accuracy": 4.0}
    imported = EvalResult.from_dict({"no_crf": row, "crf": row | {"linear/mIoU": 9.0}, "checkpoint": {"dim": 6}})
    assert [(crf, r.score("linear", "mIoU")) for crf, r in imported.kept()] == [("no", 1.0), ("yes", 9.0)]
    study = StudyRecord.from_dict({"study": "s", "experiment": "base", "preset_sha256": "p", "updated": 1.0,
                                   "nodes": {"a": {"key": "k", "output": "o", "result": True},
                                             "b": {"key": "l", "output": "p", "result": False}}})
    assert [n.kind for n in study.nodes.values()] == ["result", "fit"]


def test_a_store_written_with_version_1_attributes_opens_and_says_its_dataset(tmp_path):
    layout = cache_schema.StoreLayout(2, (2, 2), 4, (16, 16), labelled=False, with_images=False, shard_images=2)
    store = cache_schema.create_feature_store(tmp_path / "s.zarr", layout, StoreAttrs(key="k" * 64, stage="extract"))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    old = {k: v for k, v in group.attrs.asdict().items() if k not in ("record_version", "params", "dataset", "split")}
    group.attrs.clear()
    group.attrs.update(old | {"spec": {"reducer": "r"}, "params": {"dataset": "potsdam", "split": "train"}})
    attrs = cache_schema.open_feature_store(store.path).attrs
    assert (attrs.dataset, attrs.split, attrs.params, attrs.key) == ("potsdam", "train", {"reducer": "r"}, "k" * 64)


def test_damaged_store_attributes_are_a_store_error_naming_the_store(tmp_path):
    layout = cache_schema.StoreLayout(2, (2, 2), 4, (16, 16), labelled=False, with_images=False, shard_images=2)
    cache_schema.create_feature_store(tmp_path / "s.zarr", layout, StoreAttrs(key="k" * 64, stage="extract"))
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["skipped"] = [{"id": 3}]
    with pytest.raises(cache_schema.StoreError, match=r"s\.zarr \(attributes\): skipped\[0\]: id: 3 \(int\), expected a string; rerun"):
        cache_schema.open_feature_store(tmp_path / "s.zarr")
