"""Figures and Table 2 from hand-made metric artefacts and study records: right series, right x,
right numbers; configurations side by side, seeds averaged only within one configuration."""

import hashlib
import json

import numpy as np
from typer.testing import CliRunner

from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.pipeline import experiment_id, write_manifest
from stegoscope.records import Manifest
from stegoscope.stages.figures import collect, metric_figure, table2

STAGE_OF = {"stego": "train-stego"}


def fake_result(cache, dataset, method, dim, seed, linear_miou, cluster_miou, crf=None, study="paper", experiment="base",
                label="", headline=False, **params):
    """A finished probe / head artefact (metrics + manifest with its configuration), recorded in
    ``study``'s ``experiment`` the way `stegoscope study` records it."""
    stage = STAGE_OF.get(method, "probe")
    config = {"stage": stage, "params": {"method": method, "dim": dim, "seed": seed, **params},
              "inputs": {"train": {"stage": "extract", "params": {"dataset": dataset}}}}
    key = hashlib.sha256(f"{study}{seed}{dim}{method}{dataset}{sorted(params.items())}".encode()).hexdigest()
    directory = cache_schema.artefact_dir(cache, stage, f"{method}{dim}", key)
    directory.mkdir(parents=True)
    row = {"step": 300, "linear/mIoU": linear_miou, "linear/Accuracy": linear_miou + 20,
           "cluster/mIoU": cluster_miou, "cluster/Accuracy": cluster_miou + 30}
    metrics = {"history": [row], "best": row, "final": row}
    if crf:
        metrics["best_crf"] = {"step": 300, "linear/mIoU": crf[0], "linear/Accuracy": crf[0] + 20,
                               "cluster/mIoU": crf[1], "cluster/Accuracy": crf[1] + 30}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(directory, Manifest(key=key, stage=stage, dataset=dataset, method=method, code_dim=dim, seed=seed,
                                       config=config, experiment=experiment_id(config), label=label))
    path = cache_schema.study_experiments_dir(cache, study) / f"{experiment}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.exists() else {"study": study, "experiment": experiment, "label": "",
                                                                  "preset_sha256": "p", "updated": 1.0, "nodes": {}}
    record["nodes"][f"{method} {dataset} {dim} {seed} {params}"] = {
        "key": key, "output": str(directory.relative_to(cache)), "method": method, "dim": dim, "seed": seed,
        "result": True, "label": label, "headline": headline}
    path.write_text(json.dumps(record))


def lines_of(ax):
    return {line.get_label(): line for line in ax.lines}


