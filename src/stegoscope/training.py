"""One training loop for every probe and head: a *group* of members that read the same train
store with the same batch schedule, trained in one pass.

A :class:`Member` is one configuration (a probe on one reducer's codes, a head at one D, λ, b …):
it owns its modules, optimisers, log and global random state, and does one step on a
:class:`SharedBatch`. The group draws each batch once (rows, kNN partners) and gathers its
tokens once; every member then steps on it. A group of one is a solo run.

Bit-for-bit equal to training each member alone: the batch schedule depends only on the
:class:`Schedule` (its own numpy generator); each member's global torch draws (initialisation,
dropout) come from its own :class:`RandomState`, swapped in around its work; the shared tensors
are read, never written. So on the CPU a member's weights, history and metrics do not depend on
the group it trained in (tested).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .probing import Evaluation, evaluate_together
from .progress import progress_bar


@dataclass(frozen=True)
class Schedule:
    """What a group's members share: which rows each step reads, and when they validate."""

    steps: int
    batch_size: int
    val_every: int
    seed: int
    neighbours: int = 0  # kNN partner drawn from ranks 1..neighbours (0: no partners)
    sort_rows: bool = False  # the probes read each batch's rows in store order

    def batches(self, n_rows: int, nns: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(step, rows, partner rows) for steps 1..``steps``: STEGO's ``drop_last`` shuffling,
        then a partner uniformly from ranks 1..``neighbours`` of each row's neighbours."""
        rng = np.random.default_rng(self.seed)
        order = BatchOrder(n_rows, self.batch_size, rng)
        for step in range(1, self.steps + 1):
            rows = order.next()
            if self.sort_rows:
                rows = np.sort(rows)
            partners = None
            if self.neighbours and nns is not None:
                partners = nns[rows, rng.integers(1, self.neighbours + 1, size=len(rows))]
            yield step, rows, partners

    def validates(self, step: int) -> bool:
        return step % self.val_every == 0 or step == self.steps


class BatchOrder:
    """The rows of each batch: a seeded permutation of the store, drawn anew when fewer rows than
    a batch are left (STEGO's ``drop_last`` shuffling)."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.order, self.cursor = rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = self.rng.permutation(self.n), 0
        rows = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return rows


class SharedBatch:
    """One step's rows and what every member reads of them, each gathered once, on first use.

    ``gather(rows)`` gives ((B, C, h, w) float tokens, (B, H, W) long labels) where the group's
    train arrays live (:class:`~stegoscope.probing.TokenBatches`)."""

    def __init__(self, step: int, rows: np.ndarray, partners: np.ndarray | None,
                 gather: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]):
        self.step, self.rows, self.partners, self._gather = step, rows, partners, gather

    @cached_property
    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(self.rows)

    @property
    def feats(self) -> torch.Tensor:
        return self._gathered[0]

    @property
    def labels(self) -> torch.Tensor:
        return self._gathered[1]

    @cached_property
    def partner_feats(self) -> torch.Tensor | None:
        return None if self.partners is None else self._gather(self.partners)[0]


class RandomState:
    """A member's own global torch random state (CPU and CUDA), as ``torch.manual_seed(seed)``
    leaves it, swapped in around the member's work and saved back after."""

    def __init__(self, seed: int):
        self.seed = seed
        self.cpu: torch.Tensor | None = None
        self.cuda: list[torch.Tensor] | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        outer_cpu, outer_cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
        if self.cpu is None:
            torch.manual_seed(self.seed)  # CPU and every CUDA device, as a solo run begins
        else:
            torch.set_rng_state(self.cpu)
            if cuda and self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            self.cuda = torch.cuda.get_rng_state_all() if cuda else None
            torch.set_rng_state(outer_cpu)
            if outer_cuda is not None:
                torch.cuda.set_rng_state_all(outer_cuda)


class Member(ABC):
    """One configuration trained in a group. Subclasses build their modules and optimisers in
    ``__init__`` (inside :attr:`random`) and implement :meth:`backward`, :meth:`evaluation` and
    :meth:`snapshot`."""

    select: str = "cluster/mIoU"  # the validation metric whose best step is kept
    optimizers: list[torch.optim.Optimizer]  # stepped by the group (see :func:`merged`), not by the member

    def __init__(self, seed: int):
        self.random = RandomState(seed)

    @abstractmethod
    def backward(self, batch: SharedBatch) -> None:
        """The step's loss on the shared batch and its backward pass (and what must come between
        it and the optimiser step, such as gradient clipping); nothing here waits on the device."""

    def after_update(self, step: int) -> None:
        """After the optimisers' step ``step`` (EMA teachers, renewed pools)."""

    @abstractmethod
    def evaluation(self) -> Evaluation:
        """What to score over val for the current weights (the group scores every member's in one pass)."""

    def validated(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The validation row of the current weights, from their val ``metrics``."""
        return metrics

    @abstractmethod
    def snapshot(self) -> Any:
        """What is kept of the best step."""

    def flush(self) -> None:
        """After every member's step: read what the step left to log (the one place a step's
        values reach the host, every N steps)."""


PER_PARAMETER = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)  # no coupling between parameters


def merged(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The members' optimisers as few as they can be: one per class, each parameter group with
    the same settings as another joined to it, so one foreach (or fused) update spans every
    member. These optimisers update each parameter from its own gradient and state alone, so
    every parameter follows the path its own optimiser gives it; others are kept as they are.
    Call before the first step (the state starts empty)."""
    out: list[torch.optim.Optimizer] = []
    by_class: dict[type, dict[tuple, dict]] = {}
    for optimizer in optimizers:
        if type(optimizer) not in PER_PARAMETER or optimizer.state:
            out.append(optimizer)
            continue
        groups = by_class.setdefault(type(optimizer), {})
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            joined = groups.setdefault(tuple(sorted((k, repr(v)) for k, v in settings.items())), {**settings, "params": []})
            joined["params"].extend(group["params"])
    return out + [cls(list(groups.values())) for cls, groups in by_class.items()]


@dataclass
class Trained:
    """A member's training: every validation row, the best one and the snapshot taken there."""

    history: list[dict]
    best: dict
    best_snapshot: Any


CHECK_SYNCS = os.environ.get("STEGOSCOPE_CHECK_SYNCS") == "1"  # on CUDA: a step that waits on the host is an error


@contextmanager
def host_syncs_refused(check: bool) -> Iterator[None]:
    """With ``check`` on CUDA, any operation inside that makes the host wait for the device raises
    (``torch.cuda.set_sync_debug_mode("error")``); elsewhere nothing."""
    if not (check and torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def train_group(members: list[Member], schedule: Schedule, n_rows: int, gather, device: torch.device,
                nns: np.ndarray | None = None, label: str = "train", show_progress: bool = True) -> list[Trained]:
    """Train every member on the schedule's batches; every ``val_every`` steps and at the last,
    validate every member in one pass over val and keep the snapshot of each one's best step by
    its ``select`` metric (the cluster mIoU: the paper's protocol). One progress bar counts the
    group's steps."""
    optimizers = merged([optimizer for member in members for optimizer in member.optimizers])
    histories: list[list[dict]] = [[] for _ in members]
    best: list[dict | None] = [None] * len(members)
    snapshots: list[Any] = [None] * len(members)
    with progress_bar("step", show_progress) as bar:
        task = bar.add_task(label + (f" ({len(members)} together)" if len(members) > 1 else ""), total=schedule.steps)
        for step, rows, partners in schedule.batches(n_rows, nns):
            batch = SharedBatch(step, rows, partners, gather)
            with host_syncs_refused(CHECK_SYNCS):  # one step of the group: zero, every backward, one update
                for optimizer in optimizers:
                    optimizer.zero_grad()
                for member in members:
                    with member.random.active():
                        member.backward(batch)
                for optimizer in optimizers:
                    optimizer.step()
                for member in members:
                    with member.random.active():
                        member.after_update(step)
            for member in members:
                member.flush()
            if schedule.validates(step):
                evaluations = []
                for member in members:
                    with member.random.active():
                        evaluations.append(member.evaluation())
                for i, (member, metrics) in enumerate(zip(members, evaluate_together(evaluations, device))):
                    row = {"step": step, **member.validated(metrics)}
                    histories[i].append(row)
                    if best[i] is None or row[member.select] > best[i][member.select]:
                        best[i] = row
                        with member.random.active():
                            snapshots[i] = member.snapshot()
            bar.advance(task)
    return [Trained(h, b, s) for h, b, s in zip(histories, best, snapshots)]
