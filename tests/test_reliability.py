"""Nothing lost: crashes anywhere, concurrent runs, damaged stores, changed inputs, full disks.

Crashes are real SIGKILLs of a CLI subprocess, injected at chosen durable writes by
``crash_at.py`` (every write of stegoscope and of zarr ends in an ``os.replace``).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import invoke, write_directory_dataset, write_micro_preset
from stegoscope import cache_schema
from stegoscope.pipeline import lock_held
from stegoscope.pipeline import stage_lock as pipeline_lock

CRASH_AT = Path(__file__).with_name("crash_at.py")
MICRO = "random:vit_micro_patch8"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
DATA_ARRAYS = (cache_schema.TOKENS, cache_schema.POOLED, cache_schema.LABELS, cache_schema.IDS, cache_schema.WRITTEN)


def crash(mode, arg, *args, wait=True, env=None):
    """The CLI with ``args`` in a subprocess, its writes faulted by crash_at.py; ``env``: more variables."""
    cmd = [sys.executable, str(CRASH_AT), mode, str(arg), "--", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ENV["PYTHONPATH"], **env} if env else ENV  # now's environment
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.wait(timeout=300)
    return proc


def store_of(cache):
    (path,) = cache.glob("features/*.zarr")
    return path


def files_of(path):
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_store(path, reference):
    """The same files, the same chunk bytes, the same arrays and attrs (but the start time)."""
    files, expected = files_of(path), files_of(reference)
    assert files.keys() == expected.keys()  # no temporaries left, no chunk missing
    for name, file in files.items():
        if not name.endswith(".json"):
            assert file.read_bytes() == expected[name].read_bytes(), name
    a, b = cache_schema.open_feature_store(path), cache_schema.open_feature_store(reference)
    assert a.complete and a.key == b.key
    for name in DATA_ARRAYS:
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert replace(a.attrs, started=None) == replace(b.attrs, started=None)
    assert len(set(a.ids)) == len(a.ids) == len(b.ids)


def extract_args(data, shard_size: int = 3, workers: int = 0) -> list:
    """`extract` of the train split of a directory dataset with the micro ViT, 2 images a batch."""
    return ["extract", "--preset", "directory", "--data-root", data, "--split", "train", "--backbone", MICRO,
            "--n-classes", 3, "--train-res", 32, "--batch-size", 2, "--shard-size", shard_size, "--workers", workers,
            "--device", "cpu", "--no-progress"]


def traced_reference(tmp_path, args) -> tuple[Path, list[str]]:
    """An uninterrupted run's store and the targets of its durable writes, in order."""
    trace = tmp_path / "trace.txt"
    reference = crash("trace", trace, *args, "--cache", tmp_path / "reference")
    assert reference.returncode == 0, reference.stdout.read()
    return store_of(tmp_path / "reference"), trace.read_text().splitlines()


# -- 1. crash anywhere --------------------------------------------------------------------------


@pytest.mark.slow
def test_extract_killed_at_every_kind_of_write_resumes_to_the_uninterrupted_store(tmp_path):
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=7, n_val=1, size=(40, 32)))
    root, traced = traced_reference(tmp_path, args)
    writes = [Path(line).relative_to(root).as_posix() if line.startswith(str(root)) else Path(line).name for line in traced]

    def nth(name, occurrence=0):
        return [i for i, w in enumerate(writes, 1) if w == name][occurrence]

    flag = writes.index("written/c/2") + 1
    points = {
        "before the store exists": nth("file_hashes.json"),
        "store metadata half made": nth("tokens/zarr.json"),
        "before the source list": nth("sources.json"),
        "mid-shard 0, first file": nth("tokens/c/0/0/0/0"),
        "mid-shard 0, labels": nth("labels/c/0/0/0"),
        "shard 0 written, flag not": nth("written/c/0"),
        "between shards 0 and 1": nth("tokens/c/1/0/0/0"),
        "mid-shard 1, ids": nth("ids/c/1"),
        "last shard, before its flag": flag,
        "all flagged, before status": flag + 1,
        "status set, before consolidation": flag + 2,
        "before the inventory": nth("inventory.json"),
    }
    assert len(set(points.values())) == len(points) >= 10
    killed = {label: crash("kill", n, *args, "--cache", tmp_path / f"k{n}", wait=False) for label, n in points.items()}
    for label, proc in killed.items():
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (label, proc.stdout.read())

    for label, n in points.items():
        cache = tmp_path / f"k{n}"
        stores = list(cache.glob("features/*.zarr"))
        before = {}
        if stores:
            assert not (stores[0] / cache_schema.INVENTORY).exists(), label  # not complete
            before = {name: f.stat().st_mtime_ns for name, f in files_of(stores[0]).items() if "/c/" in name}
        rerun = invoke(*args, "--cache", cache)
        assert rerun.exit_code == 0, (label, rerun.output)
        assert "waiting" not in rerun.output  # the dead run's lock is taken over at once
        path = store_of(cache)
        assert_same_store(path, root)
        flagged = [s for s in range(3) if before.get(f"written/c/{s}")]
        for name, mtime in before.items():  # shards finished before the crash are not written again
            if cache_schema.shard_of(name) in flagged:
                assert (path / name).stat().st_mtime_ns == mtime, (label, name)
        if flagged:
            assert f"{len(flagged)} reused" in rerun.output or "cached" in rerun.output, (label, rerun.output)


