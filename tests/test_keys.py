"""storage.keys: exact key lookups without hash tables agree with Arrow's hash kernels."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage.keys import MAX_WIDTH, KeyIndex, fixed_width


def _expected(values: pa.Array, queries: pa.Array) -> list[int]:
    return pc.fill_null(pc.index_in(queries, value_set=values), -1).to_pylist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookup_matches_index_in_on_mixed_keys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdef0123456789-é")
    values = sorted(
        {"".join(rng.choice(alphabet, rng.integers(0, 14))) for _ in range(3000)}, key=hash
    )
    queries = values[::3] + ["".join(rng.choice(alphabet, 6)) for _ in range(500)] + ["", "zz"]
    va, qa = pa.array(values), pa.array(queries)
    idx = KeyIndex(va)
    assert not idx.duplicates and idx._sorted is not None  # the sorted path, not the fallback
    assert idx.lookup(qa).tolist() == _expected(va, qa)
    # Chunked inputs and prefixes of keys (padding must not make "ab" equal "ab\0...").
    chunked = pa.chunked_array([qa.slice(0, 100), qa.slice(100)])
    assert idx.lookup(chunked).tolist() == _expected(va, qa)
    prefixes = pa.array([v[:-1] for v in values if v])
    assert idx.lookup(prefixes).tolist() == _expected(va, prefixes)


def test_keys_of_one_length_take_the_direct_path() -> None:
    """Face ids are usually all one length: their bytes are taken as the array at once. Same
    lookups as Arrow's, on a slice too (offsets not starting at 0), and the same bytes as the
    general path gives."""
    rng = np.random.default_rng(3)
    values = [f"s{int(k):06d}-{int(j):05d}" for k, j in rng.integers(0, 99999, (4000, 2))]
    values = list(dict.fromkeys(values))
    va = pa.array(values)
    for arr in (va, va.slice(17, 2000)):
        fw = fixed_width(arr)
        assert fw is not None and fw.tolist() == [v.encode() for v in arr.to_pylist()]
        assert fixed_width(arr, 20).tolist() == fw.tolist()  # padded: the general path
        queries = pa.array([*arr.to_pylist()[::7], "s000000-00000", "x" * 13, "s0"])
        assert KeyIndex(arr).lookup(queries).tolist() == _expected(arr, queries)


def test_nulls_long_keys_and_duplicates() -> None:
    va = pa.array(["a", "bb", "ccc", "bb"])
    assert KeyIndex(va).duplicates and not KeyIndex(pa.array(["a", "b"])).duplicates
    qa = pa.array(["bb", None, "x" * (MAX_WIDTH + 5), "a"])
    assert KeyIndex(va).lookup(qa).tolist() == [1, -1, -1, 0]
    long_vals = pa.array(["y" * (MAX_WIDTH + 1), "a"])
    assert fixed_width(long_vals) is None  # the fallback path
    assert KeyIndex(long_vals).lookup(pa.array(["a", "y" * (MAX_WIDTH + 1), "q"])).tolist() == [
        1,
        0,
        -1,
    ]
    assert KeyIndex(pa.array([], pa.string())).lookup(pa.array(["a"])).tolist() == [-1]
    assert KeyIndex(pa.array(["a"])).lookup(pa.array([], pa.string())).tolist() == []
    with_nul = pa.array(["a\x00", "a"])
    assert fixed_width(with_nul) is None
    assert KeyIndex(with_nul).lookup(pa.array(["a", "a\x00"])).tolist() == [1, 0]


def test_queries_that_cannot_match_are_answered_on_the_sorted_path(monkeypatch) -> None:
    """Nulls, queries longer than every key and queries with a NUL byte find nothing, and the
    others in the same batch are still found: the index keeps no copy of the strings for a
    hash lookup, so none may be needed."""
    va = pa.array(["ab", "c", "dd"])
    idx = KeyIndex(va)
    assert idx._sorted is not None and idx._values is None

    def no_hash(q: pa.Array) -> np.ndarray:
        raise AssertionError("hash lookup on the sorted path")

    monkeypatch.setattr(idx, "_hash_lookup", no_hash)
    qa = pa.array(["dd", None, "abc", "a\x00", "c", "x" * (MAX_WIDTH + 3), "ab"])
    assert idx.lookup(qa).tolist() == [2, -1, -1, -1, 1, -1, 0] == _expected(va, qa)
