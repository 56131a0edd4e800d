"""``faceloop datasets list|show|verify|gc`` on stores built with storage.versions.DatasetWriter,
local and on the real S3 server (SeaweedFS fixture)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from faceloop.cli import main
from storage.objectstore import ObjectStore, open_store
from storage.versions import DatasetWriter, list_versions

NAME = "people"


def _rows(assign: dict[str, str]) -> pa.Table:
    ids = sorted(assign)
    return pa.table(
        {
            "face_id": ids,
            "identity_id": [assign[f] for f in ids],
            "image": [f"jpeg-{f}".encode() for f in ids],
            "quality": pa.array([0.9] * len(ids), pa.float32()),
            "source_kind": ["album"] * len(ids),
        }
    )


def _write(store: ObjectStore, assign: dict[str, str], shard_rows: int = 2) -> dict:
    with DatasetWriter(
        store, NAME, shard_rows, {"run_id": "r1"}, identities=sorted(set(assign.values()))
    ) as w:
        w.write(_rows(assign))
    assert w.manifest is not None
    return w.manifest


def build_store(store: ObjectStore) -> None:
    """v1: 5 faces / 2 identities; v2: one face relabelled, one added (3 identities);
    then a writer that could not remove its version (the store unreachable as it stopped)
    leaves a half-written v3 marked aborted."""
    v1 = {"f1": "A", "f2": "A", "f3": "A", "f4": "B", "f5": "B"}
    _write(store, v1)
    v2 = {**v1, "f3": "C", "f6": "C"}
    _write(store, v2)
    w = DatasetWriter(store, NAME, 2, identities=["A"]).__enter__()
    w.write(_rows({"f1": "A", "f2": "A"}))  # one shard lands, then the writer stops
    w._write_marker("aborted")  # what DatasetWriter._abort falls back to
    assert w._spool is not None
    w._spool.cleanup()
    assert list_versions(store, NAME) == [1, 2]
    assert store.list(f"datasets/{NAME}/v3"), "the half-written v3 exists"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_cli(store: ObjectStore, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole command set against a store built by :func:`build_store`."""
    s = ["--store", store.root, "--name", NAME]

    code, out, _ = run(capsys, "datasets", "list", *s)
    assert code == 0
    lines = [ln for ln in out.splitlines() if re.match(r"^[* ] v\d+ ", ln)]
    assert len(lines) == 2, out
    assert lines[0].startswith("  v1 ")
    assert lines[1].startswith("* v2 ")  # latest is marked
    v1_cols, v2_cols = lines[0].split(), lines[1].split()[1:]
    assert v1_cols[2:6] == ["5", "2", "-", "3"]  # rows, classes, parent, shards
    assert v2_cols[2:6] == ["6", "3", "v1", "3"]
    assert v2_cols[6] == "+1" and v2_cols[7] == "-0" and v2_cols[8] == "~1"
    assert "1 half-written version directory" in out

    code, out, _ = run(capsys, "datasets", "list", *s, "--json")
    rows = json.loads(out)
    assert [(r["version"], r["rows"], r["classes"], r["parent"], r["latest"]) for r in rows] == [
        (1, 5, 2, None, False),
        (2, 6, 3, 1, True),
    ]

    code, out, _ = run(capsys, "datasets", "show", *s)
    assert code == 0
    body = out[out.index("{") : out.rindex("}") + 1]
    manifest = json.loads(body)
    assert manifest["version"] == 2 and manifest["parent"] == 1 and manifest["num_rows"] == 6
    assert "classes: 3 (6 faces; faces per class min 2, median 2, max 2)" in out
    assert "changes vs v1: 1 added, 0 removed, 1 relabelled" in out

    code, out, _ = run(capsys, "datasets", "show", *s, "v1", "--json")
    shown = json.loads(out)
    assert shown["manifest"]["version"] == 1
    assert shown["classes"]["classes"] == 2 and shown["classes"]["faces_per_class"]["max"] == 3
    assert shown["changes"]["added"] == 5 and shown["changes"]["parent"] is None

    code, _, err = run(capsys, "datasets", "show", *s, "7")
    assert code == 1 and "no committed version 7" in err
    code, _, err = run(capsys, "datasets", "show", *s, "3")  # half-written: does not exist
    assert code == 1

    code, out, _ = run(capsys, "datasets", "verify", *s, "--all")
    assert code == 0, out
    assert "v1: ok (3 shards, 5 rows, 2 classes)" in out and "v2: ok" in out

    # Tamper with one shard only v1 lists (shards live in the shared pool): same size,
    # different bytes.
    from storage.versions import load_manifest

    v1_files = [sh.file for sh in load_manifest(store, NAME, 1).shards]
    v2_files = [sh.file for sh in load_manifest(store, NAME, 2).shards]
    only_v1 = [f for f in v1_files if f not in v2_files]
    rel = f"datasets/{NAME}/{only_v1[0]}"
    data = bytearray(store.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(rel, bytes(data))
    code, out, _ = run(capsys, "datasets", "verify", *s, "1")
    assert code == 1
    assert "v1: FAILED" in out and f"{only_v1[0]}: sha256 mismatch" in out
    code, out, _ = run(capsys, "datasets", "verify", *s)  # latest (v2) is intact
    assert code == 0 and "v2: ok" in out
    code, out, _ = run(capsys, "datasets", "verify", *s, "--all")
    assert code == 1 and "v1: FAILED" in out and "v2: ok" in out
    # A missing shard is a problem too.
    only_v2 = [f for f in v2_files if f not in v1_files]
    store.delete(f"datasets/{NAME}/{only_v2[0]}")
    code, out, _ = run(capsys, "datasets", "verify", *s, "v2")
    assert code == 1 and f"{only_v2[0]}: missing" in out
    assert "manifest says" not in out  # its rows are unknown, not a manifest at fault

    v3 = f"{store.root}/datasets/{NAME}/v3"
    code, out, _ = run(capsys, "datasets", "gc", *s, "--dry-run")
    assert code == 0 and f"would remove {v3}" in out
    assert store.list(f"datasets/{NAME}/v3"), "dry run removes nothing"
    code, out, _ = run(capsys, "datasets", "gc", *s)
    assert code == 0 and f"removed {v3}" in out
    assert store.list(f"datasets/{NAME}/v3") == []
    assert list_versions(store, NAME) == [1, 2], "committed versions untouched"
    code, out, _ = run(capsys, "datasets", "gc", *s)
    assert code == 0 and out.startswith("removed: 0 half-written version directories, 0 shards")
    code, out, _ = run(capsys, "datasets", "list", *s)
    assert "half-written" not in out


def test_datasets_cli_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(str(tmp_path / "store"))
    build_store(store)
    check_cli(store, capsys)


def test_datasets_cli_s3(s3_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(s3_root)
    build_store(store)
    check_cli(store, capsys)


def test_defaults_come_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(str(tmp_path / "store"))
    _write(store, {"f1": "A", "f2": "B"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"store": str(tmp_path / "store"), "dataset": {"name": NAME}}))
    code, out, _ = run(capsys, "datasets", "list", "--config", str(cfg))
    assert code == 0 and f"dataset '{NAME}' in {store.root}" in out and "* " in out
    # The default dataset name ("faces") is not in this store: an error naming the ones that are.
    code, out, err = run(capsys, "datasets", "list", "--store", store.root)
    assert code == 1 and not out and "no dataset 'faces'" in err and f"'{NAME}'" in err
    code, out, err = run(capsys, "datasets", "list", "--store", store.root, "--json")
    assert code == 1 and not out and "no dataset 'faces'" in err
    code, _, err = run(capsys, "datasets", "verify", "--store", store.root)
    assert code == 1 and "no version yet" in err
    code, _, err = run(
        capsys, "datasets", "list", "--store", str(tmp_path / "nope"), "--name", NAME
    )
    assert code == 1 and "no store at" in err
    code, _, _ = run(capsys, "datasets", "verify", "--config", str(cfg))
    assert code == 0


def test_a_damaged_manifest_is_reported_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One manifest.json cut short stopped `datasets list`, `verify --all` and `gc` with a bare
    JSONDecodeError. Now: list marks it, verify fails that version and checks the others, gc
    does nothing (what the version lists is unknown) and says why."""
    store = open_store(str(tmp_path / "store"))
    build_store(store)
    s = ["--store", store.root, "--name", NAME]
    rel = f"datasets/{NAME}/v1/manifest.json"
    store.write_bytes(rel, store.read_bytes(rel)[:40])
    code, out, err = run(capsys, "datasets", "list", *s)
    assert code == 0 and "v1       manifest.json unreadable" in out and "* v2 " in out
    assert "v1: " in err and "remove its folder" in err
    code, out, _ = run(capsys, "datasets", "verify", *s, "--all")
    assert code == 1 and "v1: FAILED" in out and "manifest.json" in out and "v2: ok" in out
    code, out, _ = run(capsys, "datasets", "verify", *s, "v1")
    assert code == 1 and "v1: FAILED" in out
    code, out, err = run(capsys, "datasets", "gc", *s)
    assert code == 1 and "gc did nothing" in err
    assert store.list(f"datasets/{NAME}/v3"), "nothing removed"


def test_a_gc_dry_run_counts_the_shards_retention_frees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dry run counted the shards no version lists before retention's removals, so it
    said 0 where the real gc then removed the shards only the retired versions listed."""
    store = open_store(str(tmp_path / "store"))
    build_store(store)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": store.root,
                "dataset": {"name": NAME},
                "retention": {"superseded_versions_keep": 0, "superseded_versions_days": 1e-9},
            }
        )
    )
    code, dry, _ = run(capsys, "datasets", "gc", "--config", str(cfg), "--dry-run")
    assert code == 0
    code, real, _ = run(capsys, "datasets", "gc", "--config", str(cfg))
    assert code == 0
    would = dry.strip().splitlines()[-1].removeprefix("would remove: ")
    did = real.strip().splitlines()[-1].removeprefix("removed: ")
    assert would == did and not did.endswith(" 0 shards no version lists"), (dry, real)


def test_a_shard_deleted_by_hand_is_named_as_damage_by_the_reader(tmp_path: Path) -> None:
    """The reader said a missing shard's version "was removed while this job read it" when
    the version was still committed (the file was deleted by hand)."""
    from faceloop.errors import StorageError
    from storage.dataset import fetch_shard_bytes, load_version

    store = open_store(str(tmp_path / "store"))
    build_store(store)
    version = load_version(store.root, NAME, "LATEST")
    shard = version.shards[0]
    store.delete(version.shard_path(shard))
    with pytest.raises(StorageError, match="still committed") as err:
        fetch_shard_bytes(version, shard)
    assert f"datasets verify 2 --name {NAME}" in str(err.value)
