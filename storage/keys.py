"""Exact lookups of string keys (face ids) without hash tables.

Publishing a version compares the dataset's keys with its parent's: at 10^6 faces Arrow's hash
kernels (``index_in``, ``is_in``, ``count_distinct``) held 150-210 MB of memo tables for 20-byte
face ids, more than the keys themselves. :class:`KeyIndex` sorts the keys as one numpy
fixed-width bytes array instead (about ``n x (width + 8)`` bytes: 28 MB for 10^6 face ids) and
answers lookups with a binary search. Keys that do not fit that form (a null, a NUL byte, longer
than :data:`MAX_WIDTH` bytes) fall back to Arrow's hash kernels, with the same results.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_WIDTH = 64


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values.cast(pa.string()) if values.type != pa.string() else values


def fixed_width(values: pa.Array | pa.ChunkedArray, width: int | None = None) -> np.ndarray | None:
    """The strings as a numpy ``S<width>`` array (NUL-padded; width: the longest, or
    ``width``), or None when a value is null, holds a NUL byte or is longer than
    :data:`MAX_WIDTH` (or ``width``) bytes. Comparisons and sorting of the result are those of
    the strings' bytes."""
    a = _array(values)
    n = len(a)
    if a.null_count:
        return None
    if n == 0:
        return np.zeros(0, f"S{max(width or 1, 1)}")
    offs = np.frombuffer(a.buffers()[1], np.int32)[a.offset : a.offset + n + 1].astype(np.int64)
    buf = a.buffers()[2]
    data = np.frombuffer(buf, np.uint8) if buf is not None else np.zeros(0, np.uint8)
    lens = np.diff(offs)
    longest = int(lens.max())
    w = max(width if width is not None else longest, 1)
    if longest > w or w > MAX_WIDTH:
        return None
    body = data[offs[0] : offs[-1]]
    if len(body) and not body.all():  # a NUL byte would compare equal to padding
        return None
    if int(lens.min()) == w:
        # Every key is w bytes long (face ids usually are): the bytes are the array already.
        return body.reshape(n, w).copy().view(f"S{w}").ravel()
    out = np.zeros((n, w), np.uint8)
    starts = offs[:-1]
    for j in range(longest):  # one column of bytes at a time: O(n) scratch
        rows = np.flatnonzero(lens > j)
        out[rows, j] = data[starts[rows] + j]
    return out.view(f"S{w}").ravel()


class KeyIndex:
    """The positions of string keys in ``values``: ``lookup(queries)`` gives, per query, its
    index in ``values`` or -1. ``duplicates`` says whether ``values`` holds a key twice."""

    def __init__(self, values: pa.Array | pa.ChunkedArray) -> None:
        arr = _array(values)
        fw = fixed_width(arr)
        # None: the keys do not fit a fixed width; lookups use Arrow's hash kernel over the
        # strings, which are kept only then (the sorted bytes are all a lookup needs).
        self._sorted: np.ndarray | None = None
        self._values: pa.Array | None = None
        if fw is None:
            self._values = arr
            self.duplicates = pc.count_distinct(arr).as_py() != len(arr)
            return
        del arr
        self._order = np.argsort(fw, kind="stable")
        self._sorted = fw[self._order]
        del fw
        self.duplicates = bool(
            len(self._sorted) > 1 and (self._sorted[1:] == self._sorted[:-1]).any()
        )

    def lookup(self, queries: pa.Array | pa.ChunkedArray) -> np.ndarray:
        q_arr = _array(queries)
        if self._sorted is None:
            return self._hash_lookup(q_arr)
        width = self._sorted.dtype.itemsize
        out = np.full(len(q_arr), -1, np.int64)
        # Usually every query fits the index's width (face ids of one length): no filter.
        q_all = fixed_width(q_arr, width)
        if q_all is not None:
            self._search(q_all, out, None)
            return out
        # Only queries that fit the index's width can equal a key (keys hold no NUL byte and
        # none is longer); nulls, longer queries and queries with a NUL byte find nothing.
        fits = pc.and_(
            pc.less_equal(pc.binary_length(q_arr), width),
            pc.invert(pc.match_substring(q_arr, "\x00")),
        )
        fits_np = np.asarray(pc.fill_null(fits, False).to_numpy(zero_copy_only=False), bool)
        valid = None if fits_np.all() else np.flatnonzero(fits_np)
        q = fixed_width(q_arr if valid is None else q_arr.take(pa.array(valid)), width)
        if q is None:  # cannot happen after the filter above; never answer wrongly
            raise AssertionError("KeyIndex: a filtered query does not fit the index width")
        self._search(q, out, valid)
        return out

    def _search(self, q: np.ndarray, out: np.ndarray, valid: np.ndarray | None) -> None:
        """Set ``out`` at the queries ``q`` found (``valid``: their positions in ``out``;
        None: all of them, in order) to their keys' positions."""
        assert self._sorted is not None
        if len(self._sorted) and len(q):
            i = np.searchsorted(self._sorted, q)
            i[i == len(self._sorted)] = 0
            hit = self._sorted[i] == q
            out[np.flatnonzero(hit) if valid is None else valid[hit]] = self._order[i[hit]]

    def _hash_lookup(self, q_arr: pa.Array) -> np.ndarray:
        assert self._values is not None
        pos = pc.index_in(q_arr, value_set=self._values)
        return np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), np.int64)