@pytest.mark.slow
def test_a_power_cut_during_extraction_loses_no_flagged_shard(tmp_path):
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=7, n_val=1, size=(40, 32)), shard_size=2)
    root, writes = traced_reference(tmp_path, args)
    flags = [i for i, w in enumerate(writes, 1) if "/written/c/" in w]
    # cut the power when a flag is written, just after it, mid-shard and before completion
    points = sorted({flags[0], flags[0] + 1, flags[1] + 2, flags[-1] + 1, len(writes) - 1})
    cut = {n: crash("powercut", n, *args, "--cache", tmp_path / f"p{n}", wait=False) for n in points}
    for n, proc in cut.items():
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (n, proc.stdout.read())
    reruns = {}
    for n in points:
        cache = tmp_path / f"p{n}"
        reruns[n] = invoke(*args, "--cache", cache)
        assert reruns[n].exit_code == 0, (n, reruns[n].output)
        assert_same_store(store_of(cache), root)  # no flagged shard came back bad
    assert "0 shards written, 4 reused" in reruns[points[-1]].output  # cut before completion: every shard kept


def _micro_preset(tmp_path) -> Path:
    return write_micro_preset(tmp_path / "micro.yaml")


def _manifests(cache):
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.name in ("manifest.json", "inventory.json")}


@pytest.mark.slow
def test_killed_analysis_stages_leave_no_manifest_and_rerun_only_themselves(tmp_path):
    preset, cache = _micro_preset(tmp_path), tmp_path / "c"
    common = ["--preset", preset, "--cache", cache, "--device", "cpu"]
    assert invoke("extract", *common, "--workers", 0, "--no-progress").exit_code == 0
    commands = {
        "reduce": ["reduce", "--method", "pca", *common, "--no-progress"],
        "knn": ["knn", *common],
        "train_stego": ["train-stego", "--no-crf", *common, "--no-progress"],
        "probe": ["probe", "--reducer", "pca", "--dim", 4, "--no-crf", *common, "--no-progress"],
        "figures": ["figures", "--cache", cache],
    }
    for stage, args in commands.items():
        before = _manifests(cache)
        proc = crash("kill-at", "manifest.json", *args)
        assert proc.returncode == -signal.SIGKILL, (stage, proc.stdout.read())
        out = cache / "figures" / "micro" if stage == "figures" else next((cache / "artefacts" / stage).iterdir())
        assert out.exists() and not (out / "manifest.json").exists(), stage
        assert _manifests(cache) == before  # the crash touched nothing finished

        rerun = invoke(*args)
        assert rerun.exit_code == 0 and "cached" not in rerun.output.replace("knn: cached", ""), (stage, rerun.output)
        after = _manifests(cache)
        assert {p: t for p, t in after.items() if p in before} == before, stage  # only this stage recomputed
        assert set(after) - set(before) == {out / "manifest.json"}, stage
        assert not list(out.rglob("*.partial")), stage


