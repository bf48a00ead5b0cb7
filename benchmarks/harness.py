"""The benchmarks' shared harness: one command line, one device, one clock, one record.

`make_parser` gives a script its options (its docstring as help; ``--device``, ``--warmup``,
``--repeat``, ``--json``); `time_calls` times a callable after warm-up calls, CUDA synchronised
around each timed call; `Results` prints each figure and, with ``--json PATH``, writes them all
there with the script's name, arguments, device and start time. torch is imported only when a
device is resolved, named or synchronised: scripts that never touch it do not import it here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    Device = torch.device | str | None  # a resolved device, its name, or none (the CPU)

Value = float | int | bool | str | None


def _device_option(text: str) -> str:
    """auto, cpu, cuda, or cuda:N (a machine with several GPUs)."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")


def make_parser(doc: str | None, *, device: str | None = "auto", warmup: int | None = 1, repeat: int | None = 3,
                aliases: Mapping[str, Sequence[str]] | None = None) -> argparse.ArgumentParser:
    """The parser of a benchmark with the common options; ``None`` leaves an option out (a script
    that needs no device, or times whole runs where a warm-up makes no sense). ``aliases`` adds
    spellings a script had before the harness, e.g. ``{"repeat": ["--repeats"]}``, so that its
    command lines stay valid."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = lambda name: [f"--{name}", *(aliases or {}).get(name, ())]  # noqa: E731
    if device is not None:
        parser.add_argument(*flags("device"), dest="device", default=device, type=_device_option, metavar="{auto,cpu,cuda}",
                            help=f"where to run (auto: cuda when available; default {device})")
    if warmup is not None:
        parser.add_argument(*flags("warmup"), dest="warmup", type=int, default=warmup, metavar="N", help=f"untimed calls first ({warmup})")
    if repeat is not None:
        parser.add_argument(*flags("repeat"), dest="repeat", type=int, default=repeat, metavar="N", help=f"timed calls each ({repeat})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure printed to PATH as JSON")
    return parser


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA where there is none stops."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def _is_cuda(device: Device) -> bool:
    return device is not None and str(device).startswith("cuda")


def device_name(device: Device) -> str:
    """The GPU's name, or the CPU with its core count."""
    if _is_cuda(device):
        import torch

        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call, and the last call's return value (for checking what was timed)."""

    seconds: tuple[float, ...]
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, device: Device = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times, each timed alone. On CUDA the
    device is synchronised before each call (earlier queued work is not this call's) and after it
    (kernels run asynchronously: without it only their launch would be timed)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    cuda = _is_cuda(device)
    if cuda:
        import torch
    for _ in range(warmup):
        fn()
    seconds, result = [], None
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds), result)


@dataclass(frozen=True)
class Figure:
    name: str
    value: Value
    unit: str = ""


class Results:
    """The figures of one run. `record` keeps a figure and prints it as one line (``show=False``
    when the script prints it within a line of its own through `line`); on leaving a ``with``
    block, or by `write`, they go to ``args.json`` when given, with the lines printed."""

    def __init__(self, args: argparse.Namespace, device: Device = None, script: str | None = None) -> None:
        self.args = args
        # the script's --device resolved once here, so that the record names what actually ran
        self.device = device if device is not None else resolve_device(args.device) if getattr(args, "device", None) else "cpu"
        self.script = script or Path(sys.argv[0]).stem
        self.started = datetime.now(timezone.utc)
        self.figures: list[Figure] = []
        self.lines: list[str] = []

    def record(self, name: str, value: Value, unit: str = "", *, fmt: str = "", show: bool = True) -> Value:
        """Keep one figure (numpy and 0-d torch scalars as Python numbers); print ``name: value unit``."""
        if hasattr(value, "item"):
            value = value.item()
        self.figures.append(Figure(name, value, unit))
        if show:
            shown = format(value, fmt) if fmt else f"{value:.4g}" if isinstance(value, float) else str(value)
            self.line(f"{name}: {shown}" + (f" {unit}" if unit else ""))
        return value

    def line(self, text: str = "") -> None:
        """Print a line of the report (flushed: a run cut short by a timeout still shows it)."""
        self.lines.append(text)
        print(text, flush=True)

    def write(self, completed: bool = True) -> Path | None:
        """Write the run's record to ``--json``'s path, if one was given."""
        path = getattr(self.args, "json", None)
        if path is None:
            return None
        record = {"script": self.script, "argv": sys.argv[1:], "arguments": vars(self.args), "device": str(self.device),
                  "device_name": device_name(self.device), "started": self.started.isoformat(timespec="seconds"),
                  "completed": completed, "figures": [asdict(f) for f in self.figures], "lines": self.lines}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
        return path

    def __enter__(self) -> Results:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.write(completed=kind is None)  # a failed run still leaves the figures it got to
