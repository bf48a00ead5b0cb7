"""The paper's figures and Table 2 from cached artefacts only (no recomputation).

Reads every finished probe / train-stego artefact (metrics.json + manifest) and every PCA fit,
and draws: Fig. 3 (cumulative explained variance, x relative to D_ViT), Fig. 4 (linear and
cluster mIoU vs D per dataset, log x), supplementary Fig. 1 (the same for accuracy),
supplementary Fig. 2 (h-NNE vs PCA on Cityscapes), Table 2 (markdown, CSV, LaTeX). Reported
values follow the study: the validation step with the best cluster mIoU, all metrics from it.
The paper's published numbers are overlaid as labelled reference markers; with several seeds,
lines are means with ± std bands. Only datasets that have results are drawn.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import paper
from ..atomic import atomic_write_bytes, atomic_write_text
from ..pipeline import begin_artefact, load_npz, read_json, read_manifest, write_manifest
from .probe import METRICS

METHODS = {  # label, marker, colour index
    "stego": ("STEGO", "o", 0), "pca": ("PCA", "s", 1), "rp": ("RP", "^", 2), "hnne": ("h-NNE", "D", 4), "dino": ("DINO", "*", 3),
}
RESULT_FIELDS = ("dataset", "method", "dim", "probe", "crf", "seed", "step", "mIoU", "Accuracy", "key")


def collect_results(cache_root: Path) -> list[dict[str, Any]]:
    """One row per dataset × method × D × probe × CRF × seed, with the artefact key."""
    rows = []
    root = Path(cache_root) / "artefacts"
    for directory in sorted(root.glob("probe/*")) + sorted(root.glob("train_stego/*")):
        manifest = read_manifest(directory)
        if manifest is None or "dataset" not in manifest or METRICS not in manifest.get("files", {}):
            continue  # unfinished, or written before manifests named their dataset
        metrics = read_json(directory, METRICS)
        base = {"dataset": manifest["dataset"], "method": manifest["method"], "dim": manifest["code_dim"],
                "seed": manifest.get("seed", 0), "key": manifest["key"]}
        for crf, row in (("no", metrics.get("best")), ("yes", metrics.get("best_crf"))):
            for probe in ("linear", "cluster") if row else ():
                rows.append(base | {"probe": probe, "crf": crf, "step": row["step"],
                                    "mIoU": row[f"{probe}/mIoU"], "Accuracy": row[f"{probe}/Accuracy"]})
    return rows


def results_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, RESULT_FIELDS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in RESULT_FIELDS} for r in rows)
    return out.getvalue()


def pca_curves(cache_root: Path) -> dict[str, np.ndarray]:
    """Explained-variance ratio of each dataset's PCA fit (the first found per dataset)."""
    curves: dict[str, np.ndarray] = {}
    for directory in sorted((Path(cache_root) / "artefacts" / "reduce").glob("pca-*")):
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("dataset") in curves:
            continue
        curves[manifest["dataset"]] = load_npz(directory)["explained_variance_ratio_"]
    return curves


def _datasets(names) -> list[str]:
    known = [d for d in paper.DATASET_TITLES if d in names]
    return known + sorted(set(names) - set(known))


def _d_vit(dataset: str, rows: list[dict]) -> int:
    dims = [r["dim"] for r in rows if r["dataset"] == dataset and r["method"] == "dino"]
    return paper.D_VIT.get(dataset, max(dims, default=768))


def _series(rows, dataset, method, probe, metric, crf):
    """x (D), mean, std over seeds."""
    by_dim: dict[int, list[float]] = {}
    for r in rows:
        if (r["dataset"], r["method"], r["probe"], r["crf"]) == (dataset, method, probe, crf):
            by_dim.setdefault(int(r["dim"]), []).append(float(r[metric]))
    dims = sorted(by_dim)
    return np.array(dims), np.array([np.mean(by_dim[d]) for d in dims]), np.array([np.std(by_dim[d]) for d in dims])


def figure3(curves: dict[str, np.ndarray]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3))
    for i, dataset in enumerate(_datasets(curves)):
        ratio = curves[dataset]
        x = np.linspace(0, 1, len(ratio)) * 768  # relative to D_ViT, on a common 768 axis
        ax.plot(x, np.cumsum(ratio), label=paper.DATASET_TITLES.get(dataset, dataset), color=f"C{i}")
    ax.set_xticks([0, 48, 192, 384, 576, 768], ["0", "D/16", "D/4", "D/2", "3D/4", "D"])
    ax.set_xlabel("Number of Components")
    ax.set_ylabel("Explained Variance")
    ax.legend()
    fig.tight_layout()
    return fig


