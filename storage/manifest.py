"""A dataset version's manifest and which version ``latest`` means.

The manifest (``datasets/<name>/v<N>/manifest.json``, format ``faceloop.dataset/1``) is written
last by :class:`storage.versions.DatasetWriter` and is the version's commit marker: a version
exists iff its manifest does. :class:`Manifest` is the one model of it: the writer builds one and
writes :meth:`Manifest.to_json`; every reader (:mod:`storage.versions`,
:mod:`storage.dataset`) parses it with :meth:`Manifest.from_json`.

On-disk keys, in the order the writer writes them: ``run_id``, ``config_hash``, ``models``, any
other metadata the publisher passed, ``format``, ``name``, ``version``, ``created``, ``parent``,
``num_rows``, ``num_classes``, ``shards`` (``file``, ``rows``, ``bytes``, ``sha256``),
``classes`` (``file``, ``sha256``, ``bytes``), ``changes`` (``added``, ``removed``,
``relabelled``, ``file``, ``sha256``, ``bytes``), ``deletions`` (/3 only: ``file``, ``sha256``,
``bytes``, ``rows``), ``schema``. A shard entry of a /3 version may carry ``deleted``: how many of
the shard file's rows the version does not hold (their positions are in ``deletions.parquet``).
Parsing is lenient about the writer-only keys (a hand-made manifest with just ``version``,
``num_rows``, ``num_classes`` and ``shards`` reads), so older stores keep reading; a format it
does not know is refused rather than misread.

:func:`latest_version` is the one resolution of ``latest``, for writer and readers alike.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from storage import layout

if TYPE_CHECKING:  # the training reader imports this module without the object store
    from storage.objectstore import ObjectStore

# /2: shards live in the dataset's content-addressed pool (``datasets/<name>/shards/<sha256>
# .parquet``, shared by every version that holds the same rows) and the ``label`` of a row is
# its identity's row in the version's ``classes.parquet`` (the shards' own label column is
# null). /1: shards in the version directory with the label written in them. Both read.
# /3: as /2, and a version may reuse a parent's shard minus some of its rows (a deletion vector:
# the rows' positions in the version's ``deletions.parquet``, their count in the shard entry's
# ``deleted``), so a few changed faces do not rewrite every shard they are spread over. A
# version without deletions is written as /2, which older readers read.
FORMAT = "faceloop.dataset/2"
FORMAT_V1 = "faceloop.dataset/1"
FORMAT_V3 = "faceloop.dataset/3"
# The formats this code reads; any other is refused rather than misread.
KNOWN_FORMATS = (FORMAT_V1, FORMAT, FORMAT_V3)
_VDIR = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Keys the manifest model names; everything else a manifest holds is publisher metadata.
_META_KEYS = ("run_id", "config_hash", "models")
_FIXED_KEYS = (
    "format",
    "name",
    "version",
    "created",
    "parent",
    "num_rows",
    "num_classes",
    "shards",
    "classes",
    "changes",
    "deletions",
    "schema",
)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in a manifest. ``file`` is relative to the dataset directory
    (``shards/<sha256>.parquet``) in a pooled (/2) version, to the version directory in a /1
    one (:meth:`Manifest.shard_rel`). ``rows`` is the file's row count; ``deleted`` how many of
    them the version does not hold (/3), so it holds :attr:`live_rows`."""

    file: str
    rows: int
    bytes: int = 0
    sha256: str = ""
    deleted: int = 0

    @property
    def live_rows(self) -> int:
        return self.rows - self.deleted

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "file": self.file,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }
        if self.deleted:
            d["deleted"] = self.deleted
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(
            file=d["file"],
            rows=int(d["rows"]),
            bytes=int(d.get("bytes", 0)),
            sha256=str(d.get("sha256", "")),
            deleted=int(d.get("deleted", 0)),
        )


