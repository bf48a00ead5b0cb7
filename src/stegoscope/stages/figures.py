"""The paper's figures and Table 2 from the artefacts a study declared — its records under
``<cache>/studies/<study>/experiments/`` — never from whatever lies in the cache.

Draws Fig. 3 (cumulative explained variance of each declared PCA fit, x relative to D), Fig. 4
(linear and cluster mIoU vs D per dataset, log x, ticks at the dims run), supplementary Fig. 1
(the same for accuracy), supplementary Fig. 2 (h-NNE vs PCA, for every dataset with h-NNE
results), "beyond STEGO" (Fig. 4 with the successors of STEGO: SmooSeg, HP, PriMaPs-EM, beside
DINO, PCA, RP and STEGO) and Table 2 (markdown, CSV, LaTeX; a row per head at its headline D),
plus ``results.csv`` with one row per result.

Reported values follow the study: the validation step with the best cluster mIoU, all metrics
from it. Results are grouped by experiment id (the hash of their configuration without the
seed): seeds of one experiment give mean ± std; other configurations are separate rows and
curves, labelled by what they change relative to the preset (``λ_rand=0.5``). The paper's
published numbers are overlaid as labelled reference markers.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import cache_schema, paper
from .. import methods as registry
from ..atomic import atomic_write_bytes, atomic_write_text
from ..cache_schema import METRICS
from ..config import config_changes, describe, readable_names, short_value
from ..pipeline import begin_artefact, load_npz, read_manifest, read_record, stage_key, without_seeds, write_manifest
from ..progress import console
from ..records import EvalResult, Manifest, ResultRow, StudyNode, StudyRecord
from ..storage import as_path

# the probes of a result: the linear and cluster probes, and the cluster probe's other mappings
PROBES = ("linear", "cluster", "cluster_extra_as_errors", "cluster_many_to_one")
LINESTYLES = ("-", "--", ":", "-.")


# -- what a study declared ----------------------------------------------------------------------


def study_records(cache_root: Path, study: str) -> list[StudyRecord]:
    """The experiment records of ``study`` made from its preset's current content (the newest
    record's); records of an earlier version of the preset are left out, with a note."""
    records = cache_schema.study_records(cache_root, study)
    if not records:
        raise cache_schema.StoreError(f"no study {study!r} has run in {cache_root}; "
                                      f"run `stegoscope study {study}` "
                                      f"(studies here: {', '.join(cache_schema.list_studies(cache_root)) or 'none'})")
    newest = max(records, key=lambda r: r.updated).preset_sha256
    for old in (r for r in records if r.preset_sha256 != newest):
        console.print(f"study {study}: experiment {old.label or 'base'} was run with an earlier version of the preset; "
                      "not drawn (rerun it to include it)", highlight=False)
    return [r for r in records if r.preset_sha256 == newest]


@dataclass(frozen=True)
class FitCurve:
    """A PCA fit's explained-variance ratios (Fig. 3), with what names it in a legend."""

    study: str
    dataset: str | None
    method: str
    label: str
    key: str
    config: dict[str, Any]
    ratio: np.ndarray

# one colour a method (registry order): matplotlib's ten, then the darkest of each of tab20b's hues
PALETTE = [f"C{i}" for i in range(10)] + ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
USES_LABELS = "uses labels"  # the label of every result whose evaluated head was trained on ground-truth labels


def collect(cache_root: Path, studies: list[str]) -> tuple[list[ResultRow], list[FitCurve]]:
    """(result rows, explained-variance fits) of the studies' records. One row per dataset ×
    method × configuration × D × probe × CRF × seed; each artefact once."""
    rows, fits, seen = [], [], set()
    for study in studies:
        for record in study_records(cache_root, study):
            for node in record.nodes.values():
                if node.key in seen or node.kind == "input":
                    continue
                seen.add(node.key)
                directory = as_path(cache_root) / node.output
                manifest = read_manifest(directory)
                if manifest is None:
                    console.print(f"study {study}: {directory} is not complete; rerun the study to draw it", highlight=False)
                    continue
                if node.kind == "result":
                    rows += _metric_rows(directory, study, node, manifest)
                elif node.kind == "fit" and (variance := load_npz(directory, keys=["explained_variance_ratio_"])):
                    fits.append(FitCurve(study, manifest.dataset, node.method or "", node.label, node.key, manifest.config,
                                         variance["explained_variance_ratio_"]))
    if len(studies) > 1:
        rows, fits = _relabel(rows, studies[0]), _relabel(fits, studies[0])
    return _disambiguate(rows), fits


