"""A cache on object storage: a real S3 API (moto's standalone server on 127.0.0.1, started
here), reached through s3fs exactly as a lab's bucket would be; nothing is mocked."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, write_directory_dataset, write_micro_preset
from stegoscope import cache_schema, storage
from stegoscope.locks import LeaseLock
from stegoscope.pipeline import Stage, artefact_state, run_stage, write_manifest
from stegoscope.records import Manifest
from stegoscope.storage import Lease, LeaseHeld
from test_reliability import assert_same_store, crash, extract_args, store_of

s3fs = pytest.importorskip("s3fs")
BUCKET = "stegoscope-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for this module; the AWS_* variables point every client (ours, zarr's,
    a subprocess's) at it. Yields the s3fs filesystem."""
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = _free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "STEGOSCOPE_LEASE_SECONDS": "2"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        s3fs.S3FileSystem.clear_instance_cache()


def _download(fs, url: str, to: Path) -> Path:
    fs.get(url.removeprefix("s3://") + "/", str(to) + "/", recursive=True)
    return to


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_study_on_s3_gives_the_local_results_bit_for_bit_and_writes_nothing_local(s3, tmp_path, monkeypatch):
    preset = write_micro_preset(tmp_path / "micro.yaml", train="{res: 32}")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where a URL cache's generated dataset goes
    url, local = f"s3://{BUCKET}/micro", tmp_path / "local"
    for cache in (url, local):
        scheduler = ["--scheduler", "local-cluster"] if cache == url else []  # its tasks read the stores by URL
        assert invoke("study", preset, "--cache", cache, "--no-progress", *scheduler).exit_code == 0
        assert invoke("figures", "--study", "micro", "--cache", cache).exit_code == 0
    assert list(workdir.iterdir()) == []  # never a local folder named after the URL
    remote = _download(s3, url, tmp_path / "remote")
    ours, theirs = _files(remote), _files(local)
    # the same outputs; locks are leases there (gone once released) and flock files here; the
    # dataset generated for a URL cache lives in $XDG_CACHE_HOME
    local_only = {name for name in theirs if name.startswith(("locks/", "datasets/"))}
    assert ours.keys() == theirs.keys() - local_only
    assert any(name.startswith("features/") for name in ours) and any(name.startswith("artefacts/knn/") for name in ours)
    # every array, payload and table byte for byte; what differs says when or where it was made
    made_when = ("manifest.json", "metrics.json", "log.jsonl", "zarr.json", ".pdf", ".png", "inventory.json", "index.html")
    same = [name for name in ours if not name.endswith(made_when) and not name.startswith(("studies/", "memo/"))]
    assert {n for n in same if ours[n] != theirs[n]} == set()
    assert ours["figures/micro/results.csv"] == theirs["figures/micro/results.csv"]
    assert b"Study micro" in ours["reports/micro/index.html"]  # the study's report, written to the bucket
    assert len([n for n in same if n.endswith((".npz", ".pt"))]) >= 4 and len([n for n in same if "/c/" in n]) > 10
    for name in ours:
        if name.endswith("metrics.json"):  # every measured number, without the timings
            a, b = json.loads(ours[name]), json.loads(theirs[name])
            assert _without_times(a) == _without_times(b), name
    for name in ("figures/micro/fig4_miou_vs_dim.png", "figures/micro/fig4_miou_vs_dim.pdf"):
        assert ours[name][:4] in (b"\x89PNG", b"%PDF")
    # gc on S3: an unfinished artefact no study reaches is listed, then deleted; the rest stays
    s3.pipe_file(f"{BUCKET}/micro/artefacts/probe/orphan-000000000000/payload.npz", b"x" * 1000)
    listed = invoke("gc", "--dry-run", "--cache", url)
    assert "orphan-000000000000" in listed.output.replace("\n", "") and "1 stores and artefacts" in listed.output
    assert invoke("gc", "--cache", url).exit_code == 0
    assert not s3.exists(f"{BUCKET}/micro/artefacts/probe/orphan-000000000000/payload.npz")
    assert sorted(s3.find(f"{BUCKET}/micro")) == sorted(f"{BUCKET}/micro/{name}" for name in ours)


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "second" not in k and "time" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


