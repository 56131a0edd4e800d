"""Do two refreshes of the same photos give the same labels? (e.g. CUDA vs CPU, or two layouts)

``python -m benchmarks.compare_stores STORE_A STORE_B`` reads both stores' faces tables
and matches their faces: by ``face_id`` (the image's sha256 and the box rounded to whole pixels),
else, for a box that moved by a rounding step (another provider's float rounding), by the image
and the nearest box centre within ``--max-shift`` px. Over the matched faces it reports:

- ``status_agreement``: the share with the same status (auto / review / rejected);
- ``same_identity_pairwise_precision`` / ``recall``: B's identities against A's as the truth
  (pairs of matched faces that share an identity in both, over the pairs B / A put together;
  faces without an identity are each their own class), and ``identical_partition``;
- the faces only one side found, and each side's accepted faces.

It needs only the faces' label columns: ``python -m benchmarks.compare_stores STORE --export
labels.parquet`` writes them (face id, image hash, box, status, identity; no embedding, no crop)
on the machine that ran one refresh, and either argument may be such a file. Nothing is printed
about a face beyond counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_COLUMNS = ["face_id", "image_sha256", "bbox", "status", "identity_id"]


def _label_table(store_uri: str) -> pa.Table:
    """A store's faces, label columns only."""
    from storage.objectstore import open_store
    from storage.tables import read_faces

    return read_faces(open_store(store_uri), columns=_COLUMNS)


def _faces(store_uri: str) -> list[dict[str, Any]]:
    """A store's faces (label columns only), or a ``.parquet`` file of them as
    :func:`export_labels` writes it (what leaves a GPU machine: no embeddings, no crops)."""
    if store_uri.endswith(".parquet"):
        return pq.read_table(store_uri, columns=_COLUMNS).to_pylist()
    return _label_table(store_uri).to_pylist()


def export_labels(store_uri: str, path: str) -> int:
    """Write a store's faces as ``path`` (Parquet) with the label columns only; the row count."""
    t = _label_table(store_uri)
    pq.write_table(t, path)
    return int(t.num_rows)


def _centre(bbox: list[float] | None) -> np.ndarray:
    if not bbox:
        return np.full(2, np.nan)
    return np.array([(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2], dtype=np.float64)


def match_faces(
    a: list[dict[str, Any]], b: list[dict[str, Any]], max_shift: float = 2.0
) -> list[tuple[int, int]]:
    """(index in a, index in b) of the same face: equal face_id, else the same image and the
    nearest unmatched box centre within ``max_shift`` px. Each face is matched at most once."""
    by_id = {f["face_id"]: j for j, f in enumerate(b) if f.get("face_id")}
    pairs: list[tuple[int, int]] = []
    used_b: set[int] = set()
    rest_a: list[int] = []
    for i, f in enumerate(a):
        j = by_id.get(f.get("face_id"))
        if j is not None and j not in used_b:
            pairs.append((i, j))
            used_b.add(j)
        else:
            rest_a.append(i)
    by_image: dict[str, list[int]] = {}
    for j, f in enumerate(b):
        if j not in used_b and f.get("image_sha256"):
            by_image.setdefault(f["image_sha256"], []).append(j)
    for i in rest_a:
        cands = [j for j in by_image.get(a[i].get("image_sha256") or "", []) if j not in used_b]
        if not cands:
            continue
        ca = _centre(a[i].get("bbox"))
        d = [float(np.linalg.norm(ca - _centre(b[j].get("bbox")))) for j in cands]
        k = int(np.argmin(d))
        if d[k] <= max_shift:
            pairs.append((i, cands[k]))
            used_b.add(cands[k])
    return pairs


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def compare_faces(
    a: list[dict[str, Any]], b: list[dict[str, Any]], max_shift: float = 2.0
) -> dict[str, Any]:
    """The figures of the module docstring for two lists of face rows."""
    pairs = match_faces(a, b, max_shift)
    same_status = sum(1 for i, j in pairs if a[i]["status"] == b[j]["status"])

    def label(f: dict[str, Any], k: int, side: str) -> str:
        return f["identity_id"] if f.get("identity_id") else f"{side}-none-{k}"

    la = [label(a[i], k, "a") for k, (i, _) in enumerate(pairs)]
    lb = [label(b[j], k, "b") for k, (_, j) in enumerate(pairs)]
    tp = sum(_pairs(n) for n in Counter(zip(la, lb, strict=True)).values())
    pa_, pb_ = (
        sum(_pairs(n) for n in Counter(la).values()),
        sum(_pairs(n) for n in Counter(lb).values()),
    )
    by_a_status = Counter(f["status"] for f in a)
    by_b_status = Counter(f["status"] for f in b)
    return {
        "faces_a": len(a),
        "faces_b": len(b),
        "matched": len(pairs),
        "matched_by_face_id": sum(1 for i, j in pairs if a[i]["face_id"] == b[j]["face_id"]),
        "only_a": len(a) - len(pairs),
        "only_b": len(b) - len(pairs),
        "status_agreement": round(same_status / len(pairs), 6) if pairs else 1.0,
        "same_identity_pairwise_precision": round(tp / pb_, 6) if pb_ else 1.0,
        "same_identity_pairwise_recall": round(tp / pa_, 6) if pa_ else 1.0,
        "identical_partition": tp == pa_ == pb_,
        "status_a": dict(sorted(by_a_status.items())),
        "status_b": dict(sorted(by_b_status.items())),
    }


def compare_stores(store_a: str, store_b: str, max_shift: float = 2.0) -> dict[str, Any]:
    """:func:`compare_faces` of two stores' faces tables."""
    return compare_faces(_faces(store_a), _faces(store_b), max_shift)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_stores", description=__doc__)
    p.add_argument("store_a", help="the reference store or labels .parquet (e.g. the CPU run)")
    p.add_argument("store_b", nargs="?", help="the store or labels .parquet compared with it")
    p.add_argument("--max-shift", type=float, default=2.0, help="px, for faces whose id moved")
    p.add_argument("--export", metavar="FILE", help="write store_a's label columns to FILE")
    args = p.parse_args(argv)
    if args.export:
        print(json.dumps({"rows": export_labels(args.store_a, args.export), "file": args.export}))
        return 0
    if not args.store_b:
        p.error("give two stores to compare (or --export FILE)")
    print(json.dumps(compare_stores(args.store_a, args.store_b, args.max_shift), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
