"""Figures and Table 2 from hand-made metric artefacts: right series, right x, right numbers."""

import json

import numpy as np
from typer.testing import CliRunner

from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.pipeline import write_manifest
from stegoscope.stages.figures import collect_results, metric_figure, table2


def fake_probe(cache, dataset, method, dim, seed, linear_miou, cluster_miou, crf=None, stage="probe"):
    key = f"{seed}{dim:04d}{method}{dataset}".ljust(64, "0")
    directory = cache_schema.artefact_dir(cache, stage, f"{method}{dim}", key)
    directory.mkdir(parents=True)
    row = {"step": 300, "linear/mIoU": linear_miou, "linear/Accuracy": linear_miou + 20,
           "cluster/mIoU": cluster_miou, "cluster/Accuracy": cluster_miou + 30}
    metrics = {"history": [row], "best": row, "final": row}
    if crf:
        metrics["best_crf"] = {"step": 300, "linear/mIoU": crf[0], "linear/Accuracy": crf[0] + 20,
                               "cluster/mIoU": crf[1], "cluster/Accuracy": crf[1] + 30}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(directory, {"key": key, "dataset": dataset, "method": method, "code_dim": dim, "seed": seed})


def test_figures_draw_the_given_series(tmp_path):
    cache = tmp_path / "c"
    for dim, lin, clu in ((3, 10.0, 5.0), (24, 30.0, 20.0), (90, 40.0, 27.0)):
        fake_probe(cache, "cocostuff27", "pca", dim, 0, lin, clu)
        fake_probe(cache, "cocostuff27", "stego", dim, 0, lin + 1, clu + 1, stage="train_stego")
    fake_probe(cache, "cocostuff27", "stego", 90, 1, 43.0, 30.0, stage="train_stego")  # a second seed at 90
    fake_probe(cache, "cocostuff27", "dino", 768, 0, 44.0, 12.0, crf=(45.0, 13.5))
    fake_probe(cache, "potsdam", "rp", 6, 0, 50.0, 40.0)
    fake_probe(cache, "potsdam", "dino", 384, 0, 70.0, 50.0, crf=(72.0, 54.0))

    rows = collect_results(cache)
    fig = metric_figure(rows, "mIoU")
    assert len(fig.axes) == 4  # 2 × 2: only datasets with results
    coco_linear, coco_cluster = fig.axes[0], fig.axes[2]
    assert coco_linear.get_title() == "Cocostuff — linear" and fig.axes[1].get_title() == "Potsdam — linear"
    lines = {line.get_label(): line for line in coco_linear.lines}
    np.testing.assert_array_equal(lines["PCA"].get_xdata(), [3, 24, 90])
    np.testing.assert_array_equal(lines["PCA"].get_ydata(), [10, 30, 40])
    np.testing.assert_array_equal(lines["STEGO"].get_ydata(), [11, 31, (41 + 43) / 2])  # mean over seeds
    np.testing.assert_array_equal(lines["DINO + CRF"].get_xdata(), [768])
    np.testing.assert_array_equal(lines["DINO + CRF"].get_ydata(), [45])
    paper = {line.get_label(): line for line in coco_cluster.lines if line.get_label().startswith("paper")}
    assert paper["paper: STEGO + CRF"].get_xdata()[0] == 90 and paper["paper: STEGO + CRF"].get_ydata()[0] == 28.2
    assert paper["paper: DINO + CRF"].get_ydata()[0] == 13.0
    assert coco_linear.get_xscale() == "log" and [int(t) for t in coco_linear.get_xticks()] == [3, 6, 12, 24, 48, 96, 192, 384, 768]
    pots = {line.get_label(): line for line in fig.axes[3].lines}
    np.testing.assert_array_equal(pots["RP"].get_xdata(), [6])
    np.testing.assert_array_equal(pots["RP"].get_ydata(), [40])

    table = {row["method"]: row for row in table2(rows)}
    ours = table["DINO (stegoscope)"]
    assert ours["cocostuff27 linear/mIoU"] == 45.0 and ours["cocostuff27 cluster/mIoU"] == 13.5  # with CRF
    assert ours["potsdam cluster/Accuracy"] == 84.0
    assert table["STEGO (stegoscope)"]["cocostuff27 linear/mIoU"] == 42.0  # D_STEGO = 90, two seeds
    assert table["paper: STEGO (released checkpoints, re-evaluated)"]["potsdam linear/mIoU"] == 74.8

    out = CliRunner().invoke(app, ["figures", "--cache", str(cache)])
    assert out.exit_code == 0, out.output
    for name in ("fig4_miou_vs_dim.png", "fig4_miou_vs_dim.pdf", "supp_fig1_accuracy_vs_dim.pdf", "table2.md", "table2.tex", "results.csv"):
        assert (cache / "figures" / name).stat().st_size > 0
    assert "| DINO (stegoscope) |" in (cache / "figures" / "table2.md").read_text()
