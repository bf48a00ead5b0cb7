"""Where a pipeline of threads spends its time (``extract --profile``).

Each stage's **busy** time (summed over its workers, the waits inside it left out) and the time
the other stages **waited on** it, measured with a monotonic clock. A stage that is busy for most
of the run bounds it; a run whose stages are all far from busy waits on latency, not throughput.
Worker processes (the DataLoader's decoders) report their busy seconds with the batch they make.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module: torch only when a device is timed
    import torch

SATURATED = 0.5  # a stage busy for less than this share of the run does not bound it
CPU_BOUND = 0.9  # the process and its workers used this share of every core: the stages share them
CPU = "cpu"  # the profile's last row: every core of the machine, as the stages on the host share it


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for (DataLoader
    workers are, when a loader finishes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class StageTime:
    """One row of the profile: seconds over the run of ``wall`` seconds."""

    stage: str
    workers: int
    busy: float  # summed over the stage's workers
    waited_on: float  # by the other stages, summed over their threads
    wall: float

    @property
    def busy_share(self) -> float:
        """Of the time its workers had: 1.0 when every worker was busy throughout."""
        return self.busy / max(self.wall * self.workers, 1e-12)

    @property
    def waited_share(self) -> float:
        return self.waited_on / max(self.wall, 1e-12)


class StageClock:
    """Busy and waiting seconds by stage, from any thread. ``busy(stage)`` and ``waiting(on)``
    nest: the waits inside a busy span are not counted as busy."""

    def __init__(self, workers: dict[str, int]):
        self.workers = dict(workers)  # stage → its workers, in pipeline order
        self.busy_s = dict.fromkeys(self.workers, 0.0)
        self.waited_s = dict.fromkeys(self.workers, 0.0)
        self.lock = threading.Lock()
        self.local = threading.local()
        self.device_spans: list[tuple[str, Any, Any]] = []  # (stage, start, end) CUDA events
        self.start()

    def start(self) -> None:
        """The run starts now (after what is not the pipeline's: building the model)."""
        self.started, self.cpu_started = time.perf_counter(), cpu_seconds()

    def _waited_here(self) -> float:
        return getattr(self.local, "waited", 0.0)

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        start, waited = time.perf_counter(), self._waited_here()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start - (self._waited_here() - waited))

    @contextmanager
    def waiting(self, on: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.local.waited = self._waited_here() + seconds
            with self.lock:
                self.waited_s[on] += seconds

    @contextmanager
    def span(self, stage: str, device: torch.device) -> Iterator[None]:
        """Busy on ``device``: on CUDA the work enqueued inside, timed by a pair of events read
        when the profile is taken (recording them makes the host wait for nothing); else
        :meth:`busy`."""
        if device.type != "cuda":
            with self.busy(stage):
                yield
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.device_spans.append((stage, start, end))

    def add(self, stage: str, seconds: float) -> None:
        """Busy seconds measured elsewhere (a worker process, a device timer)."""
        with self.lock:
            self.busy_s[stage] += seconds

    def profile(self) -> list[StageTime]:
        """The rows so far, then the CPU's (every core); device spans are read here (after the
        run: their work is done)."""
        wall = time.perf_counter() - self.started
        cpu = StageTime(CPU, os.cpu_count() or 1, cpu_seconds() - self.cpu_started, 0.0, wall)
        for stage, start, end in self.device_spans:
            end.synchronize()
            self.add(stage, start.elapsed_time(end) / 1000)
        self.device_spans = []
        with self.lock:
            return [*(StageTime(s, n, self.busy_s[s], self.waited_s[s], wall) for s, n in self.workers.items()), cpu]


class NullClock:
    """A clock that measures nothing (the default where nobody asked for a profile)."""

    def start(self) -> None:
        pass

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        yield

    waiting = busy

    @contextmanager
    def span(self, stage: str, device: torch.device) -> Iterator[None]:
        yield

    def add(self, stage: str, seconds: float) -> None:
        pass


NULL_CLOCK = NullClock()


def verdict(profile: list[StageTime]) -> str:
    """Which stage bounds the run, in words."""
    stages = [row for row in profile if row.stage != CPU]
    if not stages:
        return "nothing ran"
    top = max(stages, key=lambda row: row.busy_share)
    cpu = next((row for row in profile if row.stage == CPU), None)
    if cpu is not None and cpu.busy_share >= CPU_BOUND > top.busy_share:
        return (f"bound by the CPU: its {cpu.workers} cores busy {cpu.busy_share:.0%} of the run, shared by the stages "
                f"that run on them (the busiest, {top.stage}, {top.busy_share:.0%})")
    if top.busy_share < SATURATED:
        most = max(stages, key=lambda row: row.waited_share)
        return (f"no stage is saturated (the busiest, {top.stage}, {top.busy_share:.0%}): the stages wait on each other; "
                f"most waited on: {most.stage} ({most.waited_share:.0%} of the run)")
    return f"bound by {top.stage}: its {top.workers} worker(s) busy {top.busy_share:.0%} of the run"
