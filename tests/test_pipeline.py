"""Keys, locks and manifests of the stage contract."""

import hashlib
import subprocess
import sys
import time

import pytest

from stegoscope import cache_schema
from stegoscope.pipeline import (
    COMPLETE,
    PARTIAL,
    FileHashMemo,
    LockHeld,
    artefact_file,
    artefact_state,
    fingerprint_files,
    read_manifest,
    stage_key,
    stage_lock,
    write_manifest,
)
from stegoscope.records import FileEntry, Manifest


def test_key_is_sha256_of_canonical_json():
    params = {"b": 1, "a": [1.5, "x"]}
    expected = hashlib.sha256(
        b'{"inputs":["up"],"params":{"a":[1.5,"x"],"b":1},"stage":"s","stage_version":2}'
    ).hexdigest()
    assert stage_key("s", 2, params, ["up"]) == expected
    assert stage_key("s", 2, {"a": [1.5, "x"], "b": 1}, ["up"]) == expected  # order-free
    assert stage_key("s", 3, params, ["up"]) != expected
    assert stage_key("s", 2, params, ["other"]) != expected


def test_fingerprint_tracks_content_and_memo_is_invalidated(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for name in "abc":
        (root / name).write_bytes(name.encode() * 10)
    memo = FileHashMemo(tmp_path / "memo.json")
    first = fingerprint_files(root, sorted(root.iterdir()), memo)
    assert fingerprint_files(root, sorted(root.iterdir(), reverse=True), FileHashMemo(tmp_path / "memo.json")) == first
    (root / "b").write_bytes(b"B" * 10)  # same size, new content
    assert fingerprint_files(root, sorted(root.iterdir()), memo) != first


def _hold_lock(path, seconds):
    code = (
        "import sys, time; from pathlib import Path; from stegoscope.pipeline import stage_lock\n"
        f"with stage_lock(Path({str(path)!r})):\n    print('held', flush=True); time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_waits_for_holder_and_no_wait_names_it(tmp_path):
    path = cache_schema.lock_path(tmp_path, "k" * 64)
    holder = _hold_lock(path, 1.5)
    with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
        with stage_lock(path, wait=False):
            pass
    waited = []
    start = time.monotonic()
    with stage_lock(path, on_wait=waited.append):
        assert time.monotonic() - start > 0.5 and waited
    holder.wait()
    with stage_lock(cache_schema.lock_path(tmp_path, "other"), wait=False):
        with stage_lock(cache_schema.lock_path(tmp_path, "third"), wait=False):
            pass  # different keys side by side


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = cache_schema.lock_path(tmp_path, "dead")
    holder = _hold_lock(path, 60)
    holder.kill()
    holder.wait()
    with stage_lock(path, wait=False):
        pass


def test_manifest_round_trip_and_damage(tmp_path):
    assert read_manifest(tmp_path) is None and artefact_state(tmp_path) == PARTIAL
    payload = b"\x00payload" * 100
    (tmp_path / "payload.bin").write_bytes(payload)
    write_manifest(tmp_path, Manifest(key="abc", stage="reduce", seconds=1.5))
    expected_files = {"payload.bin": FileEntry(800, hashlib.sha256(payload).hexdigest())}
    assert read_manifest(tmp_path) == Manifest(key="abc", stage="reduce", seconds=1.5, files=expected_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "payload.bin"]  # no temp files left
    assert artefact_state(tmp_path) == COMPLETE

    (tmp_path / "payload.bin").write_bytes(payload[:400])  # truncated
    assert artefact_state(tmp_path) == PARTIAL
    with pytest.raises(cache_schema.StoreError, match=r"400 bytes.*800.*stegoscope reduce"):
        read_manifest(tmp_path)
    (tmp_path / "payload.bin").write_bytes(payload[::-1])  # same size, other content: found when read
    assert artefact_state(tmp_path) == COMPLETE
    with pytest.raises(cache_schema.StoreError, match="sha256.*stegoscope reduce.*--force"):
        artefact_file(tmp_path, "payload.bin")
    (tmp_path / "manifest.json").write_text("{not json")
    assert artefact_state(tmp_path) == PARTIAL
    with pytest.raises(cache_schema.StoreError, match="manifest.json does not parse"):
        read_manifest(tmp_path)


def test_a_damaged_artefact_names_the_command_of_its_stage_even_without_a_manifest(tmp_path):
    directory = cache_schema.artefact_dir(tmp_path, "train_stego", "stego90", "k" * 64)
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(cache_schema.StoreError, match=r"does not parse \(.*\); rerun the `stegoscope train --method stego`"):
        read_manifest(directory)


def test_a_url_cache_never_becomes_a_local_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stegoscope.cli import app

    monkeypatch.chdir(tmp_path)
    url = "nosuchscheme://bucket/c"
    result = CliRunner().invoke(app, ["status", "--preset", "demo", "--cache", url])
    assert result.exit_code != 0 and "unknown scheme" in result.output and url in result.output.replace("\n", "")
    via_env = CliRunner().invoke(app, ["status", "--preset", "demo"], env={"STEGOSCOPE_CACHE": url})
    assert via_env.exit_code != 0 and "unknown scheme" in via_env.output
    for url in ("memory://bucket/c", "memory://bucket/c/"):  # a URL fsspec resolves: used as such (test_object_storage: S3)
        resolved = CliRunner().invoke(app, ["status", "--preset", "demo", "--cache", url])
        assert resolved.exit_code == 0, resolved.output
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder named after a URL
    local = CliRunner().invoke(app, ["status", "--preset", "demo", "--cache", f"file://{tmp_path / 'c'}"])
    assert local.exit_code == 0, local.output
    assert not (tmp_path / "file:").exists()


def test_the_command_that_remakes_each_stage_is_a_command_of_the_cli():
    import importlib
    import pkgutil

    from stegoscope import methods as registry
    from stegoscope import stages
    from stegoscope.cli import app
    from stegoscope.pipeline import Stage

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    names = {f"train-{head}" for head in registry.names(registry.HEAD)}
    for info in pkgutil.iter_modules(stages.__path__):
        module = importlib.import_module(f"stegoscope.stages.{info.name}")
        names |= {c.name for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, Stage) and isinstance(getattr(c, "name", None), str)}
    assert {"extract", "project", "primaps-masks", "hierarchy", "train-stego"} <= names
    for name in names:
        for folder in (name, cache_schema.artefact_dir("/c", name, "x", "k" * 64).parent.name):  # by name or by folder
            command = cache_schema.remake_command(folder).split()
            assert command[0] in commands, (name, command)
            if command[0] == "train":
                assert command[1:] == ["--method", name.removeprefix("train-")]