def _metric_rows(directory: Path, study: str, node: StudyNode, manifest: Manifest) -> list[ResultRow]:
    """One row per probe (and the other mappings of the cluster probe) and CRF setting;
    a hierarchy artefact gives one ``hierarchy`` row per level and mapping."""
    metrics = read_record(directory, METRICS, EvalResult)
    label = node.label
    spec = registry.METHODS.get(node.method or "")
    if spec is not None and spec.kind == registry.HEAD and spec.cls.uses_labels(manifest.config.get("params", {})):
        label = ", ".join(filter(None, (label, USES_LABELS)))
    base = dict(study=study, dataset=manifest.dataset, method=node.method or "", label=label,
                experiment=manifest.experiment[:12], family=node.family, dim=manifest.code_dim or 0, seed=manifest.seed or 0,
                key=node.key, stage=node.stage, headline=node.headline, config=manifest.config)
    out = []
    for level in metrics.levels:
        for mode in ("errors", "many_to_one"):
            scores = getattr(level, mode)
            out.append(ResultRow(**base, probe=f"hierarchy_{mode}", crf="no", step=level.level, clusters=level.clusters,
                                 mIoU=scores.mIoU, Accuracy=scores.Accuracy))
    for crf, row in metrics.kept():
        for probe in PROBES:
            if probe in row.probes:
                out.append(ResultRow(**base, probe=probe, crf=crf, step=row.step, mIoU=row.probes[probe].mIoU,
                                     Accuracy=row.probes[probe].Accuracy))
    return out


def _relabel(rows: list, first: str) -> list:
    """Label the other studies' results by what they change relative to the first study's
    results of the same method at the same D (its preset's, unlabelled); else by study name."""
    reference = {}
    for row in rows:
        if row.study == first and not row.label:
            reference.setdefault((row.dataset, row.method, getattr(row, "dim", None)), row.config)
    out = []
    for row in rows:
        ref = reference.get((row.dataset, row.method, getattr(row, "dim", None)))
        if row.study != first:
            row = replace(row, label=describe(config_changes(without_seeds(row.config), without_seeds(ref))) if ref is not None
                          else " ".join(filter(None, (row.study, row.label))))
        out.append(row)
    return out


def _disambiguate(rows: list[ResultRow]) -> list[ResultRow]:
    """Two configurations must never share a curve: where one label covers several experiments
    at the same D, add each one's experiment id."""
    experiments: dict[tuple, set] = {}
    for r in rows:
        experiments.setdefault((r.dataset, r.method, r.label, r.dim, r.stage), set()).add(r.experiment)
    clashing = {k[:3] for k, ids in experiments.items() if len(ids) > 1}
    return [replace(r, label=f"{r.label} [{r.experiment[:6]}]".strip()) if (r.dataset, r.method, r.label) in clashing else r
            for r in rows]


