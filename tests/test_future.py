"""The paper's open questions as experiments: h-NNE's hierarchy as the clusterer."""

import numpy as np
import torch

from stegoscope import cache_schema
from stegoscope.cache_schema import IDS, LABELS, POOLED, TOKENS, StoreLayout
from stegoscope.probing import StoreArrays
from stegoscope.records import StoreAttrs
from stegoscope.reducers import HNNE
from stegoscope.stages.hierarchy import evaluate_levels


def planted(n_images, grid=4, channels=16, k=4, seed=0):
    """Tokens whose class (one of k, in 2×2-token blocks) is a direction; labels at 8 px per token."""
    directions = np.linalg.qr(np.random.default_rng(0).normal(size=(channels, channels)))[0][:k] * 6  # the same in every split
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, k, (n_images, grid // 2, grid // 2)).repeat(2, 1).repeat(2, 2)
    tokens = directions[classes] + 0.3 * rng.normal(size=(n_images, grid, grid, channels))
    return tokens.astype(np.float16), classes.repeat(8, 1).repeat(8, 2).astype(np.int16)


def test_hnne_hierarchy_levels_recover_planted_clusters_exactly(tmp_path):
    train, _ = planted(300, seed=1)
    reducer = HNNE(n_components=2, fit_tokens=4000, seed=0).fit(train.reshape(-1, 16))
    tokens, labels = planted(12, seed=2)
    layout = StoreLayout(12, (4, 4), 16, (32, 32), True, False, shard_images=6)
    store = cache_schema.create_feature_store(tmp_path / "val.zarr", layout, StoreAttrs(key="k" * 64, stage="test"))
    for s in range(2):
        sl = layout.shard_slice(s)
        store.write_shard(s, {TOKENS: tokens[sl], LABELS: labels[sl], POOLED: tokens[sl].mean((1, 2), dtype=np.float32),
                              IDS: np.array([str(i) for i in range(sl.start, sl.stop)])})
    store.mark_complete()
    levels = evaluate_levels(reducer, StoreArrays(store, (TOKENS, LABELS)), 4, torch.device("cpu"))
    sizes = [level["clusters"] for level in levels]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4  # finest first, coarser upwards
    # every level's clusters lie inside one planted class: the majority mapping recovers the classes
    # exactly; with more clusters than classes, one-to-one Hungarian cannot
    assert all(level["many_to_one"]["mIoU"] == 100 and level["many_to_one"]["Accuracy"] == 100 for level in levels)
    assert all(level["errors"]["mIoU"] < 100 for level in levels if level["clusters"] > 4)


def test_future_families_run_keyed_and_drawn_apart_from_the_paper_figures(tmp_path):
    import csv
    import json

    from conftest import invoke, write_micro_preset

    preset = write_micro_preset(tmp_path / "micro.yaml", extra="""future:
  clusterers: [cosine, kmeans]
  clusterer_methods: [pca]
  extra_clusters: [0, 4]
  loss_grid: {stego.lambda_rand: [0.3, 0.9], stego.b_rand: [0.2]}
""")
    cache = tmp_path / "c"
    ran = invoke("study", preset, "--cache", cache, "--only", "future", "--device", "cpu", "--no-progress")
    assert ran.exit_code == 0, ran.output
    assert "[clusterer=kmeans]" in ran.output and "[extra_clusters=4]" in ran.output
    again = invoke("study", preset, "--cache", cache, "--only", "future", "--device", "cpu", "--no-progress")
    assert again.exit_code == 0 and " 0 stages run" in again.output and "stages run" in again.output  # all cached
    assert not [line for line in again.output.splitlines() if "stages run" in line and " 0 stages run" not in line]
    drawn = invoke("figures", "--cache", cache)
    assert drawn.exit_code == 0, drawn.output
    out = cache / "figures" / "micro"
    for name in ("future_clusterers", "future_over_clustering", "future_loss_grid"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    over = [r for r in rows if r["family"] == "over-clustering" and r["probe"] == "cluster_many_to_one"]
    (artefact,) = (cache / "artefacts" / "probe").glob(f"dino-{over[0]['key'][:12]}*")
    best = json.loads((artefact / "metrics.json").read_text())["best"]
    assert float(over[0]["mIoU"]) == best["cluster_many_to_one/mIoU"]  # drawn from the artefact's own metrics
    assert {r["label"] for r in rows if r["family"] == "clusterers"} == {"clusterer=kmeans"}
    assert len({r["key"] for r in rows if r["family"] == "loss-grid"}) == 2
    table = (out / "table2.md").read_text()
    assert "λ_rand" not in table and "clusterer" not in table  # the families stay out of the paper's table
