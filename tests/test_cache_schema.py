"""The store contract: layout, shard flags, completion and version checks."""

import numpy as np
import pytest
import xarray
import zarr

from stegoscope import cache_schema
from stegoscope.cache_schema import StoreError, StoreLayout
from stegoscope.records import StoreAttrs


def small_store(path, n=5, shard=2):
    layout = StoreLayout(n, (2, 3), 4, (16, 24), labelled=True, with_images=False, shard_images=shard)
    return cache_schema.create_feature_store(path, layout, StoreAttrs(key="k" * 64, stage="test"))


def test_shards_flags_and_completion(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    assert store.layout.n_shards == 3 and store.pending_shards() == [0, 1, 2]
    assert store.layout.shard_slice(2) == slice(4, 5)
    rng = np.random.default_rng(0)
    written = {}
    for shard in (2, 0):
        sl = store.layout.shard_slice(shard)
        n = sl.stop - sl.start
        written[shard] = rng.normal(size=(n, 2, 3, 4)).astype(np.float16)
        store.write_shard(shard, {
            cache_schema.TOKENS: written[shard], cache_schema.POOLED: np.zeros((n, 4), np.float32),
            cache_schema.LABELS: np.full((n, 16, 24), 1, np.int16), cache_schema.IDS: np.array([f"i{j}" for j in range(sl.start, sl.stop)]),
        })
    assert store.pending_shards() == [1]
    with pytest.raises(StoreError, match=r"shards \[1\] are not written"):
        store.mark_complete()
    assert store.status == "writing"
    reopened = cache_schema.open_feature_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(reopened[cache_schema.TOKENS][4:5], written[2])
    assert reopened[cache_schema.LABELS][2, 0, 0] == -1  # unwritten rows read as ignore
    ds = xarray.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds.labels.dims == ("image", "pixel_y", "pixel_x") and ds.pooled.dims == ("image", "channel")


def test_foreign_or_other_version_stores_are_refused(tmp_path):
    with pytest.raises(StoreError, match="run `stegoscope extract`"):
        cache_schema.open_feature_store(tmp_path / "absent.zarr")
    small_store(tmp_path / "old.zarr")
    zarr.open_group(str(tmp_path / "old.zarr"), mode="r+").attrs["schema_version"] = 0
    with pytest.raises(StoreError, match="schema version 0.*--force"):
        cache_schema.open_feature_store(tmp_path / "old.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["schema_version"] = cache_schema.SCHEMA_VERSION
    with pytest.raises(StoreError, match="missing"):
        cache_schema.open_feature_store(tmp_path / "other.zarr")


def test_resume_rewrites_an_unflagged_shard_from_nothing(tmp_path):
    """A shard file half written before a crash (zarr < 3.1.3 wrote in place) must not be read
    back: resuming deletes every file of every unflagged shard."""
    layout = StoreLayout(6, (2, 2), 4, (16, 16), False, False, 3)
    store = cache_schema.create_feature_store(tmp_path / "s.zarr", layout, StoreAttrs(key="k" * 64, stage="test"))
    tokens = np.random.default_rng(0).normal(size=(6, 2, 2, 4)).astype(np.float16)

    def shard(i):
        sl = layout.shard_slice(i)
        return {cache_schema.TOKENS: tokens[sl], cache_schema.POOLED: tokens[sl].mean((1, 2)).astype(np.float32),
                cache_schema.IDS: np.array([str(j) for j in range(sl.start, sl.stop)])}

    store.write_shard(0, shard(0))
    half = tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0" / "0"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"\x00\x01half a shard" * 10)
    kept = (tmp_path / "s.zarr" / "tokens" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    resumed = cache_schema.resume_store(tmp_path / "s.zarr", "k" * 64)
    assert resumed.pending_shards() == [1] and not half.exists()
    assert (tmp_path / "s.zarr" / "tokens" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == kept  # flagged: untouched
    resumed.write_shard(1, shard(1))
    resumed.mark_complete()
    np.testing.assert_array_equal(cache_schema.open_feature_store(tmp_path / "s.zarr")[cache_schema.TOKENS][:], tokens)
