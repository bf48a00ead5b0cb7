"""The benchmarks' shared harness (benchmarks/harness.py): its options, clock and record.

torch is replaced by a small fake where a device is resolved: importing the real one takes longer
than these tests may, and the fake also lets CUDA's synchronisation be counted without a GPU.
"""

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402


class FakeDevice:
    def __init__(self, name: str):
        self.type = name.partition(":")[0]
        self.name = name

    def __str__(self) -> str:
        return self.name


@pytest.fixture
def fake_torch(monkeypatch):
    """A torch with only what the harness uses; ``events`` logs each synchronisation."""
    events = []
    cuda = SimpleNamespace(available=False, synchronize=lambda device=None: events.append("sync"))
    cuda.is_available = lambda: cuda.available
    torch = SimpleNamespace(device=FakeDevice, cuda=cuda, events=events)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch


def test_timing_counts_only_the_repeats_and_measures_each_call():
    calls = []

    def nap():
        calls.append(time.perf_counter())
        time.sleep(0.02)
        return len(calls)

    timing = harness.time_calls(nap, warmup=2, repeat=3)
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert len(timing.seconds) == 3
    assert all(s >= 0.02 for s in timing.seconds)
    assert timing.min == min(timing.seconds) and timing.min <= timing.median <= max(timing.seconds)
    assert timing.result == 5  # the last call's return value


def test_warmup_calls_are_not_timed():
    calls = []

    def slow_first_calls():
        calls.append(None)
        time.sleep(0.1 if len(calls) <= 2 else 0.0)

    timing = harness.time_calls(slow_first_calls, warmup=2, repeat=4)
    assert len(calls) == 6
    assert len(timing.seconds) == 4 and max(timing.seconds) < 0.1
    with pytest.raises(ValueError):
        harness.time_calls(slow_first_calls, warmup=0, repeat=0)


def test_cuda_is_synchronised_around_each_timed_call(fake_torch):
    def call():
        fake_torch.events.append("call")

    harness.time_calls(call, warmup=1, repeat=2, device="cuda")
    assert fake_torch.events == ["call", "sync", "call", "sync", "sync", "call", "sync"]
    fake_torch.events.clear()
    harness.time_calls(call, warmup=1, repeat=2, device="cpu")
    assert fake_torch.events == ["call"] * 3


def test_parser_options_defaults_aliases_and_opt_out():
    parser = harness.make_parser("doc", warmup=2, repeat=5, aliases={"repeat": ["--steps"]})
    args = parser.parse_args([])
    assert (args.device, args.warmup, args.repeat, args.json) == ("auto", 2, 5, None)
    args = parser.parse_args(["--device", "cpu", "--steps", "7", "--json", "out.json"])
    assert (args.device, args.repeat, args.json) == ("cpu", 7, Path("out.json"))
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    assert parser.description == "doc"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])
    bare = harness.make_parser(None, device=None, warmup=None, repeat=None).parse_args([])
    assert vars(bare) == {"json": None}


def test_device_resolution(fake_torch):
    args = harness.make_parser(None).parse_args(["--device", "cpu"])
    assert harness.resolve_device(args.device).type == "cpu"
    assert harness.Results(args).device.type == "cpu"
    assert harness.resolve_device("auto").type == "cpu"
    with pytest.raises(SystemExit):
        harness.resolve_device("cuda")
    fake_torch.cuda.available = True
    assert harness.resolve_device("auto").type == "cuda"
    assert str(harness.resolve_device("cuda:1")) == "cuda:1"


def test_json_round_trips_the_recorded_figures(tmp_path, capsys):
    out = tmp_path / "runs" / "figures.json"
    args = harness.make_parser(None, device=None).parse_args(["--json", str(out), "--repeat", "4"])
    with harness.Results(args, script="demo") as res:
        assert res.record("write", 1.25, "GB/s") == 1.25
        res.record("identical", True)
        res.record("rows", 3, show=False)
        res.line("a table row")
    assert capsys.readouterr().out.splitlines() == ["write: 1.25 GB/s", "identical: True", "a table row"]
    written = json.loads(out.read_text())
    assert written["figures"] == [{"name": "write", "value": 1.25, "unit": "GB/s"}, {"name": "identical", "value": True, "unit": ""},
                                  {"name": "rows", "value": 3, "unit": ""}]
    assert written["script"] == "demo" and written["device"] == "cpu" and written["completed"] is True
    assert written["arguments"]["repeat"] == 4 and written["arguments"]["json"] == str(out)
    assert written["lines"][-1] == "a table row"
    assert datetime.fromisoformat(written["started"]).tzinfo is not None


def test_a_failed_run_still_writes_its_figures_and_no_json_writes_nothing(tmp_path):
    out = tmp_path / "figures.json"
    args = harness.make_parser(None, device=None).parse_args(["--json", str(out)])
    with pytest.raises(RuntimeError), harness.Results(args) as res:
        res.record("before", 1.0, show=False)
        raise RuntimeError("cut short")
    written = json.loads(out.read_text())
    assert written["completed"] is False and written["figures"][0]["name"] == "before"
    assert harness.Results(harness.make_parser(None, device=None).parse_args([])).write() is None


def test_scripts_without_a_device_do_not_import_torch(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness\n"
            f"args = harness.make_parser(None, device=None).parse_args(['--json', {str(tmp_path / 'f.json')!r}])\n"
            "with harness.Results(args) as res: res.record('t', harness.time_calls(lambda: None).median, 's')\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
