"""Running a study: the plan of a graph, running the graphs of several contexts as one (groups
across them), and the record of what each experiment declared (what ``figures`` draws).

Every stage a context runs or finds cached is recorded under
``<cache>/studies/<preset>/experiments/<experiment>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from . import cache_schema
from .atomic import atomic_write_text
from .compute import dask_scheduler
from .config import ConfigError, config_changes, readable_names, short_value
from .graph import Node, run_order
from .pipeline import COMPLETE, PARTIAL, RunResult, Stage, canonical_json, read_manifest, run_group, stage_lock
from .records import StudyNode, StudyRecord
from .study import StudyContext


def run_graph(ctx: StudyContext, graph: list[Node], progress: Callable[[Node], None] | None = None, force: list[Stage] = (),
              wait: bool = True, on_wait: Callable[[Node, str], None] | None = None) -> list[tuple[Node, RunResult]]:
    """:func:`run_studies` of one context's ``graph``."""
    return run_studies([(ctx, graph)], progress, force, wait, on_wait)[0]


def run_studies(plans: list[tuple[StudyContext, list[Node]]], progress: Callable[[Node], None] | None = None,
                force: list[Stage] = (), wait: bool = True,
                on_wait: Callable[[Node, str], None] | None = None) -> list[list[tuple[Node, RunResult]]]:
    """Run the graphs of several contexts (the experiments of a sweep, the ``future`` families)
    as one: every stage once, groups across them (:func:`run_order`); then record each study.

    A node runs when it is not complete, is in ``force``, or is complete but its upstream reran
    (a re-extraction rewrites the same key's tokens, so it forces nothing). Returns each
    graph's (node, result) in its order; a stage two graphs share counts as run in the first."""
    nodes: dict[str, Node] = {}  # one node per stage key, the first graph's
    for _, graph in plans:
        for node in graph:
            nodes.setdefault(node.stage.key, node)
    upstream = {key: {up.stage.key for up in node.upstream_nodes()} for key, node in nodes.items()}
    forced, ran, results = {stage.key for stage in force}, set(), {}
    group = all(ctx.group for ctx, _ in plans)
    with dask_scheduler(plans[0][0].scheduler):
        for batch in run_order(list(nodes.values()), group):
            again = {n.stage.key for n in batch if n.stage.key in forced
                     or (n.stage.state() == COMPLETE and upstream[n.stage.key] & ran)}
            for node in batch:
                if progress is not None:
                    progress(node)
            for members in ([n for n in batch if n.stage.key in again], [n for n in batch if n.stage.key not in again]):
                if not members:
                    continue
                waiting = None if on_wait is None else lambda holder, node=members[0]: on_wait(node, holder)
                for node, result in zip(members, run_group([n.stage for n in members], force=members[0].stage.key in again,
                                                           wait=wait, on_wait=waiting)):
                    if not result.skipped and not node.stage.remade_in_place:
                        ran.add(node.stage.key)
                    results[node.stage.key] = result
    out, reported = [], set()
    for ctx, graph in plans:
        record_experiment(ctx, graph)
        rows = []
        for node in graph:
            result = results[node.stage.key]
            if node.stage.key in reported and not result.skipped:
                result = RunResult(node.stage, True, 0.0)  # it ran for an earlier graph
            reported.add(node.stage.key)
            rows.append((node, result))
        out.append(rows)
    return out


def plan(graph: list[Node]) -> list[tuple[Node, str, str]]:
    """(node, ``run`` | ``cached``, why) for each node of ``graph``, without running anything."""
    runs: set[int] = set()
    out = []
    for node in graph:
        state = node.stage.state()
        upstream = [n for n in graph if id(n) in node.upstream() and id(n) in runs and not n.stage.remade_in_place]
        if state == COMPLETE and not upstream:
            out.append((node, "cached", ""))
            continue
        if state == COMPLETE:
            why = f"upstream reruns ({upstream[0].label})"
        elif state == PARTIAL:
            why = "partial: resumes"
        else:
            why = node.stage.stale_reason() or previous_change(node.stage) or "missing"
        runs.add(id(node))
        out.append((node, "run", why))
    return out


def previous_change(stage: Stage) -> str | None:
    """What changed since the closest earlier artefact of the same node (same name, another key):
    ``λ_rand 0.63 → 0.3``; None when there is none."""
    config, best = stage.config(), None
    for other in cache_schema.sibling_artefacts(stage.output):
        try:
            manifest = read_manifest(other)
        except cache_schema.StoreError:
            continue
        if not manifest or not manifest.config:
            continue
        now, before = config_changes(config, manifest.config), config_changes(manifest.config, config)
        if best is None or len(now) + len(before) < best[0]:
            best = (len(now) + len(before), now, before)
    if best is None:
        return None
    _, now, before = best
    names = readable_names(set(now) | set(before))
    missing = "—"
    parts = sorted(f"{names[p]} {short_value(before.get(p, missing))} → {short_value(now.get(p, missing))}" for p in names)
    return "changed: " + "; ".join(parts) if parts else None


def require_complete(stage: Stage, command: str) -> None:
    """Stop with what is wrong and the command that fixes it unless ``stage`` has finished."""
    if stage.state() != COMPLETE:
        problem = stage.note() or f"{stage.output} is not computed yet"
        raise ConfigError(f"{problem}; run `{command}` (same options) first")


# -- the record of what the study declared --------------------------------------------------


def record_experiment(ctx: StudyContext, graph: list[Node]) -> Path:
    """Add ``graph``'s nodes to this experiment's record: its results (what the figures draw),
    its fits (Fig. 3) and the inputs they read (what `gc` keeps). A record made from other
    preset content is started afresh (its artefacts stay in the cache)."""
    experiment = ctx.preset.experiment()
    path = cache_schema.experiment_record_path(ctx.cache_root, ctx.preset.name, experiment)
    content = hashlib.sha256(canonical_json(ctx.preset.source).encode()).hexdigest()
    with stage_lock(cache_schema.lock_path(ctx.cache_root, f"study-{ctx.preset.name}-{experiment}")):
        old = cache_schema.read_study_record(path)
        nodes = dict(old.nodes) if old is not None and old.preset_sha256 == content else {}
        for node in graph:
            nodes[node.label] = StudyNode(
                key=node.stage.key, output=_relative(node.stage.output, ctx.cache_root), stage=node.stage.name, kind=node.kind,
                method=node.method, dim=node.dim, seed=node.seed, result=node.result, label=node.stage.label,
                headline=bool(node.result and ctx.headline(node.method, node.dim)), family=ctx.family)
        record = StudyRecord(study=ctx.preset.name, experiment=experiment, preset_sha256=content, updated=time.time(),
                             nodes=nodes, label=ctx.preset.label(), overrides=ctx.preset.overrides,
                             preset=None if ctx.preset.path is None else str(ctx.preset.path))
        atomic_write_text(path, json.dumps(record.to_dict(), indent=1, sort_keys=True))
    return path


def recorded_keys(cache_root: Path) -> set[str]:
    """The key of every stage that any experiment of any study recorded."""
    keys = set()
    for study in cache_schema.list_studies(cache_root):
        for record in cache_schema.study_records(cache_root, study):
            keys.update(node.key for node in record.nodes.values())
    return keys


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the cache root (``..`` for an artefact given from another local cache)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.path.relpath(path, root)


