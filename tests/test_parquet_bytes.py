"""Parquet held in memory is decoded in the calling thread, never through pyarrow's dataset
API on the Python bytes (storage.objectstore.read_parquet_bytes says why: a scanner thread that
released those bytes during interpreter shutdown aborted `faceloop doctor` with SIGABRT)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.objectstore import open_store, read_parquet_bytes

ROOT = Path(__file__).resolve().parent.parent
# The product's rooms (benchmarks read files by path, not bytes, and are left out).
PRODUCT = ("faceloop", "storage", "training", "tasks", "annotate", "evaluation", "flows")


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_read_parquet_bytes_reads_all_or_some_columns():
    t = pa.table({"face_id": ["a", "b", "c"], "identity_id": ["x", None, "y"], "n": [1, 2, 3]})
    data = _parquet(t)
    assert read_parquet_bytes(data).equals(t)
    assert read_parquet_bytes(data, ["n", "face_id"]).to_pydict() == {
        "n": [1, 2, 3],
        "face_id": ["a", "b", "c"],
    }
    with pytest.raises(pa.ArrowInvalid, match="missing"):
        read_parquet_bytes(data, ["missing"])


def test_a_filtered_read_keeps_its_rows(tmp_path):
    """The one dataset-API read (a filter applied while decoding) reads from a copy Arrow owns
    and gives the rows and columns it gave before."""
    store = open_store(str(tmp_path))
    t = pa.table({"sha": ["1", "2", "3", "4"], "kind": ["album", "idcard", "album", "album"]})
    store.write_parquet("t.parquet", t)
    got = store.read_parquet_file(
        "t.parquet",
        columns=["sha", "absent"],
        filter=pc.field("sha").isin(pa.array(["1", "4"])) | (pc.field("kind") == "idcard"),
    )
    assert got.column_names == ["sha"]
    assert got.column("sha").to_pylist() == ["1", "2", "4"]


def _read_table_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "read_table"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "pq"
    ]


def test_no_product_module_reads_parquet_through_pq_read_table():
    """Only storage/objectstore.py's filtered read calls ``pq.read_table``, on Arrow-owned
    memory; every other in-memory Parquet read goes through ``read_parquet_bytes``."""
    found = {
        str(path.relative_to(ROOT)): lines
        for room in PRODUCT
        for path in sorted((ROOT / room).rglob("*.py"))
        if (lines := _read_table_calls(path))
    }
    assert list(found) == ["storage/objectstore.py"], found
    assert len(found["storage/objectstore.py"]) == 1