@pytest.mark.parametrize("url, expected", [
    ("nosuchscheme://bucket/cache", "unknown scheme nosuchscheme://"),
    ("s3://no-such-bucket-stegoscope-test/cache", "bucket 'no-such-bucket"),
])
def test_a_bad_cache_url_is_refused_with_the_fix_before_anything_is_written(s3, tmp_path, monkeypatch, url, expected):
    monkeypatch.chdir(tmp_path)
    result = invoke("status", "--preset", "demo", "--cache", url)
    assert result.exit_code == 2 and expected in result.output and "fix:" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_credentials_and_a_missing_backend_package_name_their_fix(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(storage.CacheLocationError, match="AWS_ACCESS_KEY_ID"):
        storage.cache_path(f"s3://{BUCKET}/creds")
    s3fs.S3FileSystem.clear_instance_cache()
    missing = [(scheme, package) for scheme, package in (("gs", "gcsfs"), ("abfs", "adlfs"))
               if __import__("importlib").util.find_spec(package) is None]
    if missing:
        scheme, package = missing[0]
        with pytest.raises(storage.CacheLocationError, match=f"pip install {package}"):
            storage.cache_path(f"{scheme}://bucket/cache")
    assert list(tmp_path.iterdir()) == [tmp_path / "none"] or list(tmp_path.iterdir()) == []


def test_leases_exclude_a_second_holder_are_renewed_and_an_expired_one_is_taken_over(s3, tmp_path):
    path = storage.cache_path(f"s3://{BUCKET}/leases/key.lock")
    first = Lease(path, seconds=1.5)
    first.acquire()
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        Lease(path, seconds=1.5).acquire(wait=False)
    time.sleep(2.5)  # past the first expiry: the renewer kept it alive
    with pytest.raises(LeaseHeld):
        Lease(path, shared=True).acquire(wait=False)
    first._stop.set()  # its holder hangs (or dies) without releasing
    first._renewer.join()
    waits = []
    second = Lease(path, seconds=1.5)
    second.acquire(wait=True, on_wait=waits.append, poll=0.2)  # taken over once expired
    assert len(waits) == 1 and "expires in" in waits[0]
    assert second.mine == "x-00000001" and storage.lease_held(path)
    held = (LeaseLock(path), LeaseLock(path))
    held[0].lease, held[1].lease = first, second
    directory = tmp_path / "artefact"
    directory.mkdir()
    (directory / "payload.npz").write_bytes(b"x")
    manifest = Manifest(key="k", stage="toy", finished=0.0)
    with pytest.raises(storage.LeaseLost, match="took it over"):  # what publishing checks first, with the run's locks
        write_manifest(directory, manifest, held=held)
    assert not (directory / "manifest.json").exists()  # nothing published
    assert first.renew() is False and first.lost  # the hung holder learns it lost its lease
    write_manifest(directory, manifest, held=held[1:])  # the new holder publishes
    assert (directory / "manifest.json").exists()
    first.release()  # and leaves the new holder's lease alone
    assert Lease(path).leases().keys() == {"x-00000001"}
    second.release()
    assert not storage.lease_held(path)
    # readers share; a writer waits for them and they for it
    readers = [Lease(path, shared=True), Lease(path, shared=True)]
    for reader in readers:
        reader.acquire(wait=False)
    with pytest.raises(LeaseHeld, match="read by"):
        Lease(path).acquire(wait=False)
    for reader in readers:
        reader.release()
    writer = Lease(path)
    writer.acquire(wait=False)
    # a backend without a trusted create-only put: said, and a second writer refuses instead of waiting
    unconditional = Lease(path)
    unconditional.conditional = False
    with pytest.warns(UserWarning, match="no conditional"), pytest.raises(LeaseHeld, match="refuses instead of waiting"):
        unconditional.acquire(wait=True)
    writer.release()


def test_a_stage_whose_lease_was_taken_over_while_it_ran_publishes_nothing(s3):
    """The runner hands a stage the locks it took for it; a stage paused past its lease's expiry
    (another run took the key over meanwhile) stops before its manifest."""
    class Paused(Stage):
        name, version = "paused", 1

        def params(self):
            return {}

        @property
        def output(self):
            return cache_schema.artefact_dir(self.cache_root, self.name, "x", self.key)

        def state(self):
            return artefact_state(self.output)

        def execute(self, force):
            (lease,) = [lock.lease for lock in self.held]
            lease._stop.set()  # the run hangs past its lease (2 s here) …
            lease._renewer.join()
            time.sleep(2.2)
            Lease(lease.path).acquire(wait=False)  # … and another run takes the key over
            self.publish(time.time(), {cache_schema.PAYLOAD: {"x": np.zeros(1)}})

    stage = Paused(storage.cache_path(f"s3://{BUCKET}/paused"))
    with pytest.raises(storage.LeaseLost, match="took it over"):
        run_stage(stage)
    assert artefact_state(stage.output) != "complete" and stage.held == ()


def test_two_creators_of_one_generation_one_wins(s3):
    """The conditional PUT itself: of two create-only PUTs of one key, exactly one succeeds."""
    path = storage.cache_path(f"s3://{BUCKET}/leases/race.lock")
    a, b = Lease(path), Lease(path)
    a._since = b._since = time.time()
    assert [a._create("x-00000000"), b._create("x-00000000")] == [True, False]


def _crash(mode, arg, *args, wait=True, lease_seconds=2):
    """``crash`` with this module's S3 settings and a lease lifetime of its own."""
    return crash(mode, arg, *args, wait=wait, env={"STEGOSCOPE_LEASE_SECONDS": str(lease_seconds)})


@pytest.mark.slow
def test_an_extraction_sigkilled_on_s3_resumes_and_two_ranks_write_one_store(s3, tmp_path):
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=7, n_val=1, size=(40, 32)), shard_size=2)
    assert invoke(*args, "--cache", tmp_path / "local").exit_code == 0
    reference = store_of(tmp_path / "local")
    # killed while PUTting shard 2's tokens; the rerun waits out the dead run's lease, then resumes
    url = f"s3://{BUCKET}/killed"
    killed = _crash("kill-at", "tokens/c/2", *args, "--cache", url, lease_seconds=10)
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    (name,) = [p.rsplit("/", 1)[1] for p in s3.ls(f"{BUCKET}/killed/features")]
    flags = cache_schema.open_feature_store(storage.cache_path(f"{url}/features/{name}"), verify=False).group["written"][:]
    assert flags.tolist() == [True, True, False, False]
    started = time.perf_counter()
    again = invoke(*args, "--cache", url)
    assert again.exit_code == 0 and "waiting for" in again.output, again.output
    assert time.perf_counter() - started > 0.5
    assert_same_store(_download(s3, f"{url}/features/{name}", tmp_path / "resumed" / name), reference)
    # two processes, one rank each, write one store on S3
    url = f"s3://{BUCKET}/ranks"
    ranks = [_crash("slow", 0.02, *args, "--rank", rank, "--world", 2, "--cache", url, wait=False) for rank in (0, 1)]
    for proc in ranks:
        proc.wait(timeout=300)
        assert proc.returncode == 0, proc.stdout.read()
    assert_same_store(_download(s3, f"{url}/features/{name}", tmp_path / "ranks" / name), reference)
    assert not any(storage.lease_held(p) for p in storage.cache_path(f"{url}/locks").glob("*.lock"))