def results_csv(rows: list[ResultRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ResultRow.FIELDS)
    writer.writeheader()
    writer.writerows(r.csv_row() for r in rows)
    return out.getvalue()


# -- series ---------------------------------------------------------------------------------------


def _datasets(names) -> list[str]:
    known = [d for d in paper.DATASET_TITLES if d in names]
    return known + sorted(set(names) - set(known))


def _title(method: str, label: str = "") -> str:
    title = registry.METHODS[method].title if method in registry.METHODS else method
    return f"{title} {label}".strip()


def series(rows, dataset, probe, metric, crf) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(method, label) → (D, mean over seeds, std over seeds), one per configuration."""
    points: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if (r.dataset, r.probe, r.crf) == (dataset, probe, crf):
            points.setdefault((r.method, r.label), {}).setdefault(int(r.dim), []).append(float(getattr(r, metric)))
    out = {}
    for name, by_dim in points.items():
        dims = sorted(by_dim)
        out[name] = (np.array(dims), np.array([np.mean(by_dim[d]) for d in dims]), np.array([np.std(by_dim[d]) for d in dims]))
    return out


def _style(method: str, label: str, labels_of: dict[str, list[str]]) -> dict[str, Any]:
    names = list(registry.METHODS)
    colour = names.index(method) if method in names else len(names) + sorted(labels_of).index(method)
    spec = registry.METHODS.get(method)
    linestyle = LINESTYLES[labels_of[method].index(label) % len(LINESTYLES)]
    return {"color": PALETTE[colour % len(PALETTE)], "marker": spec.marker if spec else "o", "linestyle": linestyle}


def _dim_axis(ax, dims) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(int(d) for d in dims))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("D")


# -- figures ------------------------------------------------------------------------------------


def figure3(fits: list[FitCurve]):
    """Cumulative explained variance against the number of components as a fraction of D (the
    k-th component at k/D)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, fit in enumerate(sorted(fits, key=lambda f: (_datasets([f.dataset]), f.label))):
        ratio = fit.ratio
        x = np.arange(1, len(ratio) + 1) / len(ratio)
        name = paper.DATASET_TITLES.get(fit.dataset, fit.dataset)
        ax.plot(x, np.cumsum(ratio), color=f"C{i}", label=f"{name} {fit.label}".strip())
    ax.set_xlim(0, 1.0)
    ax.set_xticks([1 / 16, 1 / 4, 1 / 2, 3 / 4, 1], ["D/16", "D/4", "D/2", "3D/4", "D"])
    ax.set_xlabel("Number of components")
    ax.set_ylabel("Explained variance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def metric_figure(rows: list[ResultRow], metric: str, methods: list[str] | None = None):
    """2 × n grid: linear (top) and cluster (bottom) ``metric`` vs D, one column per dataset, one
    curve per method and configuration (± std over seeds), CRF results as separate markers."""
    import matplotlib.pyplot as plt

    methods = methods or registry.in_fig4() + sorted({r.method for r in rows} - set(registry.METHODS))
    datasets = _datasets({r.dataset for r in rows})
    labels_of: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r.label != "", r.label)):
        labels_of.setdefault(r.method, [])
        if r.label not in labels_of[r.method]:
            labels_of[r.method].append(r.label)
    fig, axes = plt.subplots(2, len(datasets), figsize=(max(4.5 * len(datasets), 7.5), 6.8), squeeze=False)
    paper_col = {"mIoU": {"cluster": 1, "linear": 3}, "Accuracy": {"cluster": 0, "linear": 2}}[metric]
    for col, dataset in enumerate(datasets):
        for row_i, probe in enumerate(("linear", "cluster")):
            ax = axes[row_i, col]
            for crf in ("no", "yes"):
                for (method, label), (x, y, err) in series(rows, dataset, probe, metric, crf).items():
                    if method not in methods:
                        continue
                    style = _style(method, label, labels_of)
                    if crf == "yes":  # filled for the preset's configuration, hollow for the others
                        ax.plot(x, y, linestyle="none", marker="v", color=style["color"], markerfacecolor="none" if label else None,
                                label=f"{_title(method, label)} + CRF")
                        continue
                    ax.plot(x, y, label=_title(method, label), **style)
                    if (err > 0).any():
                        ax.fill_between(x, y - err, y + err, color=style["color"], alpha=0.2)
            for name, (marker, colour, dims) in (("STEGO (released checkpoints, re-evaluated)", ("P", "k", paper.D_STEGO)),
                                                 ("DINO (probes retrained on raw DINO tokens)", ("X", "gray", paper.D_VIT))):
                value = paper.TABLE2[name].get(dataset, (None,) * 4)[paper_col[probe]]
                if value is not None:
                    ax.plot([dims[dataset]], [value], linestyle="none", marker=marker, color=colour, markersize=9,
                            label=f"paper: {name.split(' (')[0]} + CRF")
            _dim_axis(ax, [r.dim for r in rows if r.dataset == dataset and r.method in methods])
            ax.set_title(f"{paper.DATASET_TITLES.get(dataset, dataset)} — {probe}")
            ax.set_ylabel(f"{probe} {metric} (%)")
    _shared_legend(fig, axes)
    return fig


