"""Whole shards of a raw sharded zarr v3 array, encoded and decoded with numpy: the bytes zarr writes.

The token arrays are sharded with one image per inner chunk, stored raw (``bytes`` codec,
little-endian) with a crc32c, and the shard index at the end (``bytes`` + ``crc32c``). zarr's
sharding codec passes every inner chunk through its async codec pipeline, which tops out at about
0.35–0.45 GB/s per process however many threads write or read (`benchmarks/store_throughput.py`;
docs/benchmarks.md), a quarter of the disk. Here a whole shard is one join and one crc32c per
image. The file is byte for byte the one zarr writes (the tests compare them), so zarr, xarray and
every other reader read the store as before; arrays with other codecs keep zarr's path.

A shard file holds, for each inner chunk in row order (the Morton order of an (n, 1, …, 1) chunk
grid), its bytes followed by their crc32c as a little-endian uint32 — chunks whose bytes are all
zero (the fill value) are left out, as zarr does by default — then the index: one (offset,
nbytes) pair of little-endian uint64 per chunk slot, (2**64-1, 2**64-1) for an absent chunk,
followed by its own crc32c.
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np

from .storage import is_remote

ABSENT = 2**64 - 1


class ShardLayout:
    """What the fast path needs to know of a sharded array, or None (:meth:`of`) when it does not apply."""

    def __init__(self, slots: int, chunk_shape: tuple[int, ...], dtype: np.dtype, chunk_crc: bool, rows: int, shard_key):
        self.slots, self.chunk_shape, self.dtype, self.chunk_crc = slots, chunk_shape, np.dtype(dtype), chunk_crc
        self.rows = rows  # of the whole array
        self.shard_key = shard_key  # shard index → the shard file's key in the array's folder

    @classmethod
    def of(cls, array) -> ShardLayout | None:
        """The layout of a zarr array whose shards this module can write and read, else None."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation

        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        raw = lambda cs: (len(cs) >= 1 and isinstance(cs[0], BytesCodec)  # noqa: E731
                          and (cs[0].endian is None or cs[0].endian.value == "little"))  # None: 1-byte types
        inner, index = tuple(sharding.codecs), tuple(sharding.index_codecs)
        crc = len(inner) == 2 and isinstance(inner[1], Crc32cCodec)
        if not (raw(inner) and (len(inner) == 1 or crc) and raw(index) and len(index) == 2 and isinstance(index[1], Crc32cCodec)
                and sharding.index_location == ShardingCodecIndexLocation.end):
            return None
        chunk, shard = tuple(sharding.chunk_shape), tuple(array.metadata.chunk_grid.chunk_shape)
        if chunk[0] != 1 or chunk[1:] != shard[1:] or array.metadata.fill_value != 0 or array.dtype.kind not in "fiu":
            return None
        tail = (0,) * (array.ndim - 1)
        return cls(shard[0], chunk[1:], array.dtype, crc, array.shape[0], lambda i: array.metadata.encode_chunk_key((i, *tail)))

    def encode(self, rows: np.ndarray) -> list | None:
        """The shard file of ``rows`` (at most ``slots`` of them) as buffers to write in order
        (joining them would copy every byte once more), or None when every row is all zeros
        (zarr then writes no file)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype.newbyteorder("<"))
        present = rows.reshape(len(rows), -1).view(np.uint8).any(axis=1)
        if not present.any():
            return None
        size = rows[0].nbytes + 4 * self.chunk_crc
        index = np.full((self.slots, 2), ABSENT, dtype="<u8")
        parts: list = []
        for offset, i in enumerate(np.flatnonzero(present)):
            data = rows[i]  # joined and checksummed through the buffer protocol: no copy
            parts.append(data)
            if self.chunk_crc:
                parts.append(_crc(data))
            index[i] = (offset * size, size)
        return [*parts, index, _crc(index)]

    def decode(self, data: bytes, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """The first ``rows`` rows of a whole shard file's bytes (zeros for absent chunks),
        checking every crc32c; raises ValueError naming the first one that fails."""
        buf = np.frombuffer(data, dtype=np.uint8)  # numpy views: google_crc32c reads them in place
        index = self._index(buf[-self.slots * 16 - 4 :])
        return self._rows(buf, 0, index, 0, rows, len(buf) - self.slots * 16 - 4, out)

    def read(self, path, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``first``..``stop``-1 of a shard file, reading only its index and those rows'
        bytes (they lie together: chunks are written in row order). On object storage that is
        two ranged GETs (the index as a suffix range), without asking for the object's size."""
        if is_remote(path):
            return self._read_ranges(path, first, stop, out)
        with path.open("rb") as fh:
            end = fh.seek(0, 2) - self.slots * 16 - 4
            fh.seek(end)
            index = self._index(np.frombuffer(fh.read(), dtype=np.uint8))
            lo, hi = _span(index[first:stop])
            if hi > end:
                raise ValueError(f"the shard index points past the chunks ({hi} > {end} bytes)")
            fh.seek(lo)
            buf = np.frombuffer(fh.read(hi - lo), dtype=np.uint8)
        return self._rows(buf, lo, index, first, stop, hi, out)

    def _read_ranges(self, path, first: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        tail = self.slots * 16 + 4
        index = self._index(np.frombuffer(path.fs.cat_file(path.path, start=-tail), dtype=np.uint8))
        lo, hi = _span(index[first:stop])
        buf = np.frombuffer(path.fs.cat_file(path.path, start=lo, end=hi) if hi > lo else b"", dtype=np.uint8)
        if len(buf) != hi - lo:
            raise ValueError(f"the shard index points past the chunks ({hi} > {lo + len(buf)} bytes)")
        return self._rows(buf, lo, index, first, stop, hi, out)

    def _index(self, tail: np.ndarray) -> np.ndarray:
        """The (slots, 2) index from the file's last bytes, its crc32c checked."""
        if len(tail) != self.slots * 16 + 4 or _crc(tail[:-4]) != tail[-4:].tobytes():
            raise ValueError("the shard index fails its crc32c")
        return tail[:-4].view("<u8").reshape(self.slots, 2)

    def _rows(self, buf: np.ndarray, base: int, index: np.ndarray, first: int, stop: int, end: int,
              out: np.ndarray | None) -> np.ndarray:
        """Rows first..stop-1 from ``buf``, the file's bytes from offset ``base`` (chunks end by ``end``)."""
        out = np.empty((stop - first, *self.chunk_shape), self.dtype) if out is None else out
        payload = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        for i in range(first, stop):
            offset, size = (int(v) for v in index[i])
            if offset == ABSENT:
                out[i - first] = 0
                continue
            if size != payload + 4 * self.chunk_crc or offset + size > end:
                raise ValueError(f"inner chunk {i} has {size} bytes at {offset}, not a chunk of this array")
            chunk = buf[offset - base : offset - base + payload]
            if self.chunk_crc and _crc(chunk) != buf[offset - base + payload : offset - base + size].tobytes():
                raise ValueError(f"inner chunk {i} fails its crc32c")
            out[i - first] = chunk.view(self.dtype.newbyteorder("<")).reshape(self.chunk_shape)
        return out


def _span(wanted: np.ndarray) -> tuple[int, int]:
    """The byte range [lo, hi) holding the present chunks of ``wanted`` index rows ((0, 0): none)."""
    present = wanted[:, 0] != ABSENT
    if not present.any():
        return 0, 0
    return int(wanted[present, 0].min()), int((wanted[present, 0] + wanted[present, 1]).max())


def _crc(data) -> bytes:
    """crc32c of a numpy array's bytes, as zarr stores it (little-endian uint32)."""
    return struct.pack("<I", google_crc32c.value(data))
