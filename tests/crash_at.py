"""Run the stegoscope CLI with a fault injected at a durable write, for the reliability tests.

    python crash_at.py MODE ARG -- <stegoscope arguments>

Every durable write of stegoscope and of zarr's LocalStore ends in ``os.replace`` of a fully
written temporary file. MODE decides what happens at those renames:

- ``trace FILE``: run normally, appending each rename's target to FILE (one per line);
- ``kill N``: SIGKILL this process just before the N-th rename (its temporary stays behind,
  as after a crash in the middle of writing that file);
- ``kill-at SUBSTRING``: SIGKILL before the first rename whose target contains SUBSTRING;
- ``slow SECONDS``: sleep before every rename (keeps a run's lock held for a while).
"""

import os
import signal
import sys
import time


def main() -> None:
    mode, arg, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    real_replace = os.replace
    count = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal count
        count += 1
        target = os.fspath(dst)
        if mode == "trace":
            with open(arg, "a") as log:
                log.write(target + "\n")
        elif (mode == "kill" and count == int(arg)) or (mode == "kill-at" and arg in target):
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "slow":
            time.sleep(float(arg))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    from stegoscope.cli import app

    app(cli_args, prog_name="stegoscope")


if __name__ == "__main__":
    main()