def against_figure(rows: list[ResultRow], dataset: str, method: str):
    """A method against the one it is compared with (``against`` in the registry) on one dataset,
    2 × 2: probe × metric. h-NNE against PCA is the paper's supplementary Fig. 2."""
    import matplotlib.pyplot as plt

    pair = (method, registry.get(method).against)
    labels_of = {m: sorted({r.label for r in rows if r.method == m}, key=lambda s: (s != "", s)) for m in pair}
    fig, axes = plt.subplots(2, 2, figsize=(8, 6.4))
    for i, probe in enumerate(("linear", "cluster")):
        for j, metric in enumerate(("mIoU", "Accuracy")):
            ax = axes[i, j]
            for (method, label), (x, y, _) in series(rows, dataset, probe, metric, "no").items():
                if method in labels_of:
                    ax.plot(x, y, label=_title(method, label), **_style(method, label, labels_of))
            _dim_axis(ax, [r.dim for r in rows if r.dataset == dataset and r.method in labels_of])
            ax.set_title(f"{paper.DATASET_TITLES.get(dataset, dataset)} — {probe} {metric}")
            ax.set_ylabel(f"{metric} (%)")
    _shared_legend(fig, axes)
    return fig


def _shared_legend(fig, axes, ncol: int | None = None) -> None:
    handles = {}
    for ax in axes.ravel():
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = ncol or min(4, max(1, len(handles)))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.045 * (1 + (len(handles) - 1) // ncol), 1, 1))


# -- the paper's open questions (the preset's `future:` section) ---------------------------------


def _params(row: ResultRow) -> dict[str, Any]:
    return row.config.get("params", {})


def _mean_by(rows: list[ResultRow], key, metric: str = "mIoU") -> tuple[np.ndarray, np.ndarray]:
    """x = key(row) → mean of ``metric`` over seeds, sorted by x."""
    points: dict[Any, list[float]] = {}
    for r in rows:
        points.setdefault(key(r), []).append(float(getattr(r, metric)))
    xs = sorted(points)
    return np.array(xs), np.array([np.mean(points[x]) for x in xs])


def future_figures(rows: list[ResultRow]) -> dict[str, Any]:
    """The figures of the families that ran: clusterers, over-clustering, h-NNE's hierarchy and
    the loss-parameter grid."""
    figures = {}
    for dataset in _datasets({r.dataset for r in rows}):
        mine = [r for r in rows if r.dataset == dataset and r.crf == "no"]
        suffix = f"_{dataset}" if len({r.dataset for r in rows}) > 1 else ""
        if any(r.family == "clusterers" for r in mine):
            figures[f"future_clusterers{suffix}"] = clusterer_figure(mine)
        if any(r.family == "over-clustering" for r in mine):
            figures[f"future_over_clustering{suffix}"] = over_clustering_figure(mine)
        if any(r.probe.startswith("hierarchy_") for r in mine):
            figures[f"future_hnne_hierarchy{suffix}"] = hierarchy_figure(mine)
        grid = [r for r in mine if r.family == "loss-grid"]
        if grid:
            figures[f"future_loss_grid{suffix}"] = loss_grid_figure(grid)
    return figures


def clusterer_figure(rows: list[ResultRow]):
    """Cluster mIoU vs D per clusterer, one panel per method (the paper's RP question: is cosine
    k-means what fails RP?)."""
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.probe == "cluster" and r.family in (None, "clusterers") and not _params(r).get("extra_clusters")]
    clusterers = sorted({_params(r).get("clusterer", "cosine") for r in chosen if r.family == "clusterers"} | {"cosine"})
    methods = [m for m in registry.METHODS if any(r.method == m and r.family == "clusterers" for r in chosen)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.2), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for i, clusterer in enumerate(clusterers):
            mine = [r for r in chosen if r.method == method and _params(r).get("clusterer", "cosine") == clusterer]
            x, y = _mean_by(mine, lambda r: int(r.dim))
            if len(x):
                ax.plot(x, y, marker="o", color=f"C{i}", label=clusterer + (" (STEGO's)" if clusterer == "cosine" else ""))
        _dim_axis(ax, [r.dim for r in chosen if r.method == method])
        ax.set_title(f"{_title(method)}: cluster probe")
        ax.set_ylabel("cluster mIoU (%)")
    _shared_legend(fig, axes)
    return fig


