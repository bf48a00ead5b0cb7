"""The pipeline profile's arithmetic (``extract --profile``), on a clock the test moves by hand."""

from __future__ import annotations

import threading

import pytest

from stegoscope import profiling
from stegoscope.profiling import StageClock, verdict


@pytest.fixture
def now(monkeypatch):
    """A perf_counter that moves only when the test says: ``now[0] += seconds``; the CPU seconds
    likewise, in ``now[1]``, on 2 cores."""
    t = [100.0, 0.0]
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: t[0])
    monkeypatch.setattr(profiling, "cpu_seconds", lambda: t[1])
    monkeypatch.setattr(profiling.os, "cpu_count", lambda: 2)
    return t


def test_busy_leaves_out_the_waits_inside_it_and_the_wait_goes_to_the_stage_waited_on(now):
    clock = StageClock({"decode": 2, "model": 1, "write": 1})
    with clock.busy("model"):
        now[0] += 3
        with clock.waiting("write"):  # e.g. no free buffer: the writer is behind
            now[0] += 2
        now[0] += 1
    with clock.waiting("decode"):
        now[0] += 4
    clock.add("decode", 6.0)  # the workers' own seconds
    rows = {row.stage: row for row in clock.profile()}
    assert rows["model"].busy == 4 and rows["write"].waited_on == 2 and rows["decode"].waited_on == 4
    assert rows["model"].wall == 10
    assert rows["decode"].busy_share == pytest.approx(6 / (10 * 2)) and rows["model"].busy_share == pytest.approx(0.4)
    assert rows["decode"].waited_share == pytest.approx(0.4)


def test_waits_are_counted_per_thread(now):
    clock = StageClock({"model": 1, "write": 1})
    inside = threading.Event()

    def other_thread_waits():
        with clock.waiting("model"):
            now[0] += 5
        inside.set()

    with clock.busy("write"):
        thread = threading.Thread(target=other_thread_waits)
        thread.start()
        thread.join()
    rows = {row.stage: row for row in clock.profile()}
    assert inside.is_set() and rows["model"].waited_on == 5
    assert rows["write"].busy == 5  # another thread's wait is not this thread's: the span stays busy


def test_the_verdict_names_the_saturated_stage_or_says_none_is(now):
    clock = StageClock({"decode": 1, "model": 1})
    clock.add("model", 8.0)
    clock.add("decode", 3.0)
    now[0] += 10
    assert verdict(clock.profile()).startswith("bound by model")
    idle = StageClock({"decode": 1, "model": 1})
    idle.add("model", 1.0)
    with idle.waiting("decode"):
        now[0] += 6
    now[0] += 4
    assert verdict(idle.profile()).startswith("no stage is saturated") and "most waited on: decode" in verdict(idle.profile())


def test_a_run_whose_cores_were_all_busy_is_bound_by_the_cpu_not_by_a_stage(now):
    clock = StageClock({"decode": 2, "model": 1})
    clock.add("decode", 14.0)  # 70 % of its 2 workers
    clock.add("model", 6.0)
    now[0] += 10
    now[1] += 19  # of 2 cores × 10 s
    rows = clock.profile()
    assert rows[-1].stage == "cpu" and rows[-1].busy_share == pytest.approx(0.95)
    assert verdict(rows).startswith("bound by the CPU: its 2 cores busy 95%")
    now[1] -= 9  # half the cores idle: the busiest stage is named instead
    assert verdict(clock.profile()).startswith("bound by decode")
