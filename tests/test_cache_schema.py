"""The store contract: layout, shard flags, completion and version checks."""

import numpy as np
import pytest
import xarray
import zarr

from stegoscope import cache_schema
from stegoscope.cache_schema import StoreError, StoreLayout


def small_store(path, n=5, shard=2):
    layout = StoreLayout(n, (2, 3), 4, (16, 24), labelled=True, with_images=False, shard_images=shard)
    return cache_schema.create_feature_store(path, layout, {"key": "k" * 64, "spec": {}})


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
