"""The demo's sweep on this machine, grouped against each member alone, in one run.

Runs `stegoscope study demo` once for what the sweep reads (extraction, kNN, PCA / RP fits), then
the sweep's trained stages twice from the same cache: the probes on raw DINO and on PCA / RP at
every D, and the STEGO heads at every D (``--sweep`` adds a λ/b grid), first with ``--group`` then
with ``--no-group`` (their artefacts deleted before each), and prints each run's seconds, the
ratio, and whether every member's metrics came out identical.

    python benchmarks/cpu_sweep.py [--cache /tmp/stegoscope-cpu-sweep] [--sweep stego.lambda_rand=0.3,0.9] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness import Results, make_parser
from stegoscope.records import EvalResult

METHODS = ("dino", "pca", "rp", "stego")
TRAINED = ("artefacts/probe", "artefacts/train_stego")


def study(cache: Path, *args: str) -> float:
    command = [sys.executable, "-m", "stegoscope.cli", "study", "demo", "--cache", str(cache), "--no-progress",
               *(f"--only={m}" for m in METHODS), *args]
    start = time.perf_counter()  # the whole study process, start-up included: timed once
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def trained_metrics(cache: Path) -> dict[str, str]:
    out = {}
    for where in TRAINED:
        for folder in sorted((cache / where).glob("*")):
            metrics = EvalResult.from_dict(json.loads((folder / "metrics.json").read_text()))
            out[folder.name] = json.dumps(replace(metrics, seconds={}).to_dict())  # everything but the timings
    return out


def main() -> None:
    parser = make_parser(__doc__, device=None, warmup=None, repeat=None)  # whole study processes, timed once each
    parser.add_argument("--cache", type=Path, default=Path("/tmp/stegoscope-cpu-sweep"))
    parser.add_argument("--sweep", action="append", default=[], help="a --sweep of the study, e.g. stego.lambda_rand=0.3,0.9")
    args = parser.parse_args()
    with Results(args) as res:
        run(args, res)


def run(args: argparse.Namespace, res: Results) -> None:
    sweeps = [f"--sweep={s}" for s in args.sweep]
    shutil.rmtree(args.cache, ignore_errors=True)
    res.record("upstream (extraction, kNN, fits, and a first pass of the trained stages)", study(args.cache, *sweeps), "s", fmt=".1f")
    seconds, metrics = {}, {}
    for mode in ("--group", "--no-group"):
        for where in TRAINED:
            shutil.rmtree(args.cache / where, ignore_errors=True)
        seconds[mode] = study(args.cache, *sweeps, mode)
        metrics[mode] = trained_metrics(args.cache)
    members = len(metrics["--group"])
    res.line(f"the sweep's {members} trained stages (probes on {', '.join(METHODS[:3])} at every D, STEGO at every D"
             f"{', ' + ', '.join(args.sweep) if args.sweep else ''}), study wall time with its start-up:")
    for mode, s in seconds.items():
        res.record(f"study {mode}", s, "s", show=False)
        res.line(f"  {mode:11s} {s:7.1f} s")
    res.record("grouped / alone", seconds["--group"] / seconds["--no-group"], fmt=".2f")
    res.record("every member's metrics identical", metrics["--group"] == metrics["--no-group"])


if __name__ == "__main__":
    main()
