"""`stegoscope report`: a static page read back with the standard library's HTML parser, and in a browser."""

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ok, write_micro_preset
from stegoscope.cache_schema import IDS, LABELS, open_complete_store
from stegoscope.data import palette_of
from stegoscope.ops.metrics import image_scores
from stegoscope.pipeline import load_npz, read_manifest, read_record
from stegoscope.records import EvalResult

ASKED = "val_00004"


class Page(HTMLParser):
    """Every img, link, element id and table cell (with its data-value and row id) of a page."""

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
            self.cells.append((self.row, attrs["data-value"]))


def test_the_report_shows_the_kept_predictions_as_stored_and_scored(tmp_path):
    preset = write_micro_preset(tmp_path / "micro.yaml")
    preset.write_text(preset.read_text().replace("keep_predictions: none", "keep_predictions: headline"))
    cache = tmp_path / "c"
    ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress", "--no-report")
    out = ok("report", "--cache", cache, "--out", tmp_path / "r", "--images", "3", "--ids", ASKED)
    assert "0 stages run" in out
    index = tmp_path / "r" / "index.html"
    page = Page()
    page.feed(index.read_text())

    for img in page.images:  # every image exists, is a PNG of the stated size
        with Image.open(index.parent / img["src"]) as png:
            assert png.format == "PNG" and png.size == (int(img["width"]), int(img["height"])), img
    for href in page.links:  # every link resolves
        assert href.startswith("#") and href[1:] in page.ids or (index.parent / href).exists(), href

    (kept,) = sorted((cache / "artefacts" / "predictions").iterdir())  # STEGO at its headline D: PCA is not a Table 2 row
    result = next(p for p in (cache / "artefacts").glob("train_stego/*") if p.name.endswith(read_manifest(kept).inputs[0][:12]))
    metrics = read_record(result, "metrics.json", EvalResult)
    for crf, row in metrics.kept():  # each score shown is the artefact's metrics.json
        shown = [float(v) for r, v in page.cells if r == f"score-{kept.name}-{crf}"]
        c, lin = row.probes["cluster"], row.probes["linear"]
        assert shown == [c.mIoU, c.Accuracy, lin.mIoU, lin.Accuracy]

    val = open_complete_store(next((cache / "features").glob("*-val-*.zarr")))
    labels, ids, payload = val[LABELS][:], [str(i) for i in val[IDS][:]], load_npz(kept)
    rows: dict[str, list[str]] = {}
    for r, v in page.cells:
        if r and r.startswith("img-"):
            rows.setdefault(r, []).append(v)
    assert len(rows) == len(labels)  # every val image
    for r, (name, no_crf, with_crf) in rows.items():  # recomputed from the stored map and the val labels
        i = int(r[4:])
        assert name == ids[i]
        for value, maps in ((no_crf, payload["cluster"]), (with_crf, payload["cluster_crf"])):
            expected = image_scores(np.where(maps[i] == 255, -1, maps[i]), labels[i], 4)[0]
            assert float(value) == np.float32(expected) or np.isnan(expected) and value == "nan"
    first = [r for r in rows][0]
    worst = np.nanargmin(payload["cluster_crf_scores"][:, 0])
    assert first == f"img-{worst}"  # worst first
    assert f"g-{ids.index(ASKED)}" in page.ids  # the asked-for image is in the gallery

    palette = palette_of("synthetic", 4)
    row = ids.index(ASKED)
    drawn = np.asarray(Image.open(index.parent / "gallery" / f"{row}-{kept.name}-cluster_crf.png"))
    stored = payload["cluster_crf"][row]
    for k in np.unique(stored[stored != 255]):
        y, x = np.argwhere(stored == k)[0]
        assert tuple(drawn[y, x]) == tuple(palette[k])  # a pixel of class k has colour k
    truth = np.asarray(Image.open(index.parent / "gallery" / f"{row}-truth.png"))
    assert (truth[labels[row] < 0] == 0).all()  # ignored pixels black
    assert Path(index).stat().st_size < 200_000


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
