"""Per-image predictions kept by a study: the maps its metrics were scored from, rebuilt from
the stored weights (nothing retrained)."""

import json
import shutil

import numpy as np
import pytest

from conftest import ok, write_micro_preset
from stegoscope.cache_schema import LABELS, open_complete_store
from stegoscope.stages import predictions
from stegoscope.stages.predictions import load_predictions


def _hand_scores(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[float, list[float], list[float], list[float]]:
    """mIoU and per-class IoU, precision and recall (%) from a class map, counted pixel by pixel
    (the reference §8 definitions): together they pin down the confusion matrix's diagonal and margins."""
    valid = (labels >= 0) & (labels < n_classes)
    p, t = pred[valid].astype(int), labels[valid].astype(int)
    ratio = lambda a, b: a / b * 100 if b else np.nan  # noqa: E731
    hits = [np.sum((p == c) & (t == c)) for c in range(n_classes)]
    ious = [ratio(hits[c], np.sum((p == c) | (t == c))) for c in range(n_classes)]
    precision = [ratio(hits[c], np.sum(p == c)) for c in range(n_classes)]
    recall = [ratio(hits[c], np.sum(t == c)) for c in range(n_classes)]
    return float(np.nanmean(ious)), ious, precision, recall


def _image_miou(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    present = [c for c in range(n_classes) if np.any(labels == c)]
    valid = (labels >= 0) & (labels < n_classes)
    return float(np.mean([np.sum((pred == c) & (labels == c) & valid) / np.sum(((pred == c) | (labels == c)) & valid)
                          for c in present]) * 100)


def test_kept_predictions_are_the_maps_the_metrics_were_scored_from_and_are_remade_without_retraining(tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "CHUNK", 4)  # 6 val images: two chunks
    preset = write_micro_preset(tmp_path / "micro.yaml", extra="smooseg: {steps: 3, batch_size: 4, dim: 4}\n")
    preset.write_text(preset.read_text().replace("methods: [pca, stego]", "methods: [pca, stego, smooseg]")
                      .replace("keep_predictions: none", "keep_predictions: all"))
    cache = tmp_path / "c"
    out = ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "MB" in out and "predictions of" in out  # the disk cost, said before writing
    kept = sorted((cache / "artefacts" / "predictions").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in kept] == ["pca4", "smooseg4", "stego4"]

    val = open_complete_store(next((cache / "features").glob("*-val-*.zarr")))
    labels = val[LABELS][:]
    for folder in kept:
        manifest = json.loads((folder / "manifest.json").read_text())
        (result,) = [p for p in (cache / "artefacts").glob("*/*") if p.name.endswith(manifest["inputs"][0][:12])]
        metrics = json.loads((result / "metrics.json").read_text())
        payload = load_predictions(folder)
        with_crf = metrics.get("best_crf") is not None
        assert ("cluster_crf" in payload) == with_crf == (not folder.name.startswith("pca"))  # eval.crf: table2 (heads at D)
        for suffix, row in [("", metrics["best"])] + ([("_crf", metrics["best_crf"])] if with_crf else []):
            for probe in ("cluster", "linear"):
                maps = payload[f"{probe}{suffix}"]
                assert maps.dtype == np.uint8 and maps.shape == labels.shape
                miou, iou, precision, recall = _hand_scores(maps, labels, 4)
                assert miou == pytest.approx(row[f"{probe}/mIoU"], abs=1e-9), (folder.name, probe, suffix)
                for mine, theirs in ((iou, "iou"), (precision, "precision"), (recall, "recall")):
                    np.testing.assert_allclose(mine, row[f"{probe}/per_class_{theirs}"], atol=1e-9)
                for i in range(len(labels)):
                    assert payload[f"{probe}{suffix}_scores"][i, 0] == pytest.approx(_image_miou(maps[i], labels[i], 4), abs=1e-4)
                    accuracy = np.mean(maps[i][labels[i] >= 0] == labels[i][labels[i] >= 0]) * 100
                    assert payload[f"{probe}{suffix}_scores"][i, 1] == pytest.approx(accuracy, abs=1e-4)

    again = ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "0 stages run" in again
    # a cache made before predictions were kept: they are made from the stored weights alone
    before = {p.name: load_predictions(p) for p in kept}
    for folder in kept:
        shutil.rmtree(folder)
    remade = ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "3 stages run" in remade
    for folder in kept:
        assert sorted(p.name for p in folder.glob("chunk-*")) == ["chunk-00000.npz", "chunk-00001.npz"]
        for name, array in before[folder.name].items():
            np.testing.assert_array_equal(load_predictions(folder)[name], array)
    # killed after its first chunk: the rerun writes only the second
    stego = kept[-1]
    first = (stego / "chunk-00000.npz").stat().st_mtime_ns
    (stego / "manifest.json").unlink()
    (stego / "chunk-00001.npz").unlink()
    assert "1 stages run" in ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert (stego / "chunk-00000.npz").stat().st_mtime_ns == first
    for name, array in before[stego.name].items():
        np.testing.assert_array_equal(load_predictions(stego)[name], array)
