"""The probe stage on the demo stores, flip TTA, and the reported protocol."""

import json

import numpy as np
import pytest
import torch

from conftest import ok
from stegoscope import cache_schema, probing
from stegoscope.data.transforms import normalize
from stegoscope.models.backbone import build_backbone
from stegoscope.probing import CodeSource, Probes, StoreArrays, evaluate
from stegoscope.reducers import PCA, IdentityReducer


def test_probe_on_demo_stores_with_crf_and_flip(tmp_path, monkeypatch):
    cache = str(tmp_path / "c")
    ok("extract", "--preset", "demo", "--cache", cache, "--flip", "--workers", "0", "--no-progress")
    out = ok("probe", "--preset", "demo", "--reducer", "identity", "--steps", "20", "--flip", "--cache", cache,
                  "--no-progress")
    for needle in ("linear (best)", "cluster (best)", "mIoU", "Accuracy"):
        assert needle in out
    assert "yes" in out and "no" in out  # with and without CRF
    artefact = next((tmp_path / "c" / "artefacts" / "probe").glob("dino-*"))
    metrics = json.loads((artefact / "metrics.json").read_text())
    steps = [row["step"] for row in metrics["history"]]
    assert steps == [20]  # demo preset validates every 50 steps, and always at the last
    best = max(metrics["history"], key=lambda r: r["cluster/mIoU"])
    assert metrics["best"] == best and metrics["best_crf"]["step"] == best["step"]
    assert len(metrics["best"]["cluster/per_class_iou"]) == 4
    assert "cached" in ok("probe", "--preset", "demo", "--reducer", "identity", "--steps", "20", "--flip",
                               "--cache", cache, "--no-progress")

    # flip TTA: the stored mirrored tokens are the backbone's tokens of the mirrored image, mirrored back
    [val] = [cache_schema.open_feature_store(p) for p in cache_schema.list_feature_stores(tmp_path / "c") if "-val-" in p.name]
    pixels = torch.from_numpy(val[cache_schema.IMAGES][:2])
    with torch.no_grad():
        mirrored = build_backbone("random:vit_micro_patch8")(normalize(pixels.flip(2))).flip(2).half().numpy()
    np.testing.assert_array_equal(val[cache_schema.TOKENS_FLIP][:2], mirrored)
    codes = CodeSource(StoreArrays(val), IdentityReducer(), flip=True)(np.array([0, 1]))
    np.testing.assert_allclose(codes, (val[cache_schema.TOKENS][:2].astype(np.float32) + mirrored.astype(np.float32)) / 2)

    # The GPU path (arrays placed on the computing device, codes by transform_tensor, confusions
    # counted there), forced onto the CPU here, gives the host path's codes and metrics.
    cpu = torch.device("cpu")
    pca = PCA(n_components=8).fit(val[cache_schema.TOKENS][:].reshape(-1, val.layout.channels))
    host = {name: (StoreArrays(val), reducer) for name, reducer in (("identity", IdentityReducer()), ("pca", pca))}
    monkeypatch.setattr(probing, "placement", lambda nbytes, device, limit: probing.DEVICE)
    for name, (arrays, reducer) in host.items():
        placed = StoreArrays(val, device=cpu)
        assert placed.placement == probing.DEVICE and isinstance(placed.arrays[cache_schema.TOKENS], torch.Tensor)
        rows = np.array([3, 0, 2])
        np.testing.assert_array_equal(placed.rows(cache_schema.LABELS, rows), arrays.rows(cache_schema.LABELS, rows))
        on_host, on_device = CodeSource(arrays, reducer, flip=True), CodeSource(placed, reducer, flip=True)
        np.testing.assert_allclose(on_device.tensor(rows, cpu).numpy(), on_host(rows), rtol=1e-5, atol=1e-4)
        torch.manual_seed(0)
        probes = Probes(on_host(rows).shape[-1], 4)
        expected, got = evaluate(on_host, probes, cpu), evaluate(on_device, probes, cpu)
        for key in ("linear/mIoU", "linear/Accuracy", "cluster/mIoU", "cluster/Accuracy"):
            assert abs(got[key] - expected[key]) < (1e-9 if name == "identity" else 0.05), (name, key)


def test_placed_arrays_are_kept_for_the_next_reader_of_the_same_store(tmp_path):
    from test_reducers import dino_like_tokens, make_store

    store = make_store(tmp_path / "s.zarr", dino_like_tokens(n_images=10))
    first = StoreArrays(store, (cache_schema.TOKENS,))
    assert first.placement == probing.HOST
    np.testing.assert_array_equal(first.arrays[cache_schema.TOKENS], store[cache_schema.TOKENS][:])
    tokens = first.arrays[cache_schema.TOKENS]
    del first
    assert StoreArrays(store, (cache_schema.TOKENS,)).arrays[cache_schema.TOKENS] is tokens  # kept: not read again
    held = StoreArrays(store, (cache_schema.TOKENS,))
    other = make_store(tmp_path / "t.zarr", dino_like_tokens(n_images=4, seed=1))
    StoreArrays(other, (cache_schema.TOKENS,))  # a new placement keeps what a live reader holds ...
    assert StoreArrays(store, (cache_schema.TOKENS,)).arrays[cache_schema.TOKENS] is held.arrays[cache_schema.TOKENS]
    del held
    StoreArrays(other, (cache_schema.POOLED,))  # ... and drops the rest
    assert StoreArrays(store, (cache_schema.TOKENS,)).arrays[cache_schema.TOKENS] is not tokens
    probing.release_placed()


def test_evaluation_over_val_gives_the_same_counts_as_tasks_on_a_local_cluster(tmp_path):
    """Under dask.distributed each batch of val rows is a task reading the store by its path."""
    from conftest import write_micro_preset
    from stegoscope import compute
    from stegoscope.compute import dask_scheduler

    preset, cache = str(write_micro_preset(tmp_path / "micro.yaml")), str(tmp_path / "c")
    ok("extract", "--preset", preset, "--cache", cache, "--flip", "--workers", "0", "--no-progress")
    [val] = [cache_schema.open_feature_store(p) for p in cache_schema.list_feature_stores(tmp_path / "c") if "-val-" in p.name]
    pca = PCA(n_components=5).fit(val[cache_schema.TOKENS][:].reshape(-1, val.layout.channels))
    source = CodeSource(StoreArrays(val), pca, flip=True)
    torch.manual_seed(0)
    probes = Probes(5, 4, extra_clusters=2)
    cpu = torch.device("cpu")
    here = evaluate(source, probes, cpu, batch=2)
    assert compute.distributed_workers() == 0
    here_crf = evaluate(source, probes, cpu, batch=2, crf=probing.CRFPool(0))  # the CRF in this process
    with dask_scheduler("local-cluster"):
        assert compute.distributed_workers() == 2
        tasks = evaluate(source, probes, cpu, batch=2)
        tasks_crf = evaluate(source, probes, cpu, batch=2, crf=probing.CRFPool(2))  # the CRF in the tasks
        with pytest.raises(probing.CRFError, match="took over"):  # a task past its time stops the run
            evaluate(source, probes, cpu, batch=2, crf=probing.CRFPool(2, timeout=1e-4))
    assert tasks == here  # the same confusion counts, so every metric and assignment
    assert tasks_crf == here_crf and tasks_crf != here