def test_figures_draw_the_given_series(tmp_path):
    cache = tmp_path / "c"
    for dim, lin, clu in ((3, 10.0, 5.0), (24, 30.0, 20.0), (90, 40.0, 27.0)):
        fake_result(cache, "cocostuff27", "pca", dim, 0, lin, clu)
        fake_result(cache, "cocostuff27", "stego", dim, 0, lin + 1, clu + 1, headline=dim == 90, lambda_rand=0.15)
    fake_result(cache, "cocostuff27", "stego", 90, 1, 43.0, 30.0, headline=True, lambda_rand=0.15)  # a second seed at 90
    fake_result(cache, "cocostuff27", "dino", 768, 0, 44.0, 12.0, crf=(45.0, 13.5), headline=True)
    fake_result(cache, "potsdam", "rp", 6, 0, 50.0, 40.0)
    fake_result(cache, "potsdam", "dino", 384, 0, 70.0, 50.0, crf=(72.0, 54.0), headline=True)
    # another configuration of the head at 90: its own curve and row, never averaged in
    fake_result(cache, "cocostuff27", "stego", 90, 0, 20.0, 10.0, experiment="lam", label="λ_rand=0.5", headline=True,
                lambda_rand=0.5)

    rows, _ = collect(cache, ["paper"])
    fig = metric_figure(rows, "mIoU")
    assert len(fig.axes) == 4  # 2 × 2: only datasets with results
    coco_linear, coco_cluster = fig.axes[0], fig.axes[2]
    assert coco_linear.get_title() == "Cocostuff — linear" and fig.axes[1].get_title() == "Potsdam — linear"
    lines = lines_of(coco_linear)
    np.testing.assert_array_equal(lines["PCA"].get_xdata(), [3, 24, 90])
    np.testing.assert_array_equal(lines["PCA"].get_ydata(), [10, 30, 40])
    np.testing.assert_array_equal(lines["STEGO"].get_ydata(), [11, 31, (41 + 43) / 2])  # mean over seeds
    np.testing.assert_array_equal(lines["STEGO λ_rand=0.5"].get_xdata(), [90])
    np.testing.assert_array_equal(lines["STEGO λ_rand=0.5"].get_ydata(), [20])  # side by side, not in the mean
    np.testing.assert_array_equal(lines["DINO + CRF"].get_xdata(), [768])
    np.testing.assert_array_equal(lines["DINO + CRF"].get_ydata(), [45])
    assert len(coco_linear.collections) == 1  # one ± std band: STEGO at 90 has two seeds
    paper = {label: line for label, line in lines_of(coco_cluster).items() if label.startswith("paper")}
    assert paper["paper: STEGO + CRF"].get_xdata()[0] == 90 and paper["paper: STEGO + CRF"].get_ydata()[0] == 28.2
    assert paper["paper: DINO + CRF"].get_ydata()[0] == 13.0
    assert coco_linear.get_xscale() == "log" and [int(t) for t in coco_linear.get_xticks()] == [3, 24, 90, 768]  # the dims run
    pots = lines_of(fig.axes[3])
    np.testing.assert_array_equal(pots["RP"].get_xdata(), [6])
    np.testing.assert_array_equal(pots["RP"].get_ydata(), [40])

    table = {row["method"]: row for row in table2(rows)}
    ours = table["DINO (stegoscope)"]
    assert ours["cocostuff27 linear/mIoU"] == 45.0 and ours["cocostuff27 cluster/mIoU"] == 13.5  # with CRF
    assert ours["potsdam cluster/Accuracy"] == 84.0
    stego = table["STEGO (stegoscope)"]
    assert stego["cocostuff27 linear/mIoU"] == 42.0 and stego["cocostuff27 linear/mIoU std"] == 1.0  # D_STEGO, two seeds
    assert stego["cocostuff27 seeds"] == 2
    assert table["STEGO λ_rand=0.5 (stegoscope)"]["cocostuff27 linear/mIoU"] == 20.0
    assert table["paper: STEGO (released checkpoints, re-evaluated)"]["potsdam linear/mIoU"] == 74.8

    out = CliRunner().invoke(app, ["figures", "--cache", str(cache)])
    assert out.exit_code == 0, out.output
    folder = cache / "figures" / "paper"
    for name in ("fig4_miou_vs_dim.png", "fig4_miou_vs_dim.pdf", "supp_fig1_accuracy_vs_dim.pdf", "table2.md", "table2.tex", "results.csv"):
        assert (folder / name).stat().st_size > 0
    md = (folder / "table2.md").read_text()
    assert "| DINO (stegoscope) |" in md and "42.0 ± 1.0" in md
    csv_rows = (folder / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "study,dataset,method,label,experiment,family,dim,probe,crf,seed,step,mIoU,Accuracy,key"
    assert sum(",λ_rand=0.5," in r for r in csv_rows) == 2  # its linear and cluster rows


def test_only_what_the_study_declared_is_drawn_and_same_labels_never_merge(tmp_path):
    cache = tmp_path / "c"
    fake_result(cache, "potsdam", "pca", 6, 0, 50.0, 40.0, study="a")
    fake_result(cache, "potsdam", "pca", 12, 0, 60.0, 45.0, study="b")  # another study's: not a's
    rows, _ = collect(cache, ["a"])
    assert {r.dim for r in rows} == {6}
    # two configurations that both call themselves the preset's (e.g. recorded by different
    # versions of it) get their experiment ids appended rather than one mean
    fake_result(cache, "potsdam", "pca", 6, 0, 10.0, 5.0, study="a", experiment="other", standardize="none")
    rows, _ = collect(cache, ["a"])
    labels = {r.label for r in rows}
    assert len(labels) == 2 and all(label.startswith("[") for label in labels)


def test_several_studies_are_labelled_by_what_differs_from_the_first(tmp_path):
    cache = tmp_path / "c"
    fake_result(cache, "potsdam", "stego", 70, 0, 50.0, 40.0, study="a", headline=True, lambda_rand=0.63)
    fake_result(cache, "potsdam", "stego", 70, 0, 55.0, 42.0, study="b", headline=True, lambda_rand=0.5)
    rows, _ = collect(cache, ["a", "b"])
    by_label = {(r.study, r.label) for r in rows}
    assert by_label == {("a", ""), ("b", "λ_rand=0.5")}
    fig = metric_figure(rows, "mIoU")
    np.testing.assert_array_equal(lines_of(fig.axes[0])["STEGO λ_rand=0.5"].get_ydata(), [55.0])
    np.testing.assert_array_equal(lines_of(fig.axes[0])["STEGO"].get_ydata(), [50.0])


def test_a_method_with_a_figure_of_its_own_is_drawn_there_and_successors_beside_fig4(tmp_path):
    cache = tmp_path / "c"
    for dim, lin, clu in ((3, 10.0, 5.0), (24, 30.0, 20.0)):
        fake_result(cache, "cityscapes", "pca", dim, 0, lin, clu)
        fake_result(cache, "cityscapes", "hnne", dim, 0, lin - 2, clu - 1)
        fake_result(cache, "cityscapes", "smooseg", dim, 0, lin + 3, clu + 4)
    rows, _ = collect(cache, ["paper"])
    fig4 = lines_of(metric_figure(rows, "mIoU").axes[0])
    assert "PCA" in fig4 and "h-NNE" not in fig4 and "SmooSeg" not in fig4  # the paper's Fig. 4: its own methods only
    out = CliRunner().invoke(app, ["figures", "--cache", str(cache)])
    assert out.exit_code == 0, out.output
    folder = cache / "figures" / "paper"
    # h-NNE against PCA (the registry's ``against``): the paper's supplementary Fig. 2
    assert (folder / "supp_fig2_hnne_cityscapes.png").stat().st_size > 0
    assert (folder / "beyond_stego_miou_vs_dim.pdf").stat().st_size > 0  # a successor ran: drawn beside Fig. 4's methods