def over_clustering_figure(rows: list[ResultRow]):
    """mIoU vs K' (clusters) on raw DINO, three mappings of clusters to classes."""
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.method == registry.raw_method() and r.family in (None, "over-clustering")]
    k_prime = lambda r: _params(r)["n_classes"] + _params(r).get("extra_clusters", 0)  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), squeeze=False)
    mappings = (("cluster", "Hungarian, extra clusters dropped (STEGO's evaluation) [QUIRK]"),
                ("cluster_extra_as_errors", "Hungarian, extra clusters as errors"),
                ("cluster_many_to_one", "many-to-one (majority; fitted on the val labels)"))
    for ax, metric in zip(axes[0], ("mIoU", "Accuracy")):
        for i, (probe, title) in enumerate(mappings):
            mine = [r for r in chosen if r.probe == probe and not (probe == "cluster" and _params(r).get("extra_as_errors"))]
            x, y = _mean_by(mine, k_prime, metric)
            if len(x):
                ax.plot(x, y, marker="os^"[i], linestyle=LINESTYLES[i], color=f"C{i}", label=title)
        ax.set_xscale("log", base=2)
        ticks = sorted({k_prime(r) for r in chosen})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("clusters K'")
        ax.set_ylabel(f"cluster {metric} (%)")
        ax.set_title(f"Over-clustering raw DINO: {metric}")
    _shared_legend(fig, axes, ncol=1)
    return fig