def metric_figure(rows: list[dict], metric: str, methods=("stego", "pca", "rp", "dino")):
    """2 × n grid: linear (top) and cluster (bottom) ``metric`` vs D, one column per dataset."""
    import matplotlib.pyplot as plt

    datasets = _datasets({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(max(4 * len(datasets), 7), 6.5), squeeze=False)
    paper_col = {"mIoU": {"cluster": 1, "linear": 3}, "Accuracy": {"cluster": 0, "linear": 2}}[metric]
    for col, dataset in enumerate(datasets):
        for row_i, probe in enumerate(("linear", "cluster")):
            ax = axes[row_i, col]
            for method in methods:
                label, marker, colour = METHODS[method]
                x, y, err = _series(rows, dataset, method, probe, metric, "no")
                if len(x):
                    ax.plot(x, y, marker=marker, color=f"C{colour}", label=label)
                    if (err > 0).any():
                        ax.fill_between(x, y - err, y + err, color=f"C{colour}", alpha=0.2)
                x, y, _ = _series(rows, dataset, method, probe, metric, "yes")
                if len(x):
                    ax.plot(x, y, linestyle="none", marker="v", color=f"C{colour}", label=f"{label} + CRF")
            for name, style in (("STEGO (released checkpoints, re-evaluated)", ("P", "k", paper.D_STEGO)),
                                ("DINO (probes retrained on raw DINO tokens)", ("X", "gray", paper.D_VIT))):
                value = paper.TABLE2[name].get(dataset, (None,) * 4)[paper_col[probe]]
                if value is not None:
                    ax.plot([style[2][dataset]], [value], linestyle="none", marker=style[0], color=style[1], markersize=9,
                            label=f"paper: {name.split(' (')[0]} + CRF")
            d_vit = _d_vit(dataset, rows)
            ax.set_xscale("log")
            ticks = [t for t in paper.DIM_TICKS if t <= d_vit]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_title(f"{paper.DATASET_TITLES.get(dataset, dataset)} — {probe}")
            ax.set_xlabel("D")
            ax.set_ylabel(f"{probe} {metric} (%)")
    handles = {}
    for ax in axes.ravel():
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // 4), 1, 1))
    return fig


def hnne_figure(rows: list[dict], dataset: str = "cityscapes"):
    """Supplementary Fig. 2: h-NNE vs PCA (2 × 2: probe × metric)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    for i, probe in enumerate(("linear", "cluster")):
        for j, metric in enumerate(("mIoU", "Accuracy")):
            ax = axes[i, j]
            for method in ("hnne", "pca"):
                label, marker, colour = METHODS[method]
                x, y, _ = _series(rows, dataset, method, probe, metric, "no")
                if len(x):
                    ax.plot(x, y, marker=marker, color=f"C{colour}", label=label)
            ax.set_xscale("log")
            ax.set_xticks(paper.DIM_TICKS, [str(t) for t in paper.DIM_TICKS])
            ax.minorticks_off()
            ax.set_title(f"{paper.DATASET_TITLES.get(dataset, dataset)} — {probe} {metric}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def table2(rows: list[dict]) -> list[dict[str, Any]]:
    """Our STEGO (at D_STEGO) and DINO rows, with CRF where available, beside the paper's rows."""
    datasets = _datasets({r["dataset"] for r in rows})
    out = []
    for method, name in (("stego", "STEGO (stegoscope)"), ("dino", "DINO (stegoscope)")):
        entry: dict[str, Any] = {"method": name}
        for dataset in datasets:
            candidates = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if method == "stego" and dataset in paper.D_STEGO:
                candidates = [r for r in candidates if r["dim"] == paper.D_STEGO[dataset]] or candidates
            crf = "yes" if any(r["crf"] == "yes" for r in candidates) else "no"
            for column in paper.COLUMNS:
                probe, metric = column.split("/")
                values = [r[metric] for r in candidates if r["probe"] == probe and r["crf"] == crf]
                entry[f"{dataset} {column}"] = float(np.mean(values)) if values else None
        out.append(entry)
    for name, values in paper.TABLE2.items():
        entry = {"method": f"paper: {name}"}
        for dataset in datasets:
            for column, value in zip(paper.COLUMNS, values.get(dataset, (None,) * 4)):
                entry[f"{dataset} {column}"] = value
        if any(v is not None for k, v in entry.items() if k != "method"):  # only where the paper reports
            out.append(entry)
    return out


def table_texts(table: list[dict[str, Any]]) -> dict[str, str]:
    columns = list(table[0])
    fmt = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in table]
    csv_out = io.StringIO()
    csv.DictWriter(csv_out, columns).writeheader()
    csv.DictWriter(csv_out, columns).writerows(table)
    tex = ["\\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", "\\hline", " & ".join(columns).replace("%", "\\%") + " \\\\", "\\hline"]
    tex += [" & ".join(fmt(row[c]) for c in columns) + " \\\\" for row in table] + ["\\hline", "\\end{tabular}"]
    return {"md": "\n".join(md) + "\n", "csv": csv_out.getvalue(), "tex": "\n".join(tex) + "\n"}


def render(cache_root: Path, out_dir: Path) -> dict[str, list[Path]]:
    """Draw everything there are results for into ``out_dir`` (PNG + PDF; tables as md/csv/tex)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    begin_artefact(out_dir)  # a run killed before the end leaves no manifest
    rows = collect_results(cache_root)
    written: dict[str, list[Path]] = {}
    figures = {}
    curves = pca_curves(cache_root)
    if curves:
        figures["fig3_explained_variance"] = figure3(curves)
    if rows:
        figures["fig4_miou_vs_dim"] = metric_figure(rows, "mIoU")
        figures["supp_fig1_accuracy_vs_dim"] = metric_figure(rows, "Accuracy")
        if any(r["method"] == "hnne" and r["dataset"] == "cityscapes" for r in rows):
            figures["supp_fig2_hnne_cityscapes"] = hnne_figure(rows)
    for name, fig in figures.items():
        written[name] = [out_dir / f"{name}.{ext}" for ext in ("png", "pdf")]
        for path in written[name]:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=path.suffix[1:], dpi=150)
            atomic_write_bytes(path, buffer.getvalue())
        plt.close(fig)
    if rows:
        texts = {f"table2.{ext}": text for ext, text in table_texts(table2(rows)).items()}
        texts["results.csv"] = results_csv(rows)
        for name, text in texts.items():
            atomic_write_text(out_dir / name, text)
        written["table2"] = [out_dir / name for name in texts if name.startswith("table2")]
        written["results"] = [out_dir / "results.csv"]
    if written:
        inputs = sorted({r["key"] for r in rows})
        write_manifest(out_dir, {"stage": "figures", "inputs": inputs, "finished": time.time()},
                       [p for paths in written.values() for p in paths])
    return written
