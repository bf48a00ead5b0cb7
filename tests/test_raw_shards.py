"""Whole token shards written and read with numpy are zarr's own bytes."""

import numpy as np
import pytest
import zarr

from stegoscope import cache_schema
from stegoscope.cache_schema import IDS, POOLED, TOKENS, StoreError, StoreLayout
from stegoscope.raw_shards import ShardLayout
from stegoscope.records import StoreAttrs


def tokens_with_quirks(n=11, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3, 2, 5)).astype(np.float16)
    x[2] = 0  # an all-fill row: zarr leaves its chunk out
    x[4, 0, 0, 0] = -0.0  # a signed zero elsewhere stays
    x[7] = -0.0  # all negative zeros: not the fill value's bytes, so zarr keeps the chunk
    return x


@pytest.mark.parametrize("checksums", [True, False])
def test_shard_files_are_the_bytes_zarr_writes_and_read_back(tmp_path, checksums):
    x = tokens_with_quirks()
    layout = StoreLayout(len(x), (3, 2), 5, (24, 16), False, False, shard_images=4)  # 3 shards, the last of 3 rows
    ours = cache_schema.create_feature_store(tmp_path / "ours.zarr", layout, StoreAttrs(key="k" * 64, stage="test"), checksums=checksums)
    theirs = cache_schema.create_feature_store(tmp_path / "zarr.zarr", layout, StoreAttrs(key="k" * 64, stage="test"), checksums=checksums)
    assert ours._raw_layout(TOKENS) is not None and ours._raw_layout(IDS) is None
    for s in range(layout.n_shards):
        sl = layout.shard_slice(s)
        ours.write_shard(s, {TOKENS: x[sl], POOLED: x[sl].mean((1, 2), dtype=np.float32)})
        theirs.group[TOKENS][sl] = x[sl]  # zarr's own encoder
    for s in range(layout.n_shards):
        assert ours._shard_path(TOKENS, s).read_bytes() == theirs._shard_path(TOKENS, s).read_bytes()
    back = zarr.open_array(str(tmp_path / "ours.zarr" / TOKENS))[:]  # zarr reads ours ...
    np.testing.assert_array_equal(back.view(np.uint16)[np.arange(11) != 7], x.view(np.uint16)[np.arange(11) != 7])
    for store in (ours, theirs):  # ... and ours reads zarr's: whole shards, several, parts, across shards, the last one
        for selection in (slice(None), slice(4, 8), slice(8, 11), slice(0, 8), slice(1, 3), slice(2, 10), slice(7, 8)):
            assert store.raw_rows(TOKENS, selection) is not None
            np.testing.assert_array_equal(store[TOKENS][selection].view(np.uint16), x[selection].view(np.uint16))
    assert ours.raw_rows(TOKENS, slice(0, 8, 2)) is None and ours.raw_rows(TOKENS, [1, 2]) is None


def test_a_flipped_bit_in_a_raw_shard_is_found_and_named(tmp_path):
    x = tokens_with_quirks()
    layout = StoreLayout(len(x), (3, 2), 5, (24, 16), False, False, shard_images=4)
    store = cache_schema.create_feature_store(tmp_path / "s.zarr", layout, StoreAttrs(key="k" * 64, stage="test"))
    for s in range(layout.n_shards):
        sl = layout.shard_slice(s)
        store.write_shard(s, {TOKENS: x[sl], POOLED: x[sl].mean((1, 2), dtype=np.float32),
                              IDS: np.array([str(i) for i in range(sl.start, sl.stop)])})
    store.mark_complete()
    path = store._shard_path(TOKENS, 1)
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    store = cache_schema.open_feature_store(tmp_path / "s.zarr", verify=False)
    with pytest.raises(StoreError, match=r"tokens shard \[1\]"):
        store[TOKENS][4:8]
    with pytest.raises(ValueError, match="inner chunk 0 fails its crc32c"):
        ShardLayout.of(store.group[TOKENS]).decode(bytes(data), 4)
    np.testing.assert_array_equal(
        ShardLayout.of(store.group[TOKENS]).decode(b"".join(ShardLayout.of(store.group[TOKENS]).encode(x[:4])), 4), x[:4])