def test_a_store_on_s3_reads_back_as_written_through_every_reader(s3, tmp_path):
    """Raw shard reads (ranges of one object), zarr reads and the dask token matrix agree."""
    args = extract_args(write_directory_dataset(tmp_path / "data", n_train=5, n_val=1, size=(40, 32)), shard_size=2)
    url = f"s3://{BUCKET}/readers"
    assert invoke(*args, "--cache", url).exit_code == 0
    (path,) = cache_schema.list_feature_stores(storage.cache_path(url))
    store = cache_schema.open_complete_store(path)
    tokens = store[cache_schema.TOKENS]
    whole = tokens[:]
    np.testing.assert_array_equal(tokens[1:4], whole[1:4])  # across a shard boundary, by ranges
    np.testing.assert_array_equal(tokens.array[1:4], whole[1:4])  # zarr's own reader
    np.testing.assert_array_equal(store.token_matrix().compute(), whole.reshape(-1, whole.shape[-1]))
    assert store.damage() == {}


@pytest.mark.slow
def test_a_stage_sigkilled_on_s3_before_its_manifest_reruns_to_the_local_result(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    preset = write_micro_preset(tmp_path / "micro.yaml")
    url, local = f"s3://{BUCKET}/stage-kill", tmp_path / "local"
    reduce = ["reduce", "--method", "pca", "--preset", preset, "--device", "cpu", "--no-progress"]
    for cache in (url, local):
        assert invoke("extract", "--preset", preset, "--cache", cache, "--workers", 0, "--no-progress").exit_code == 0
    assert invoke(*reduce, "--cache", local).exit_code == 0
    killed = _crash("kill-at", "manifest.json", *reduce, "--cache", url, lease_seconds=10)
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    (fit,) = s3.ls(f"{BUCKET}/stage-kill/artefacts/reduce")
    assert s3.exists(f"{fit}/payload.npz") and not s3.exists(f"{fit}/manifest.json")  # not complete
    again = invoke(*reduce, "--cache", url)
    assert again.exit_code == 0 and "waiting for" in again.output, again.output  # the dead run's lease, until it expired
    (reference,) = (local / "artefacts" / "reduce").iterdir()
    assert s3.cat(f"{fit}/payload.npz") == (reference / "payload.npz").read_bytes()
    assert json.loads(s3.cat(f"{fit}/manifest.json"))["files"] == json.loads((reference / "manifest.json").read_text())["files"]


def test_no_credential_reaches_a_record_a_log_an_output_or_an_error(s3, tmp_path, monkeypatch):
    import s3fs

    secrets = {"AWS_ACCESS_KEY_ID": "AKIASTEGOSCOPEFAKE01", "AWS_SECRET_ACCESS_KEY": "stegoscopeFakeSecret0123456789xyz",
               "AWS_SESSION_TOKEN": "stegoscopeFakeSessionToken42"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    preset = write_micro_preset(tmp_path / "micro.yaml", name="secrets")
    url = f"s3://{BUCKET}/secrets"
    outputs = [invoke("study", preset, "--cache", url, "--no-progress", "--only", "pca", "--set", "eval.crf=none"),
               invoke("status", "--preset", preset, "--cache", url), invoke("status", "--cache", url),
               invoke("figures", "--study", "secrets", "--cache", url),
               invoke("status", "--cache", f"s3://no-such-bucket-{BUCKET}/x")]  # an error about the bucket
    assert [out.exit_code for out in outputs] == [0, 0, 0, 0, 2], [out.output for out in outputs]
    remote = _download(s3, url, tmp_path / "remote")
    texts = [out.output for out in outputs] + [path.read_bytes().decode("latin-1") for path in remote.rglob("*") if path.is_file()]
    assert len(texts) > 30
    for value in secrets.values():
        assert not [text[:200] for text in texts if value in text]