# -- 2. concurrency -----------------------------------------------------------------------------


def _lock_holder(cache, pid, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lock in cache.glob("locks/*.lock"):
            if lock.read_text().startswith(f"pid {pid} "):
                return lock
        time.sleep(0.05)
    raise AssertionError("the first run never took its lock")


def test_same_key_waits_and_reuses_no_wait_names_the_holder_other_keys_run_alongside(tmp_path):
    data = write_directory_dataset(tmp_path / "data", n_train=6, n_val=1)
    cache = tmp_path / "c"
    args = ["extract", "--preset", "directory", "--data-root", data, "--split", "train", "--backbone", MICRO,
            "--n-classes", 3, "--batch-size", 2, "--shard-size", 2, "--workers", 0, "--device", "cpu",
            "--no-progress", "--cache", cache]
    first = crash("slow", 0.25, *args, "--train-res", 32, wait=False)
    _lock_holder(cache, first.pid)

    refused = invoke(*args, "--train-res", 32, "--no-wait")
    assert refused.exit_code == 2 and f"held by pid {first.pid}" in refused.output

    other = invoke(*args, "--train-res", 40)  # another key: no waiting
    assert other.exit_code == 0 and "waiting" not in other.output and "3 shards written" in other.output
    assert first.poll() is None, "the first run ended before the other key finished: not side by side"

    second = invoke(*args, "--train-res", 32)
    assert second.exit_code == 0, second.output
    assert f"waiting for pid {first.pid}" in second.output and "cached, no backbone work" in second.output
    assert first.wait(timeout=120) == 0
    assert len(list(cache.glob("features/*.zarr"))) == 2


def test_killing_the_extractor_frees_its_lock_at_once_though_its_workers_linger(tmp_path):
    args = [*extract_args(write_directory_dataset(tmp_path / "data", n_train=16, n_val=1), shard_size=2, workers=2),
            "--cache", tmp_path / "c"]
    killed = crash("kill-at", "tokens/c/1/", *args)  # while forked DataLoader workers still prefetch
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    rerun = invoke(*args, "--no-wait")  # at once: no worker of the dead run keeps the lock
    assert rerun.exit_code == 0 and "held by" not in rerun.output, rerun.output


def test_a_forced_re_extraction_waits_for_the_stage_reading_the_store(tmp_path):
    preset, cache = _micro_preset(tmp_path), tmp_path / "c"
    common = ["--preset", preset, "--device", "cpu", "--no-progress"]
    assert invoke("extract", *common, "--cache", cache, "--workers", 0).exit_code == 0
    shutil.copytree(cache, tmp_path / "reference")
    clean = invoke("probe", "--no-crf", *common, "--cache", tmp_path / "reference")
    assert clean.exit_code == 0

    reader = crash("slow", 1.0, "probe", "--no-crf", *common, "--cache", cache, wait=False)
    train = store_of_split(cache, "train")
    train_lock = cache_schema.lock_path(cache, cache_schema.open_feature_store(train).key)
    deadline = time.monotonic() + 120
    while not lock_held(train_lock):  # the probe holds its read lock on the train store
        assert time.monotonic() < deadline and reader.poll() is None, reader.stdout.read()
        time.sleep(0.05)
    force = invoke("extract", "--force", "--split", "train", *common, "--cache", cache, "--workers", 0)
    assert force.exit_code == 0 and "waiting for" in force.output, force.output
    assert reader.wait(timeout=120) == 0  # it finished before the rewrite began
    (ours,), (theirs,) = (list((c / "artefacts" / "probe").glob("*/metrics.json")) for c in (cache, tmp_path / "reference"))
    assert json.loads(ours.read_text())["history"] == json.loads(theirs.read_text())["history"]  # never a mixture


def store_of_split(cache, split):
    (path,) = cache.glob(f"features/*-{split}-*.zarr")
    return path


# -- 3. stores that are not what they claim -----------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extracted")
    preset, cache = _micro_preset(tmp), tmp / "c"
    assert invoke("extract", "--preset", preset, "--cache", cache, "--device", "cpu", "--workers", 0, "--no-progress").exit_code == 0
    assert invoke("reduce", "--method", "pca", "--preset", preset, "--cache", cache, "--device", "cpu", "--no-progress").exit_code == 0
    return preset, cache


def _copy(extracted, tmp_path):
    preset, cache = extracted
    shutil.copytree(cache, tmp_path / "c")
    train = next((tmp_path / "c").glob("features/synthetic-train-*.zarr"))
    return preset, tmp_path / "c", train


def _set_attrs(store, **attrs):
    zarr.open_group(str(store), mode="r+").attrs.update(attrs)


@pytest.mark.parametrize("damage, expected", [
    (lambda s: _set_attrs(s, schema_version=0), ["schema version 0", "extract --force --split train"]),
    (lambda s: _set_attrs(s, params={**zarr.open_group(str(s)).attrs["params"], "res": 48}),
     ["tokens are 4×4×96 but the attrs say res 48", "extract --force"]),
    (lambda s: _set_attrs(s, pixels=[48, 48]), ["labels is (32, 32) pixels, the attrs say (48, 48)", "extract --force"]),
    (lambda s: (s / "pooled" / "zarr.json").write_text("{}"), ["pooled/zarr.json truncated", "extract --force"]),
    (lambda s: (s / "ids" / "c" / "1").unlink(), ["ids/c/1 missing", "rewrites only the damaged shards"]),
])
def test_a_damaged_store_is_named_with_its_fix_never_read(extracted, tmp_path, damage, expected):
    preset, cache, train = _copy(extracted, tmp_path)
    damage(train)
    for args in (["reduce", "--method", "rp", "--dim", 4], ["probe", "--no-crf"]):
        result = invoke(*args, "--preset", preset, "--cache", cache, "--device", "cpu", "--no-progress")
        assert result.exit_code == 2, result.output
        for text in expected:
            assert text in result.output, (text, result.output)
    listing = invoke("status", "--cache", cache)
    assert listing.exit_code == 0 and "damaged" in listing.output


def test_a_truncated_chunk_is_named_and_the_rerun_rewrites_only_its_shard(extracted, tmp_path):
    preset, cache, train = _copy(extracted, tmp_path)
    tokens = cache_schema.open_feature_store(train)[cache_schema.TOKENS][:]
    chunk = train / "tokens" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    others = {n: f.stat().st_mtime_ns for n, f in files_of(train).items() if "/c/" in n and cache_schema.shard_of(n) != 1}

    result = invoke("reduce", "--method", "rp", "--dim", 4, "--preset", preset, "--cache", cache, "--device", "cpu")
    assert result.exit_code == 2
    assert "tokens/c/1/0/0/0 truncated or rewritten: 1000 bytes" in result.output and "stegoscope extract" in result.output
    state = invoke("status", "--preset", preset, "--cache", cache)
    assert "partial" in state.output and "truncated" in state.output

    repaired = invoke("extract", "--preset", preset, "--cache", cache, "--device", "cpu", "--workers", 0, "--no-progress")
    assert repaired.exit_code == 0 and "1 shards written, 1 reused" in repaired.output, repaired.output
    store = cache_schema.open_feature_store(train)
    np.testing.assert_array_equal(store[cache_schema.TOKENS][:], tokens)
    assert {n: (train / n).stat().st_mtime_ns for n in others} == others
    assert invoke("reduce", "--method", "rp", "--dim", 4, "--preset", preset, "--cache", cache, "--device", "cpu").exit_code == 0


def test_a_manifest_that_does_not_parse_or_a_changed_payload_is_named_with_its_fix(extracted, tmp_path):
    preset, cache, _ = _copy(extracted, tmp_path)
    (pca,) = (cache / "artefacts" / "reduce").iterdir()
    probe = ["probe", "--reducer", "pca", "--dim", 4, "--no-crf", "--preset", preset, "--cache", cache, "--device", "cpu"]
    (pca / "manifest.json").write_text('{"key": ')
    result = invoke(*probe)
    assert result.exit_code == 2 and "manifest.json does not parse" in result.output and "stegoscope reduce --method pca" in result.output
    figures = invoke("figures", "--cache", cache)
    assert figures.exit_code == 2 and "does not parse" in figures.output

    assert invoke("reduce", "--method", "pca", "--preset", preset, "--cache", cache, "--device", "cpu").exit_code == 0
    payload = pca / cache_schema.PAYLOAD
    payload.write_bytes(payload.read_bytes()[:-100])
    result = invoke(*probe)
    assert result.exit_code == 2 and "payload.npz has" in result.output and "truncated" in result.output


def _flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("split, array", [("train", "tokens"), ("train", "pooled"), ("train", "labels"), ("train", "ids"),
                                          ("train", "written"), ("val", "images")])
def test_a_flipped_byte_in_any_array_is_named_by_verify_and_repaired_by_a_plain_extract(extracted, tmp_path, split, array):
    preset, cache, _ = _copy(extracted, tmp_path)
    store = store_of_split(cache, split)
    before = {name: cache_schema.open_feature_store(store)[name][:]
              for name in DATA_ARRAYS if name in cache_schema.open_feature_store(store)}
    chunk = [p for p in sorted((store / array / "c").rglob("*")) if p.is_file()][-1]  # of the last shard
    shard = cache_schema.shard_of(chunk.relative_to(store).as_posix())
    _flip_a_byte(chunk)
    assert invoke("extract", "--preset", preset, "--cache", cache, "--device", "cpu", "--no-progress").output.count("cached") == 2

    found = invoke("verify", store, "--cache", cache, "--no-progress")
    assert found.exit_code == 1 and f"{array} {shard}" in found.output and "1 of 1 damaged" in found.output, found.output
    refused = invoke("status", "--preset", preset, "--cache", cache)
    assert f"{chunk.relative_to(store).as_posix()} fails its checksum" in refused.output and "partial" in refused.output

    repaired = invoke("extract", "--preset", preset, "--cache", cache, "--device", "cpu", "--workers", 0, "--no-progress")
    assert repaired.exit_code == 0 and f"{split}: " in repaired.output and "1 shards written" in repaired.output, repaired.output
    again = cache_schema.open_feature_store(store)
    for name, value in before.items():
        np.testing.assert_array_equal(again[name][:], value)
    assert invoke("verify", store, "--cache", cache, "--no-progress").exit_code == 0


@pytest.mark.parametrize("array, reader", [("tokens", ["reduce", "--method", "rp", "--dim", 4]), ("pooled", ["knn"]),
                                           ("labels", ["probe", "--no-crf"])])
def test_a_reader_names_a_flipped_byte_once_without_noise_and_the_damage_is_kept(extracted, tmp_path, array, reader):
    preset, cache, train = _copy(extracted, tmp_path)
    _flip_a_byte(next(p for p in sorted((train / array / "c").rglob("*")) if p.is_file()))
    result = invoke(*reader, "--preset", preset, "--cache", cache, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"{train}: {array} shard" in result.output and "rewrites only the damaged shards" in result.output
    assert "Task was destroyed" not in result.output and result.output.count("error:") == 1
    assert "partial" in invoke("status", "--preset", preset, "--cache", cache).output  # recorded for status and extract


# -- 4. inputs that changed ---------------------------------------------------------------------


def directory_preset(tmp_path, data) -> Path:
    """A preset of a directory dataset that only extracts (no method)."""
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        f"name: mine\ndataset: directory\ndata_root: {data}\nbackbone: {MICRO}\nn_classes: 3\nmethods: []\n"
        "extract:\n  batch_size: 4\n  splits:\n    train: {res: 32}\n    val: {res: 32, store_images: true}\n"
    )
    return preset


def test_a_changed_dataset_makes_the_store_stale_and_the_study_re_extracts(tmp_path):
    from PIL import Image

    data = write_directory_dataset(tmp_path / "data", n_train=5, n_val=2)
    preset = directory_preset(tmp_path, data)
    cache = tmp_path / "c"
    assert invoke("study", preset, "--cache", cache, "--device", "cpu").exit_code == 0
    assert invoke("status", "--preset", preset, "--cache", cache).output.count("complete") == 2

    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(data / "imgs" / "train" / "img000.png")  # modified
    for folder in ("imgs", "labels"):
        (data / folder / "train" / "img004.png").unlink()  # removed
        shutil.copy(data / folder / "train" / "img002.png", data / folder / "train" / "new.png")  # added
    status = invoke("status", "--preset", preset, "--cache", cache)
    assert status.exit_code == 0 and "stale" in status.output, status.output
    assert "2 added (imgs/train/new.png, labels/train/new.png)" in status.output
    assert "2 removed" in status.output and "1 modified (imgs/train/img000.png)" in status.output

    again = invoke("study", preset, "--cache", cache, "--device", "cpu")
    assert again.exit_code == 0 and "1 stages run, 1 cached" in again.output, again.output
    assert invoke("status", "--preset", preset, "--cache", cache).output.count("complete") == 2
    assert len(list(cache.glob("features/*-train-*.zarr"))) == 2  # the old store is kept, not overwritten


def test_a_same_size_edit_with_its_mtime_restored_makes_the_split_stale(tmp_path):
    data = write_directory_dataset(tmp_path / "data", n_train=3, n_val=1)
    common = ["--preset", directory_preset(tmp_path, data), "--cache", tmp_path / "c"]
    assert invoke("extract", *common, "--workers", 0, "--device", "cpu", "--no-progress").exit_code == 0
    image = data / "imgs" / "train" / "img000.png"
    before = image.stat()
    content = bytearray(image.read_bytes())
    content[len(content) // 2] ^= 0xFF
    image.write_bytes(bytes(content))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size == before.st_size and image.stat().st_mtime_ns == before.st_mtime_ns
    status = invoke("status", *common)
    assert "stale" in status.output and "1 modified (imgs/train/img000.png)" in status.output, status.output


def test_gc_deletes_only_what_no_study_reaches_and_lists_it_first(tmp_path):
    preset, cache = _micro_preset(tmp_path), tmp_path / "c"
    assert invoke("study", preset, "--cache", cache, "--device", "cpu", "--no-progress").exit_code == 0
    (old_head,) = (cache / "artefacts" / "train_stego").iterdir()
    preset.write_text(preset.read_text().replace("stego: {steps: 6,", "stego: {steps: 5,"))  # the study changes: a new head
    assert invoke("study", preset, "--cache", cache, "--device", "cpu", "--no-progress").exit_code == 0
    key = json.loads((old_head / "manifest.json").read_text())["key"]
    with pipeline_lock(cache_schema.lock_path(cache, key), shared=True):  # a stage reads it: never collected
        assert "0 stores and artefacts" in invoke("gc", "--dry-run", "--cache", cache).output
    unfinished = cache / "artefacts" / "probe" / "pca4-000000000000"
    unfinished.mkdir()
    (unfinished / "metrics.json").write_text("{}")  # a run killed before its manifest

    listed = invoke("gc", "--dry-run", "--cache", cache)
    assert listed.exit_code == 0 and "2 stores and artefacts" in listed.output, listed.output
    assert old_head.name in listed.output and unfinished.name in listed.output and old_head.exists()

    assert "2 stores and artefacts deleted" in invoke("gc", "--cache", cache).output
    assert not old_head.exists() and not unfinished.exists()
    assert "0 stores and artefacts" in invoke("gc", "--dry-run", "--cache", cache).output
    again = invoke("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "0 stages run" in again.output  # everything the study needs was kept
    assert invoke("figures", "--cache", cache).exit_code == 0


# -- 5. disk full -------------------------------------------------------------------------------


def _full_disk_from(monkeypatch, target, attribute, first_failing=""):
    """``target.attribute`` raises ENOSPC from its first call on a path containing ``first_failing``."""
    real, full = getattr(target, attribute), [False]

    def write(*args, **kwargs):
        full[0] = full[0] or first_failing in str(args[0])
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, write)


def test_disk_full_mid_extraction_stops_with_a_message_and_the_rerun_completes(tmp_path, monkeypatch):
    data = write_directory_dataset(tmp_path / "data", n_train=7, n_val=1)
    args = ["extract", "--preset", "directory", "--data-root", data, "--split", "train", "--backbone", MICRO,
            "--n-classes", 3, "--train-res", 32, "--batch-size", 2, "--shard-size", 3, "--workers", 0,
            "--device", "cpu", "--no-progress"]
    assert invoke(*args, "--cache", tmp_path / "reference").exit_code == 0
    with monkeypatch.context() as patch:
        # shard 0 is written, then the disk is full (token shards are written by raw_shards' encoder)
        _full_disk_from(patch, cache_schema, "atomic_write_bytes", "tokens/c/1/")
        full = invoke(*args, "--cache", tmp_path / "c")
    assert full.exit_code == 2
    assert "No space left on device" in full.output and "1 shards already written are kept" in full.output
    assert not cache_schema.open_feature_store(store_of(tmp_path / "c")).complete
    again = invoke(*args, "--cache", tmp_path / "c")
    assert again.exit_code == 0 and "1 reused" in again.output
    assert_same_store(store_of(tmp_path / "c"), store_of(tmp_path / "reference"))


def test_several_writer_threads_and_the_profile_leave_the_store_as_one_thread_writes_it(tmp_path):
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=9, n_val=1), shard_size=2)  # 5 shards
    assert invoke(*args, "--cache", tmp_path / "one", "--writers", 1).exit_code == 0
    several = invoke(*args, "--cache", tmp_path / "four", "--writers", 4, "--workers", 2, "--profile")
    assert several.exit_code == 0, several.output
    assert_same_store(store_of(tmp_path / "four"), store_of(tmp_path / "one"))
    table = several.output[several.output.index("the pipeline's stages"):]
    assert [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")] == [
        "decode", "h2d", "model", "d2h", "encode", "write", "cpu"]
    assert "bound by" in table or "no stage is saturated" in table


