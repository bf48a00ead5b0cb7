"""The graph of a study: nodes (a stage, the nodes it reads, and what it is in the study), the
order they run in (groups together) and their states. Knows no particular stage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .pipeline import COMPLETE, MISSING, Artefact, Stage


@dataclass
class Node:
    """One stage of the study graph, the nodes it depends on, and where its result sits."""

    label: str
    stage: Stage
    deps: list[Node] = field(default_factory=list)
    method: str | None = None
    dim: int | None = None
    seed: int | None = None
    result: bool = False  # its artefact holds metrics (a probe or a head)
    experiment: str = ""  # the experiment of its study that declared it (Preset.experiment)

    def upstream_nodes(self) -> list[Node]:
        """Every node upstream of this one."""
        seen, todo, out = set(), list(self.deps), []
        while todo:
            node = todo.pop()
            if id(node) not in seen:
                seen.add(id(node))
                out.append(node)
                todo.extend(node.deps)
        return out

    def upstream(self) -> set[int]:
        return {id(node) for node in self.upstream_nodes()}

    @property
    def kind(self) -> str:
        """What the study record calls it: a ``result``, a ``fit`` (Fig. 3) or an ``input``."""
        return "result" if self.result else self.stage.recorded_as


def graph_of(targets: Iterable[Stage], names: dict[int, str], coords: dict[int, tuple], experiment: str = "") -> list[Node]:
    """``targets`` and every stage upstream of them (not artefacts given by their folder), as nodes
    in dependency order; ``names`` and ``coords`` (method, dim, seed, result) by stage id."""
    nodes: dict[int, Node] = {}

    def visit(stage: Stage) -> Node:
        if id(stage) not in nodes:
            deps = [visit(up) for up in stage.upstream().values() if not isinstance(up, Artefact)]
            method, dim, seed, result = coords.get(id(stage), (getattr(stage, "method", None), None, None, False))
            nodes[id(stage)] = Node(names.get(id(stage), stage.name), stage, deps, method, dim, seed, result, experiment)
        return nodes[id(stage)]

    for stage in targets:
        visit(stage)
    return list(nodes.values())


def run_order(graph: list[Node], group: bool = True) -> list[list[Node]]:
    """The nodes in the order they run, nodes that run together in one list. Without ``group``:
    each alone, in graph order. With it: whatever runs alone runs as soon as its upstream is done;
    a node with a group key waits until nothing else is ready, then runs with every ready node
    of its key (so the probes of every reducer wait for every fit, and train as one group)."""
    if not group:
        return [[node] for node in graph]
    order, remaining = [], list(graph)
    keys = {id(node): node.stage.group_key() for node in graph}
    while remaining:
        pending = {node.stage.key for node in remaining}
        ready = [n for n in remaining if not any(d.stage.key in pending for d in n.deps)]
        alone = [n for n in ready if keys[id(n)] is None]
        nodes = alone[:1] or [n for n in ready if keys[id(n)] == keys[id(ready[0])]]
        order.append(nodes)
        taken = {id(n) for n in nodes}
        remaining = [n for n in remaining if id(n) not in taken]
    return order


def node_states(graph: list[Node]) -> dict[int, str]:
    """complete / partial / missing per node; ``stale`` when complete but something upstream is
    not, or when only an output made from other inputs exists (an extraction of a changed dataset)."""
    own = {id(n): n.stage.state() for n in graph}
    states = {}
    for node in graph:
        state = own[id(node)]
        if state == COMPLETE and any(own.get(u) != COMPLETE for u in node.upstream()):
            state = "stale"
        elif state == MISSING and node.stage.stale_reason():
            state = "stale"
        states[id(node)] = state
    return states