def hierarchy_figure(rows: list[ResultRow]):
    """mIoU at every level of h-NNE's hierarchy against its number of clusters, beside k-means
    (learnt cosine and Lloyd's) on the h-NNE codes at the same D."""
    import matplotlib.pyplot as plt

    levels = [r for r in rows if r.probe.startswith("hierarchy_")]
    dim = levels[0].dim
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (probe, title) in enumerate((("hierarchy_errors", "levels, Hungarian (extra clusters as errors)"),
                                        ("hierarchy_many_to_one", "levels, many-to-one (fitted on the val labels)"))):
        x, y = _mean_by([r for r in levels if r.probe == probe], lambda r: int(r.clusters))
        ax.plot(x, y, marker="os"[i], color=f"C{i}", label=title)
    for i, clusterer in enumerate(("cosine", "kmeans")):
        mine = [r for r in rows if r.method == registry.hierarchy_method() and r.dim == dim and r.probe == "cluster"
                and _params(r).get("clusterer", "cosine") == clusterer and r.family in (None, "hierarchy")]
        if mine:
            ax.axhline(np.mean([r.mIoU for r in mine]), color=f"C{i + 2}", linestyle="--",
                       label=f"{'learnt cosine k-means' if clusterer == 'cosine' else 'Lloyd k-means'} on h-NNE codes (K)")
    ax.set_xscale("log")
    ax.set_xlabel("clusters at the level")
    ax.set_ylabel("cluster mIoU (%)")
    ax.set_title(f"h-NNE's hierarchy as the clusterer (fit at D={dim})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_grid_figure(rows: list[ResultRow]):
    """Cluster and linear mIoU over the grid of the two loss parameters that vary, one heatmap
    per D, the best cell outlined."""
    import matplotlib.pyplot as plt

    dims = sorted({int(r.dim) for r in rows})
    # the grid's keys: what varies among the heads of one D (the CRF, say, varies only across D)
    varying = [k for k in sorted({k for r in rows for k in _params(r)}) if k != "seed"
               and all(len({repr(_params(r).get(k)) for r in rows if int(r.dim) == d}) > 1 for d in dims)]
    keys = (varying + ["dim", "dim"])[:2]
    fig, axes = plt.subplots(2, len(dims), figsize=(3.8 * len(dims), 6.6), squeeze=False)
    names = {path[0]: name for path, name in readable_names([(k,) for k in keys]).items()}
    for col, dim in enumerate(dims):
        for row_i, probe in enumerate(("cluster", "linear")):
            ax = axes[row_i, col]
            mine = [r for r in rows if int(r.dim) == dim and r.probe == probe]
            xs, ys = (sorted({_params(r)[k] for r in mine}) for k in keys)
            grid = np.full((len(ys), len(xs)), np.nan)
            for y_i, yv in enumerate(ys):
                for x_i, xv in enumerate(xs):
                    values = [r.mIoU for r in mine if _params(r)[keys[0]] == xv and _params(r)[keys[1]] == yv]
                    grid[y_i, x_i] = np.mean(values) if values else np.nan
            image = ax.imshow(grid, origin="lower", cmap="viridis")
            best = np.unravel_index(np.nanargmax(grid), grid.shape)
            ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            for (y_i, x_i), value in np.ndenumerate(grid):
                ax.text(x_i, y_i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xticks(range(len(xs)), [short_value(v) for v in xs])
            ax.set_yticks(range(len(ys)), [short_value(v) for v in ys])
            ax.set_xlabel(names.get(keys[0], keys[0]))
            ax.set_ylabel(names.get(keys[1], keys[1]))
            ax.set_title(f"D={dim}: {probe} mIoU (%)")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


FAMILY_PROBES = {"clusterers": ("cluster",), "over-clustering": ("cluster", "cluster_extra_as_errors", "cluster_many_to_one"),
                 "hierarchy": ("cluster", "hierarchy_errors", "hierarchy_many_to_one"), "loss-grid": ("linear", "cluster")}


def future_tables(rows: list[ResultRow]) -> dict[str, list[dict[str, Any]]]:
    """One table per family that ran: each configuration (named by what it changes) at each D,
    mean ± std over seeds, without the CRF. A family's table includes the preset's own
    configuration (unlabelled) that it is compared with."""
    tables = {}
    for family, probes in FAMILY_PROBES.items():
        if not any(r.family == family for r in rows):
            continue
        methods = {r.method for r in rows if r.family == family} | ({registry.hierarchy_method()} if family == "hierarchy" else set())
        chosen = [r for r in rows if r.crf == "no" and r.probe in probes and r.method in methods
                  and (r.family == family or (r.family is None and (r.probe.startswith("hierarchy_") or family != "hierarchy"
                                                                          or r.method == registry.hierarchy_method())))]
        groups: dict[tuple, list[ResultRow]] = {}
        for r in chosen:
            groups.setdefault((r.dataset, r.method, r.label, int(r.dim), r.clusters, r.probe), []).append(r)
        table = []
        order = lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3], kv[0][4] or 0, kv[0][5])  # noqa: E731  coarsest level first
        for (dataset, method, label, dim, clusters, probe), members in sorted(groups.items(), key=order):
            entry: dict[str, Any] = {"dataset": dataset, "method": _title(method), "configuration": label or "preset", "D": dim}
            if family == "hierarchy":
                entry["clusters"] = clusters if clusters is not None else "K"
            entry["evaluation"] = probe
            for metric in ("mIoU", "Accuracy"):
                values = [float(getattr(m, metric)) for m in members]
                entry[f"{metric} (%)"], entry[f"{metric} (%) std"] = (float(np.mean(values)),
                                                                      float(np.std(values)) if len(values) > 1 else None)
            entry["seeds"] = len(members)
            table.append(entry)
        tables[family] = table
    return tables


# -- Table 2 ------------------------------------------------------------------------------------


