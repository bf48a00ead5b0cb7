"""``stegoscope report``: one static HTML page per study, from the cache; it only reads.

The page (``index.html`` and its images, relative links only, no script or style from the
network) holds: the study (preset, experiments with their changes, seeds, cache keys, versions
and device); Table 2 and the figures ``stegoscope figures`` drew; per kept result (the
``predictions`` artefacts, see ``stages/predictions.py``) its scores, per-class IoU bars and
row-normalised confusion matrix in the dataset's colours; a gallery of val images (the worst,
median and best by the headline result's per-image mIoU, plus ``ids``): image | ground truth |
each result without / with the CRF; and every val image's per-result mIoU in a table that sorts
by any column (a few lines of plain JavaScript), each row linking to its gallery row.
"""

from __future__ import annotations

import html
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache_schema
from . import methods as registry
from .atomic import atomic_write_bytes, atomic_write_text
from .cache_schema import IMAGES, LABELS, METRICS, open_complete_store
from .data import palette_of
from .data.palettes import colorize
from .ops.metrics import confusion
from .pipeline import read_manifest, read_record
from .records import EvalResult, Manifest, StudyRecord
from .stages.figures import collect, table2
from .stages.predictions import UNMATCHED, load_predictions
from .storage import as_path

SORT_SCRIPT = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0], i = th.cellIndex;
    const up = th.dataset.order !== "up";
    th.dataset.order = up ? "up" : "down";
    const key = (row) => {
      const v = row.cells[i].dataset.value ?? row.cells[i].textContent, n = parseFloat(v);
      return isNaN(n) ? v : n;
    };
    [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1)).forEach((r) => body.appendChild(r));
  });
}
"""
STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
         "th{cursor:pointer;background:#eee}.gallery td{vertical-align:top;font-size:small}.swatch{display:inline-block;width:1em;"
         "height:1em;border:1px solid #888;margin:0 4px 0 12px}")


@dataclass(frozen=True)
class Kept:
    """One result's kept predictions: its artefact, its metrics and what it is."""

    title: str
    folder: Path  # the predictions artefact
    result: Path  # the probe's or head's artefact
    manifest: Manifest
    metrics: EvalResult
    payload: dict[str, np.ndarray]

    @property
    def suffixes(self) -> list[str]:
        return [""] + (["_crf"] if "cluster_crf" in self.payload else [])

    @property
    def slug(self) -> str:
        return self.folder.name


def kept_predictions(cache_root: Path, record: StudyRecord) -> list[Kept]:
    """The predictions artefacts an experiment recorded, in the registry's order of methods."""
    cache_root, by_key = as_path(cache_root), {node.key: node for node in record.nodes.values()}
    out = []
    for node in record.nodes.values():
        if node.stage != "predictions":
            continue
        folder = cache_root / node.output
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        result = by_key[manifest.inputs[0]]
        title = registry.get(result.method).title + (f" D={result.dim}" if result.dim else "")
        title += f" seed {result.seed}" if result.seed else ""
        out.append(Kept(title, folder, cache_root / result.output, manifest, read_record(cache_root / result.output, METRICS, EvalResult),
                        load_predictions(folder)))
    order = list(registry.METHODS)
    return sorted(out, key=lambda k: (order.index(k.manifest.method), k.title))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def _class_maps(maps: np.ndarray) -> np.ndarray:
    return np.where(maps == UNMATCHED, -1, maps.astype(np.int64))


