"""Run the stegoscope CLI with a fault injected at a durable write, for the reliability tests.

    python crash_at.py MODE ARG -- <stegoscope arguments>

Every durable write of stegoscope and of zarr's LocalStore ends in ``os.replace`` of a fully
written temporary file; on S3 every write is one PUT (s3fs's ``_pipe_file``). MODE decides
what happens at those renames and PUTs (``powercut``: renames only):

- ``trace FILE``: run normally, appending each rename's target to FILE (one per line);
- ``kill N``: SIGKILL this process just before the N-th rename (its temporary stays behind,
  as after a crash in the middle of writing that file);
- ``kill-at SUBSTRING``: SIGKILL before the first rename whose target contains SUBSTRING;
- ``slow SECONDS``: sleep before every rename (keeps a run's lock held for a while);
- ``powercut N``: as ``kill N``, but first do the worst a power cut can do to a store: of the
  files whose data, or the folder entry naming it, was not flushed (``fsync``) since their last
  write, keep the shard flags (``written/c/…``) and lose every other one: back to its last
  flushed content, or away if it had none.
"""

import os
import signal
import sys
import time


def main() -> None:
    mode, arg, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    real_replace, real_fsync = os.replace, os.fsync
    count = 0
    volatile: dict[str, tuple[int, bool, bool]] = {}  # path → (inode, data flushed, entry flushed)
    flushed_inodes: set[int] = set()
    durable_content: dict[str, bytes] = {}  # what a volatile file held when last flushed

    def durable(name):
        return name not in volatile or all(volatile[name][1:])

    def fsync(fd):
        real_fsync(fd)
        path, inode = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino
        flushed_inodes.add(inode)
        for name, (ino, data, entry) in list(volatile.items()):
            if ino == inode or os.path.dirname(name) == path:
                volatile[name] = (ino, data or ino == inode, entry or os.path.dirname(name) == path)

    def power_cut():
        for name in [n for n in volatile if not durable(n) and "/written/c/" not in n]:
            if name in durable_content:
                with open(name, "wb") as fh:
                    fh.write(durable_content[name])
            else:
                os.unlink(name)

    def before_write(target: str) -> None:
        nonlocal count
        count += 1
        if mode == "trace":
            with open(arg, "a") as log:
                log.write(target + "\n")
        elif (mode == "kill" and count == int(arg)) or (mode == "kill-at" and arg in target):
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "slow":
            time.sleep(float(arg))

    def replace(src, dst, *args, **kwargs):
        nonlocal count
        target = os.fspath(dst)
        if mode != "powercut":
            before_write(target)
        else:
            count += 1
            if count == int(arg):
                power_cut()
                os.kill(os.getpid(), signal.SIGKILL)
            target = os.path.realpath(target)
            if os.path.exists(target) and durable(target):
                with open(target, "rb") as fh:
                    durable_content[target] = fh.read()
            inode = os.stat(src).st_ino
            real_replace(src, dst, *args, **kwargs)
            volatile[target] = (inode, inode in flushed_inodes, False)
            return None
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    os.fsync = fsync
    try:  # on S3 every write (ours and zarr's) is one PUT: s3fs's _pipe_file
        import s3fs
    except ImportError:
        s3fs = None
    if s3fs is not None:
        real_pipe = s3fs.S3FileSystem._pipe_file

        async def pipe_file(self, path, data, *args, **kwargs):
            before_write(path)
            return await real_pipe(self, path, data, *args, **kwargs)

        s3fs.S3FileSystem._pipe_file = pipe_file
    from stegoscope.cli import app

    app(cli_args, prog_name="stegoscope")


if __name__ == "__main__":
    main()