def table2(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """Our Table 2 methods (raw DINO, the heads at their headline D), one row per configuration,
    with the CRF where it was evaluated, mean ± std over seeds; then the paper's rows."""
    datasets = _datasets({r.dataset for r in rows})
    out = []
    table_methods = [m for m, spec in registry.METHODS.items() if spec.table2]
    for method in table_methods:
        for label in sorted({r.label for r in rows if r.method == method and r.headline}, key=lambda s: (s != "", s)):
            entry: dict[str, Any] = {"method": f"{_title(method, label)} (stegoscope)"}
            for dataset in datasets:
                candidates = [r for r in rows if (r.dataset, r.method, r.label) == (dataset, method, label) and r.headline]
                crf = "yes" if any(r.crf == "yes" for r in candidates) else "no"
                seeds = {r.seed for r in candidates}
                for column in paper.COLUMNS:
                    probe, metric = column.split("/")
                    values = [getattr(r, metric) for r in candidates if r.probe == probe and r.crf == crf]
                    entry[f"{dataset} {column}"] = float(np.mean(values)) if values else None
                    entry[f"{dataset} {column} std"] = float(np.std(values)) if len(values) > 1 else None
                entry[f"{dataset} CRF"] = crf if candidates else None
                entry[f"{dataset} seeds"] = len(seeds) if candidates else None
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
    """Markdown and LaTeX (``mean ± std`` over seeds) and CSV (means and stds in columns)."""
    columns = [c for c in table[0] if not c.endswith(" std")] if table else []
    csv_columns = list(dict.fromkeys(c for row in table for c in row))

    def cell(row, column):
        value, std = row.get(column), row.get(f"{column} std")
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}" + (f" ± {std:.1f}" if std is not None else "")
        return str(value)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in table]
    csv_out = io.StringIO()
    writer = csv.DictWriter(csv_out, csv_columns)
    writer.writeheader()
    writer.writerows(table)
    tex = ["\\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", "\\hline", " & ".join(columns).replace("%", "\\%") + " \\\\", "\\hline"]
    tex += [" & ".join(cell(row, c).replace("±", "$\\pm$") for c in columns) + " \\\\" for row in table] + ["\\hline", "\\end{tabular}"]
    return {"md": "\n".join(md) + "\n", "csv": csv_out.getvalue(), "tex": "\n".join(tex) + "\n"}


# -- one file set -------------------------------------------------------------------------------


def render(cache_root: Path, out_dir: Path, studies: list[str]) -> dict[str, list[Path]]:
    """Draw what ``studies`` declared into ``out_dir`` (PNG + PDF; tables as md/csv/tex)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fits = collect(cache_root, studies)
    out_dir = as_path(out_dir)
    begin_artefact(out_dir)  # a run killed before the end leaves no manifest
    figures = {}
    if fits:
        figures["fig3_explained_variance"] = figure3(fits)
    paper_rows = [r for r in rows if not r.family and r.probe in ("linear", "cluster")]  # the paper's figures
    if paper_rows:
        figures["fig4_miou_vs_dim"] = metric_figure(paper_rows, "mIoU")
        figures["supp_fig1_accuracy_vs_dim"] = metric_figure(paper_rows, "Accuracy")
        for method in (spec.name for spec in registry.METHODS.values() if spec.against):
            for dataset in _datasets({r.dataset for r in paper_rows if r.method == method}):
                figures[f"supp_fig2_{method}_{dataset}"] = against_figure(paper_rows, dataset, method)
        successors = [m for m, spec in registry.METHODS.items() if not spec.paper]
        if any(r.method in successors for r in paper_rows):  # does the paper's dimensionality story hold for them?
            figures["beyond_stego_miou_vs_dim"] = metric_figure(paper_rows, "mIoU", registry.in_fig4() + successors)
    figures |= future_figures(rows)
    written: dict[str, list[Path]] = {}
    for name, fig in figures.items():
        written[name] = [out_dir / f"{name}.{ext}" for ext in ("png", "pdf")]
        for path in written[name]:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=path.suffix[1:], dpi=150)
            atomic_write_bytes(path, buffer.getvalue())
        plt.close(fig)
    if rows:
        texts = {f"table2.{ext}": text for ext, text in table_texts(table2(paper_rows)).items()}
        texts["results.csv"] = results_csv(rows)
        for family, table in future_tables(rows).items():
            texts |= {f"future_{family.replace('-', '_')}.{ext}": text for ext, text in table_texts(table).items()}
        for name, text in texts.items():
            atomic_write_text(out_dir / name, text)
        written["table2"] = [out_dir / name for name in texts if name.startswith("table2")]
        written["results"] = [out_dir / "results.csv"]
    if written:
        inputs = sorted({r.key for r in rows} | {f.key for f in fits})
        params = {"studies": studies}
        manifest = Manifest(key=stage_key("figures", 1, params, inputs), stage="figures", params=params, inputs=inputs,
                            finished=time.time(), studies=studies)
        write_manifest(out_dir, manifest, [p for paths in written.values() for p in paths])
    return written
