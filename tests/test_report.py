"""`stegoscope report`: a static page read back with the standard library's HTML parser, and in a browser."""

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import invoke, ok, write_micro_preset
from stegoscope.cache_schema import LABELS, open_complete_store
from stegoscope.data import palette_of
from stegoscope.ops.metrics import image_scores
from stegoscope.pipeline import read_manifest, read_record
from stegoscope.records import EvalResult
from stegoscope.stages.predictions import load_predictions


class Page(HTMLParser):
    """Every img, link, element id and table cell (its row's id, data-key and data-value) of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids, self.cells, self.row = [], [], set(), [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "tr":
            self.row = attrs.get("id")
        if tag == "img":
            self.images.append(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "td" and "data-value" in attrs:
            self.cells.append((self.row, attrs.get("data-key"), attrs["data-value"]))


def check_report(index: Path, cache: Path, asked: str) -> None:
    """The report at ``index`` against the cache it was written from: every image a PNG of its
    stated size, every link resolving, every score its artefact's metrics.json, every per-image
    mIoU recomputed from the stored prediction and the val labels, gallery pixels in the palette."""
    page = Page()
    page.feed(index.read_text())
    for img in page.images:
        with Image.open(index.parent / img["src"]) as png:
            assert png.format == "PNG" and png.size == (int(img["width"]), int(img["height"])), img
    for href in page.links:
        assert href.startswith("#") and href[1:] in page.ids or (index.parent / href).exists(), href

    val = open_complete_store(next((cache / "features").glob("*-val-*.zarr")))
    labels, ids = val[LABELS][:], val.ids
    palette = palette_of(val.attrs.dataset, len(val.attrs.class_names))
    kept = sorted((cache / "artefacts" / "predictions").iterdir())
    assert kept
    per_image = {(r, k): float(v) for r, k, v in page.cells if r and r.startswith("img-") and k}
    assert {r for r, _ in per_image} == {f"img-{i}" for i in range(len(labels))}  # every val image
    for folder in kept:
        result = next(p for p in (cache / "artefacts").glob("*/*") if p.name.endswith(read_manifest(folder).inputs[0][:12]))
        metrics, payload = read_record(result, "metrics.json", EvalResult), load_predictions(folder)
        for crf, row in metrics.kept():  # each score shown is the artefact's metrics.json
            shown = {k: float(v) for r, k, v in page.cells if r == f"score-{folder.name}-{crf}"}
            assert shown == {f"{probe}/{m}": getattr(row.probes[probe], m) for probe in ("cluster", "linear")
                             for m in ("mIoU", "Accuracy")}
            maps = payload["cluster" + ("_crf" if crf == "yes" else "")]
            for i in range(len(labels)):  # recomputed from the stored prediction and the val labels
                expected = image_scores(np.where(maps[i] == 255, -1, maps[i]), labels[i], len(palette))[0]
                value = per_image[(f"img-{i}", f"{folder.name}/cluster{'_crf' if crf == 'yes' else ''}")]
                assert value == np.float32(expected) or np.isnan(expected) and np.isnan(value)
        row = ids.index(asked)  # the asked-for image is in the gallery, each class in its colour
        assert f"g-{row}" in page.ids
        drawn = np.asarray(Image.open(index.parent / "gallery" / f"{row}-{folder.name}-cluster.png"))
        stored = payload["cluster"][row]
        for k in np.unique(stored[stored != 255]):
            y, x = np.argwhere(stored == k)[0]
            assert tuple(drawn[y, x]) == tuple(palette[k])
    truth = np.asarray(Image.open(index.parent / "gallery" / f"{ids.index(asked)}-truth.png"))
    assert (truth[labels[ids.index(asked)] < 0] == 0).all() and (truth.reshape(-1, 3) != 0).any(1).any()  # ignored pixels black


def test_the_report_shows_the_kept_predictions_as_stored_and_scored(tmp_path):
    preset = write_micro_preset(tmp_path / "micro.yaml")
    preset.write_text(preset.read_text().replace("keep_predictions: none", "keep_predictions: headline"))
    cache = tmp_path / "c"
    ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress", "--no-report")
    out = ok("report", "--cache", cache, "--out", tmp_path / "r", "--images", "3", "--ids", "val_00004")
    assert "0 stages run" in out
    assert [p.name[:6] for p in (cache / "artefacts" / "predictions").iterdir()] == ["stego4"]  # PCA is not a Table 2 row
    wrong = invoke("report", "--cache", cache, "--out", tmp_path / "r", "--ids", "val_99")
    assert wrong.exit_code == 2 and "val_99" in wrong.output and "-val-" in wrong.output  # the store named
    check_report(tmp_path / "r" / "index.html", cache, "val_00004")


@pytest.mark.slow
def test_the_demo_report(tmp_path):
    cache = tmp_path / "c"
    out = ok("demo", "--cache", cache)
    index = Path(out.rsplit("report: ", 1)[1].split()[0])
    assert index == cache / "reports" / "demo" / "index.html"
    assert len([p for p in (index.parent / "gallery").glob("*-truth.png")]) == 24
    check_report(index, cache, "val_00000")
    again = ok("report", "--cache", cache, "--study", "demo", "--ids", "val_00031")
    assert "0 stages run" in again
    check_report(index, cache, "val_00031")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it with apt-get)")
def test_the_report_works_in_a_real_browser(tmp_path):
    """Headless Chromium opens the page from disk: no console error, every image loads, a click on a
    column header reorders the per-image table, and a row's link scrolls to its gallery row."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright client (the test extras)")
    preset = write_micro_preset(tmp_path / "micro.yaml")
    preset.write_text(preset.read_text().replace("keep_predictions: none", "keep_predictions: headline"))
    cache = tmp_path / "c"
    ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    index = cache / "reports" / "micro" / "index.html"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                                     "--disable-background-networking", "--disable-component-update",
                                                                     "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 400})
        errors = []
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("[...document.images].every((img) => img.complete && img.naturalWidth > 0)")
        assert page.evaluate("document.images.length") > 5
        column = "#per-image tbody tr td:nth-child(2)"
        before = page.eval_on_selector_all(column, "cells => cells.map((c) => parseFloat(c.dataset.value))")
        page.click("#per-image th:nth-child(2)")
        after = page.eval_on_selector_all(column, "cells => cells.map((c) => parseFloat(c.dataset.value))")
        assert after == sorted(before) and sorted(after) == sorted(before)
        page.click("#per-image th:nth-child(2)")
        assert page.eval_on_selector_all(column, "cells => cells.map((c) => parseFloat(c.dataset.value))") == sorted(before, reverse=True)
        link = page.query_selector("#per-image a")
        target = link.get_attribute("href")
        in_view = "(sel) => { const r = document.querySelector(sel).getBoundingClientRect(); return r.top >= 0 && r.top < innerHeight; }"
        page.evaluate("window.scrollTo(0, 0)")
        assert not page.evaluate(in_view, target)
        link.click()
        page.wait_for_timeout(200)
        assert page.evaluate(in_view, target)  # the link took the page to the image's gallery row
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        browser.close()
    assert not errors, errors