@dataclass(frozen=True)
class Manifest:
    """A committed dataset version. ``classes``/``changes`` are the file entries (``changes``
    with the added/removed/relabelled counts first); ``meta`` is publisher metadata beyond
    ``run_id``, ``config_hash`` and ``models``, kept in its order."""

    name: str
    version: int
    shards: tuple[ShardInfo, ...]
    num_rows: int
    num_classes: int
    format: str = FORMAT
    created: str | None = None
    parent: int | None = None
    classes: dict[str, Any] | None = None
    changes: dict[str, Any] | None = None
    deletions: dict[str, Any] | None = None
    schema: dict[str, str] | None = None
    run_id: str | None = None
    config_hash: str | None = None
    models: Any = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object the writer writes (keys in the order of the module docstring)."""
        d = {
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "models": self.models,
            **self.meta,
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "parent": self.parent,
            "num_rows": self.num_rows,
            "num_classes": self.num_classes,
            "shards": [s.to_dict() for s in self.shards],
            "classes": self.classes,
            "changes": self.changes,
            "schema": self.schema,
        }
        if self.deletions is not None:  # /3 only: a /2 manifest reads as it always did
            d = {k: v for k, v in d.items() if k != "schema"}
            d |= {"deletions": self.deletions, "schema": self.schema}
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @property
    def pooled(self) -> bool:
        """Shards in the dataset's shared pool, labels from ``classes.parquet`` (format /2)."""
        return self.format != FORMAT_V1

    def shard_rel(self, shard: ShardInfo) -> str:
        """A shard's key relative to the store root: ``file`` is relative to the dataset
        directory in a pooled version, to the version directory in a /1 version."""
        if self.pooled:
            return f"{layout.dataset_dir(self.name)}/{shard.file}"
        return f"{layout.version_dir(self.name, self.version)}/{shard.file}"

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], name: str | None = None, version: int | None = None
    ) -> Manifest:
        """Parse a manifest object; ``name`` and ``version`` (where it was read from) fill in a
        manifest that does not carry its own. ``num_rows`` defaults to the sum of the shard
        rows, ``num_classes`` to 0."""
        shards = tuple(ShardInfo.from_dict(s) for s in d.get("shards", []))
        if "version" not in d and version is None:
            raise KeyError("version")
        # A manifest without a format predates /2 (hand-made or old): /1 rules.
        fmt = str(d.get("format", FORMAT_V1))
        if fmt not in KNOWN_FORMATS:
            raise ValueError(f"dataset format {fmt!r} is newer than this faceloop reads")
        if fmt != FORMAT_V3 and any(s.deleted for s in shards):
            raise ValueError(f"{fmt} manifest lists shards with deleted rows")
        return cls(
            name=str(d.get("name") or name or ""),
            version=int(d["version"]) if "version" in d else int(cast(int, version)),
            shards=shards,
            num_rows=int(d.get("num_rows", sum(s.live_rows for s in shards))),
            num_classes=int(d.get("num_classes", 0)),
            format=fmt,
            created=d.get("created"),
            parent=d.get("parent"),
            classes=d.get("classes"),
            changes=d.get("changes"),
            deletions=d.get("deletions"),
            schema=d.get("schema"),
            run_id=d.get("run_id"),
            config_hash=d.get("config_hash"),
            models=d.get("models", []),
            meta={k: v for k, v in d.items() if k not in _META_KEYS + _FIXED_KEYS},
        )

    @classmethod
    def from_json(
        cls, data: bytes | str, name: str | None = None, version: int | None = None
    ) -> Manifest:
        return cls.from_dict(json.loads(data), name, version)


# --------------------------------------------------------------------------------------------
# Deletion vectors (/3)

DELETIONS_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int32())])


def deletions_table(deleted: dict[str, np.ndarray]) -> pa.Table:
    """``deletions.parquet`` of a version: (shard sha256, row position), sorted."""
    keys = sorted(k for k, v in deleted.items() if len(v))
    rows = [np.unique(np.asarray(deleted[k], np.int64)) for k in keys]
    return pa.table(
        {
            "shard": pa.array(np.repeat(np.asarray(keys, dtype=object), [len(r) for r in rows]))
            if keys
            else pa.array([], pa.string()),
            "row": pa.array(np.concatenate(rows) if rows else np.zeros(0), pa.int32()),
        },
        schema=DELETIONS_SCHEMA,
    )


