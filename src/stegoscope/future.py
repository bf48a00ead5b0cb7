"""The ``future`` section of a preset: the paper's open questions as experiments of the study.

Each family is a set of configurations that differ from the preset in one place (the clusterer,
the extra clusters, h-NNE's hierarchy as the clusterer, a grid of a head's loss weights); each
configuration is a context of its own, marked with its family so that its results are drawn by
its family's figure and table, not by Fig. 4.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from . import methods as registry
from .config import Preset
from .pipeline import Stage
from .study import StudyContext


def future_experiments(ctx: StudyContext) -> list[tuple[StudyContext, list[Stage]]]:
    """For each configuration of ``ctx``'s ``future`` section, its context and result stages. A
    configuration that is the preset's own is ``ctx`` itself (its results are the study's)."""
    f, dims = ctx.preset.future, list(ctx.preset.sweep_dims())
    plan: list[tuple[StudyContext, list[Stage]]] = []

    def variant(family: str, overrides: dict[str, Any]) -> StudyContext:
        preset = ctx.preset.with_overrides(overrides)
        if _resolved(preset) == _resolved(ctx.preset):
            return ctx
        other = ctx.variant(preset)
        other.family = family  # differs from the preset: drawn by its family's figure, not Fig. 4
        return other

    for clusterer in f.clusterers:
        other = variant("clusterers", {"eval.clusterer": clusterer})
        plan.append((other, [other.probe(m, d) for m in f.clusterer_methods for d in dims]))
    for extra in f.extra_clusters:
        other = variant("over-clustering", {"eval.extra_clusters": extra})
        plan.append((other, [other.probe(registry.raw_method())]))
    if f.hierarchy:
        method = registry.hierarchy_method()
        plan.append((ctx, [ctx.hierarchy(dims[0]), ctx.probe(method, dims[0])]))
        other = variant("hierarchy", {"eval.clusterer": "kmeans"})
        plan.append((other, [other.probe(method, dims[0])]))
    keys = list(f.loss_grid)
    for values in itertools.product(*f.loss_grid.values()):
        other = variant("loss-grid", dict(zip(keys, values)))
        plan.append((other, [other.head(keys[0].split(".")[0], d) for d in dims]))
    return plan


def _resolved(preset: Preset) -> Preset:
    """The preset's parsed settings alone (not how they were given)."""
    return replace(preset, path=None, source={}, overrides={})