def _per_class_figure(kept: Kept, names: list[str], palette: np.ndarray) -> bytes:
    plt = _pyplot()
    row = kept.metrics.best_crf or kept.metrics.best
    iou = np.nan_to_num(np.asarray(row.probes["cluster"].per_class_iou, float))
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(names)), 3))
    ax.bar(range(len(names)), iou, color=palette / 255, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("cluster IoU (%)")
    ax.set_title(f"{kept.title}: per-class IoU" + (" (CRF)" if kept.metrics.best_crf else ""), fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def _confusion_figure(kept: Kept, labels: np.ndarray, names: list[str]) -> bytes:
    """Rows: ground truth, normalised; columns: the mapped cluster prediction."""
    plt = _pyplot()
    n = len(names)
    suffix = kept.suffixes[-1]
    counts = confusion(_class_maps(kept.payload[f"cluster{suffix}"]), labels, n).T.astype(float)  # rows: truth
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * n + 2), max(3.5, 0.3 * n + 1.5)))
    ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=6)
    ax.set_yticks(range(n), names, fontsize=6)
    ax.set_xlabel("prediction (cluster, mapped)")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{kept.title}: confusion, rows normalised" + (" (CRF)" if suffix else ""), fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def gallery_rows(scores: np.ndarray, n_images: int, ids: list[int]) -> list[int]:
    """Rows shown: ``ids``, then the worst, median and best thirds of ``n_images`` by ``scores``
    (per-image mIoU; images without a labelled pixel last), worst first."""
    order = [int(i) for i in np.argsort(np.where(np.isnan(scores), np.inf, scores), kind="stable")]
    third = n_images // 3
    middle = max(0, len(order) // 2 - (n_images - 2 * third) // 2)
    picked = order[:third] + order[middle : middle + n_images - 2 * third] + order[len(order) - third :] if n_images else []
    return list(dict.fromkeys(ids + [i for i in picked if 0 <= i < len(order)]))


def _cell(value, digits: int = 2, key: str = "") -> str:
    """A table cell showing ``value`` rounded, with its exact value (and what it is, ``key``) as data."""
    key = f" data-key=\"{html.escape(key)}\"" if key else ""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"<td data-value=\"nan\"{key}>–</td>"
    if isinstance(value, float):
        return f"<td data-value=\"{value!r}\"{key}>{value:.{digits}f}</td>"
    return f"<td{key}>{html.escape(str(value))}</td>"


def write_report(cache_root: Path, study: str, out_dir: Path, n_images: int = 24, ids: list[str] = ()) -> Path:
    """Write ``study``'s report into ``out_dir``; returns the path of its ``index.html``."""
    cache_root, out_dir = as_path(cache_root), as_path(out_dir)
    records = cache_schema.study_records(cache_root, study)
    if not records:
        raise cache_schema.StoreError(f"{cache_root}: no study {study!r} has run here; run `stegoscope study {study}` first")
    base = next((r for r in records if r.experiment == "base"), records[0])
    kept = kept_predictions(cache_root, base)
    val_node = base.nodes.get("extract val")
    val = open_complete_store(cache_root / val_node.output) if val_node else None
    sections = [_study_section(records)]
    if kept:
        ran = kept[0].manifest
        device = (val.attrs.extracted_with or {}).get("device", "?") if val is not None else "?"
        sections.append(f"<p>Ran with {html.escape(', '.join(f'{k} {v}' for k, v in sorted(ran.versions.items())))}; "
                        f"tokens extracted on {html.escape(str(device))}.</p>")
    sections.append(_table2_section(cache_root, study, out_dir))
    if kept and val is not None:
        labels = val[LABELS][:]
        n_classes = len(kept[0].metrics.best.probes["cluster"].per_class_iou)
        names = list(val.attrs.class_names or [f"class {k}" for k in range(n_classes)])[:n_classes]
        palette = palette_of(val.attrs.dataset or "", n_classes)
        sections += [_legend(names, palette), _results_section(kept, labels, names, palette, out_dir)]
        image_ids = val.ids
        unknown = [i for i in ids if i not in image_ids]
        if unknown:
            raise ValueError(f"{val.path}: no val image {unknown[:3]} (--ids); its ids look like {image_ids[:2]}")
        wanted = [image_ids.index(i) for i in ids]
        headline = next((k for k in kept if registry.get(k.manifest.method).kind == registry.HEAD), kept[0])
        rows = gallery_rows(headline.payload[f"cluster{headline.suffixes[-1]}_scores"][:, 0], n_images, wanted)
        sections += [_gallery_section(kept, val, labels, palette, rows, image_ids, out_dir),
                     _per_image_section(kept, headline, image_ids, set(rows))]
    elif not kept:
        sections.append("<p>No result of this study kept its predictions (<code>eval.keep_predictions</code>).</p>")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>stegoscope report: {html.escape(study)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>Study {html.escape(study)}</h1>\n" + "\n".join(sections)
            + f"\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return index


def _study_section(records: list[StudyRecord]) -> str:
    parts = ["<h2>Experiments</h2><table><tr><th>experiment</th><th>label</th><th>changes</th><th>preset</th><th>updated</th>"
             "<th>seeds</th></tr>"]
    for r in records:
        seeds = sorted({n.seed for n in r.nodes.values() if n.seed is not None})
        changes = ", ".join(f"{k}={v}" for k, v in r.overrides.items()) or "(the preset as written)"
        parts.append(f"<tr><td>{html.escape(r.experiment)}</td><td>{html.escape(r.label)}</td><td>{html.escape(changes)}</td>"
                     f"<td>{html.escape(r.preset or '')}</td><td>{time.ctime(r.updated)}</td><td>{seeds}</td></tr>")
    parts.append("</table><h3>Cache keys</h3><table><tr><th>experiment</th><th>node</th><th>key</th><th>output</th></tr>")
    for r in records:
        for label, node in r.nodes.items():
            parts.append(f"<tr><td>{html.escape(r.experiment)}</td><td>{html.escape(label)}</td><td><code>{node.key[:12]}</code></td>"
                         f"<td><code>{html.escape(node.output)}</code></td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _table2_section(cache_root: Path, study: str, out_dir: Path) -> str:
    rows, _ = collect(cache_root, [study])
    table = table2([r for r in rows if not r.family and r.probe in ("linear", "cluster")])
    parts = ["<h2>Table 2</h2>"]
    if table:
        columns = list(dict.fromkeys(k for entry in table for k in entry if not k.endswith(" std")))
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
        for entry in table:
            parts.append("<tr>" + "".join(_cell(entry.get(c)) for c in columns) + "</tr>")
        parts.append("</table>")
    figures = sorted((cache_schema.figures_dir(cache_root) / study).glob("*.png"))
    if not figures:
        parts.append(f"<p>No figures drawn yet: <code>stegoscope figures --study {html.escape(study)}</code>, then report again.</p>")
    for path in figures:
        atomic_write_bytes(out_dir / "figures" / path.name, path.read_bytes())
        width, height = _size(path.read_bytes())
        parts.append(f"<h3>{html.escape(path.stem)}</h3><img src=\"figures/{path.name}\" width=\"{width}\" height=\"{height}\" "
                     f"alt=\"{html.escape(path.stem)}\">")
    return "\n".join(parts)


def _size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _img(out_dir: Path, name: str, png: bytes, alt: str) -> str:
    atomic_write_bytes(out_dir / name, png)
    width, height = _size(png)
    return f"<img src=\"{name}\" width=\"{width}\" height=\"{height}\" alt=\"{html.escape(alt)}\">"


def _legend(names: list[str], palette: np.ndarray) -> str:
    swatches = "".join(f"<span class=\"swatch\" style=\"background:rgb{tuple(int(c) for c in palette[k])}\"></span>{html.escape(n)}"
                       for k, n in enumerate(names))
    return f"<h2>Classes</h2><p>{swatches}<span class=\"swatch\" style=\"background:black\"></span>ignored / unmatched</p>"


def _results_section(kept: list[Kept], labels: np.ndarray, names: list[str], palette: np.ndarray, out_dir: Path) -> str:
    parts = ["<h2>Results with kept predictions</h2><table class=\"scores\"><tr><th>result</th><th>CRF</th><th>step</th>"
             "<th>cluster mIoU</th><th>cluster accuracy</th><th>linear mIoU</th><th>linear accuracy</th></tr>"]
    for k in kept:
        for crf, row in k.metrics.kept():
            c, lin = row.probes["cluster"], row.probes["linear"]
            parts.append(f"<tr id=\"score-{k.slug}-{crf}\"><td>{html.escape(k.title)}</td><td>{crf}</td><td>{row.step}</td>"
                         + "".join(_cell(v, key=k) for v, k in ((c.mIoU, "cluster/mIoU"), (c.Accuracy, "cluster/Accuracy"),
                                                                (lin.mIoU, "linear/mIoU"), (lin.Accuracy, "linear/Accuracy")))
                         + "</tr>")
    parts.append("</table>")
    for k in kept:
        parts.append(f"<h3>{html.escape(k.title)}</h3>")
        parts.append(_img(out_dir, f"results/{k.slug}-per-class.png", _per_class_figure(k, names, palette), f"{k.title} per-class IoU"))
        parts.append(_img(out_dir, f"results/{k.slug}-confusion.png", _confusion_figure(k, labels, names), f"{k.title} confusion"))
    return "\n".join(parts)


def _gallery_section(kept: list[Kept], val, labels: np.ndarray, palette: np.ndarray, rows: list[int], image_ids: list[str],
                     out_dir: Path) -> str:
    columns = [(k, name, suffix) for k in kept for suffix in k.suffixes for name in ("cluster",)]
    head = "".join(f"<th>{html.escape(k.title)}{' + CRF' if s else ''}</th>" for k, _, s in columns)
    parts = [f"<h2>Gallery</h2><table class=\"gallery\"><tr><th>image</th><th>ground truth</th>{head}</tr>"]
    images = val[IMAGES] if IMAGES in val else None
    for row in rows:
        cells = [_img(out_dir, f"gallery/{row}-image.png", _png(images[row]), f"image {image_ids[row]}") if images is not None else "",
                 _img(out_dir, f"gallery/{row}-truth.png", _png(colorize(labels[row], palette)), f"ground truth {image_ids[row]}")]
        for k, name, suffix in columns:
            scores = k.payload[f"{name}{suffix}_scores"][row]
            cells.append(_img(out_dir, f"gallery/{row}-{k.slug}-{name}{suffix}.png",
                              _png(colorize(_class_maps(k.payload[f"{name}{suffix}"][row]), palette)), f"{k.title} {image_ids[row]}")
                         + f"<br>mIoU {scores[0]:.1f}")
        parts.append(f"<tr id=\"g-{row}\"><td>{cells[0]}<br>{html.escape(image_ids[row])}</td>"
                     + "".join(f"<td>{c}</td>" for c in cells[1:]) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _per_image_section(kept: list[Kept], headline: Kept, image_ids: list[str], shown: set[int]) -> str:
    columns = [(k, s) for k in kept for s in k.suffixes]
    head = "".join(f"<th>{html.escape(k.title)}{' + CRF' if s else ''} mIoU</th>" for k, s in columns)
    parts = [f"<h2>Every val image</h2><p>Cluster mIoU over the classes present in each image; click a column to sort.</p>"
             f"<table class=\"sortable\" id=\"per-image\"><thead><tr><th>image</th>{head}</tr></thead><tbody>"]
    order = np.argsort(np.nan_to_num(headline.payload[f"cluster{headline.suffixes[-1]}_scores"][:, 0], nan=np.inf), kind="stable")
    for row in order:
        name = html.escape(image_ids[row])
        link = f"<a href=\"#g-{row}\">{name}</a>" if row in shown else name
        parts.append(f"<tr id=\"img-{row}\"><td data-value=\"{name}\">{link}</td>"
                     + "".join(_cell(float(k.payload[f"cluster{s}_scores"][row, 0]), 1, f"{k.slug}/cluster{s}") for k, s in columns)
                     + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)