def parse_deletions(manifest: Manifest, data: bytes | None) -> dict[str, np.ndarray]:
    """shard sha256 -> sorted positions of the rows the version does not hold, from the bytes
    of its ``deletions.parquet`` (None: the version has none). ValueError when the file does
    not match the manifest: sha256, a shard's ``deleted`` count, a position outside the file."""
    want = {s.sha256: s for s in manifest.shards if s.deleted}
    if data is None:
        if want or manifest.deletions:
            raise ValueError("the manifest lists deleted rows but no deletions file was read")
        return {}
    entry = manifest.deletions or {}
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry.get('file')}: sha256 does not match the manifest")
    from storage.objectstore import read_parquet_bytes  # not pq.read_table: see there

    t = read_parquet_bytes(data, ["shard", "row"])
    shard = np.asarray(t.column("shard").to_pylist(), dtype=object)
    row = t.column("row").to_numpy().astype(np.int64)
    out: dict[str, np.ndarray] = {}
    if len(shard):
        order = np.lexsort((row, shard.astype(str)))
        shard, row = shard[order], row[order]
        cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(shard)], strict=True):
            out[str(shard[lo])] = row[lo:hi]
    for sha, pos in out.items():
        info = want.get(sha)
        if info is None or len(pos) != info.deleted:
            raise ValueError(f"deletions for shard {sha[:12]} do not match its manifest entry")
        if (np.diff(pos) <= 0).any() or pos[0] < 0 or pos[-1] >= info.rows:
            raise ValueError(f"deletions for shard {sha[:12]}: positions outside 0..rows-1")
    if set(out) != set(want):
        raise ValueError("the manifest lists shards with deleted rows the deletions file lacks")
    return out


def held_rows(table: pa.Table, deleted: np.ndarray | None) -> pa.Table:
    """The rows of a shard file (``table``, in file order) that a version holds: all but the
    positions ``deleted`` (its deletion vector for that shard; None or empty: all)."""
    if deleted is None or not len(deleted):
        return table
    mask = np.ones(table.num_rows, dtype=bool)
    mask[deleted] = False
    return table.filter(pa.array(mask))


# --------------------------------------------------------------------------------------------
# Which versions exist, and which one ``latest`` means


def check_name(name: str) -> str:
    """``name`` if it is usable as a dataset name (one path segment, no dots first), else
    ValueError."""
    if not _NAME.match(name):
        raise ValueError(f"bad dataset name {name!r}")
    return name


def version_dirs(store: ObjectStore, name: str) -> dict[int, set[str]]:
    """Every ``v<N>`` directory with the keys (relative to it) of the objects inside."""
    out: dict[int, set[str]] = {}
    base = layout.dataset_dir(check_name(name)) + "/"
    for obj in store.list(layout.dataset_dir(name)):
        head, _, rest = obj.rel[len(base) :].partition("/")
        m = _VDIR.match(head)
        if m and rest:
            out.setdefault(int(m.group(1)), set()).add(rest)
    return out


def list_versions(store: ObjectStore, name: str) -> list[int]:
    """Committed versions (those with a manifest), ascending."""
    return sorted(v for v, files in version_dirs(store, name).items() if layout.MANIFEST in files)


def newest_version(store: ObjectStore, name: str) -> int | None:
    """The highest committed version: the parent of the next one."""
    versions = list_versions(store, name)
    return versions[-1] if versions else None


def pointed_version(store: ObjectStore, name: str) -> int | None:
    """The number ``latest`` names, committed or not (None: no pointer, or not a ``v<N>``)."""
    try:
        text = store.read_bytes(layout.dataset_latest(check_name(name))).decode().strip()
    except FileNotFoundError:
        return None
    m = _VDIR.match(text)
    return int(m.group(1)) if m else None


def latest_version(store: ObjectStore, name: str) -> int | None:
    """What ``latest`` points at, if that version is committed; else the newest committed one
    (the pointer is missing or was not moved because a writer died right after its manifest).
    None when the dataset has no committed version."""
    v = pointed_version(store, name)
    if v is not None and store.exists(layout.version_manifest(name, v)):
        return v
    return newest_version(store, name)