def test_disk_full_in_an_artefact_stage_leaves_nothing_complete(extracted, tmp_path, monkeypatch):
    preset, cache, _ = _copy(extracted, tmp_path)
    args = ["reduce", "--method", "rp", "--dim", 4, "--preset", preset, "--cache", cache, "--device", "cpu"]
    invoke("status", "--preset", preset, "--cache", cache)  # file hashes of the copied dataset memoised first
    with monkeypatch.context() as patch:
        _full_disk_from(patch, os, "fsync")
        full = invoke(*args)
    assert full.exit_code == 2 and "No space left on device" in full.output and "rerun the same command" in full.output
    (rp,) = (cache / "artefacts" / "reduce").glob("rp4-*")
    assert sorted(p.name for p in rp.iterdir()) == []  # no manifest, no temporaries
    assert invoke(*args).exit_code == 0 and (rp / "manifest.json").exists()


@pytest.mark.slow
def test_two_ranks_write_the_store_of_one_process_and_a_killed_rank_resumes_alone(tmp_path):
    # batches of 2 within shards of 2: each rank's batches are the single process's, so the bytes agree
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=7, n_val=1, size=(40, 32)), shard_size=2)
    assert invoke(*args, "--cache", tmp_path / "one").exit_code == 0
    reference = store_of(tmp_path / "one")
    # two processes at once, each slowed at every write so that their work interleaves
    ranks = [crash("slow", 0.05, *args, "--rank", rank, "--world", 2, "--cache", tmp_path / "two", wait=False) for rank in (0, 1)]
    for proc in ranks:
        proc.wait(timeout=300)
        assert proc.returncode == 0, proc.stdout.read()
    assert_same_store(store_of(tmp_path / "two"), reference)
    # rank 1 (shards 1 and 3) killed while writing shard 3; rank 0 finishes; rank 1 alone completes the store
    killed = crash("kill-at", "tokens/c/3", *args, "--rank", 1, "--world", 2, "--cache", tmp_path / "three")
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    first = invoke(*args, "--rank", 0, "--world", 2, "--cache", tmp_path / "three")
    assert first.exit_code == 0 and "not written yet" in first.output, first.output
    path = store_of(tmp_path / "three")
    assert not (path / cache_schema.INVENTORY).exists()
    again = invoke(*args, "--rank", 1, "--world", 2, "--cache", tmp_path / "three")
    assert again.exit_code == 0, again.output
    assert_same_store(path, reference)
    assert invoke(*args, "--rank", 0, "--world", 2, "--force", "--cache", tmp_path / "three").exit_code != 0  # each rank would recreate it
