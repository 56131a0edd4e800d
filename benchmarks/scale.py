"""``faceloop bench --scale``: the label + publish stages on synthetic stores of 10^4..10^6 faces.

For each size a synthetic store is written (ArcFace-like 512-d embeddings with known identities,
evaluation/synthetic.py, and one tiny JPEG crop per face: no model work), then, each in a child
process of its own so that its peak resident memory is the driver's alone:

1. ``full``: the label stage on the whole store (no label state yet: every album clustered,
   every unit merged) and the publish of the first dataset version;
2. ``add``: 1% new faces in a few existing albums, written as a run's detections;
3. ``incremental``: the label stage on that run (the state from 1 is valid: only the changed
   albums are clustered, their units query the persisted index) and the publish.

Reported per size: seconds, bytes the stage wrote to the store, the driver's peak RSS, the
albums clustered / decided, and pairwise precision / recall of the identities against the
synthetic truth (over faces with an identity; a face without one is a class of its own).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FACES_PER_ALBUM = 200
NEW_FRACTION = 0.01
NEW_ALBUMS = 5


def _crop() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 110, 100)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def _face_table(
    kind_rows: dict[str, list[Any]], emb: np.ndarray, q: np.ndarray, crop: bytes, run_id: str
) -> pa.Table:
    from faceloop.schema import FACES_SCHEMA

    n = len(emb)
    cols: dict[str, Any] = {
        "face_id": kind_rows["face_id"],
        "image_uri": kind_rows["image_uri"],
        "image_sha256": kind_rows["image_sha256"],
        "source_kind": ["album"] * n,
        "source_group": kind_rows["source_group"],
        "role": [None] * n,
        "face_index": [0] * n,
        "bbox": [[0.0, 0.0, 100.0, 100.0]] * n,
        "landmarks": [[30.0, 40.0, 70.0, 40.0, 50.0, 60.0, 35.0, 80.0, 65.0, 80.0]] * n,
        "det_score": np.full(n, 0.9, np.float32),
        "face_px": np.full(n, 100.0, np.float32),
        "blur": np.full(n, 100.0, np.float32),
        "yaw": np.zeros(n, np.float32),
        "pitch": np.zeros(n, np.float32),
        "quality": q.astype(np.float32),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.astype(np.float32).ravel()), emb.shape[1]
        ).cast(pa.list_(pa.float32())),
        "aligned_jpeg": [crop] * n,
        "model": ["synthetic"] * n,
        "detector": ["synthetic"] * n,
        "run_id": [run_id] * n,
    }
    for name in FACES_SCHEMA.names:
        if name not in cols:
            cols[name] = pa.nulls(n, FACES_SCHEMA.field(name).type)
    return pa.table({k: cols[k] for k in FACES_SCHEMA.names}, schema=FACES_SCHEMA)


def _ids(album: int, start: int, n: int) -> dict[str, list[Any]]:
    import hashlib

    fids = [f"s{album:06d}-{start + i:05d}" for i in range(n)]
    return {
        "face_id": fids,
        "image_uri": [f"synthetic://a{album:06d}/{f}.jpg" for f in fids],
        "image_sha256": [hashlib.sha256(f.encode()).hexdigest() for f in fids],
        "source_group": [f"a{album:06d}"] * n,
    }


def build_store(store: str, work: Path, n_faces: int, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic store (unlabelled faces groups) and the truth under ``work``."""
    from evaluation.synthetic import album_faces, plan_albums, random_centres
    from storage.objectstore import open_store
    from storage.tables import faces_rel

    st = open_store(store)
    plan = plan_albums(n_faces, faces_per_album=FACES_PER_ALBUM, seed=seed)
    centres = random_centres(plan.n_identities, 512, np.random.default_rng([seed, 1]))
    crop = _crop()
    fids: list[str] = []
    truth: list[np.ndarray] = []
    for a in range(len(plan.album_people)):
        emb, ids, q = album_faces(plan, centres, a, seed)
        rows = _ids(a, 0, len(emb))
        st.write_parquet(
            faces_rel("album", rows["source_group"][0]),
            _face_table(rows, emb, q, crop, "synthetic"),
        )
        fids += rows["face_id"]
        truth.append(ids)
    np.savez(work / "truth.npz", face_id=np.array(fids), identity=np.concatenate(truth))
    return {"faces": len(fids), "albums": len(plan.album_people), "identities": plan.n_identities}


def add_faces(
    store: str,
    work: Path,
    run_id: str,
    n_faces: int,
    seed: int = 0,
    n_albums_new: int = NEW_ALBUMS,
    fraction: float = NEW_FRACTION,
) -> dict[str, Any]:
    """Write ~``fraction`` x ``n_faces`` (the store's size) new faces of known people (and a
    stranger each) into ``n_albums_new`` existing albums as the detections of run ``run_id``;
    extend the truth."""
    from evaluation.synthetic import album_faces, plan_albums, random_centres
    from faceloop.schema import DETECTIONS_SCHEMA
    from storage import layout
    from storage.objectstore import open_store

    st = open_store(store)
    plan = plan_albums(n_faces, faces_per_album=FACES_PER_ALBUM, seed=seed)
    centres = random_centres(plan.n_identities, 512, np.random.default_rng([seed, 1]))
    n_albums = len(plan.album_people)
    rng = np.random.default_rng([seed, 2])
    chosen = sorted(rng.choice(n_albums, size=min(n_albums_new, n_albums), replace=False).tolist())
    per_album = max(1, round(fraction * n_faces / len(chosen)))
    crop = _crop()
    parts, fids, truth = [], [], []
    for a in chosen:
        # More faces of the album's own people (as a new batch of photos), from a fresh draw.
        emb_l, ids_l, q_l = [], [], []
        got = 0
        k = 0
        while got < per_album:
            emb, ids, q = album_faces(plan, centres, a, seed + 1000 + k)
            emb_l.append(emb)
            ids_l.append(ids)
            q_l.append(q)
            got += len(emb)
            k += 1
        emb = np.concatenate(emb_l)[:per_album]
        ids = np.concatenate(ids_l)[:per_album]
        q = np.concatenate(q_l)[:per_album]
        rows = _ids(a, 50_000, len(emb))
        t = _face_table(rows, emb, q, crop, run_id)
        n = len(emb)
        extra = {
            "run_id": pa.array([run_id] * n),
            "image_status": pa.array(["ok"] * n),
            "image_reason": pa.nulls(n, pa.string()),
            "image_reason_code": pa.nulls(n, pa.string()),
            "width": pa.array([128] * n, pa.int32()),
            "height": pa.array([128] * n, pa.int32()),
            "n_faces": pa.array([1] * n, pa.int32()),
        }
        cols = {
            name: extra[name]
            if name in extra
            else t.column(name).cast(DETECTIONS_SCHEMA.field(name).type)
            for name in DETECTIONS_SCHEMA.names
        }
        parts.append(pa.table(cols, schema=DETECTIONS_SCHEMA))
        fids += rows["face_id"]
        truth.append(ids)
    det = pa.concat_tables(parts)
    rel = layout.staging_detections_part(run_id)
    st.write_parquet(rel, det)
    old = np.load(work / "truth.npz")
    np.savez(
        work / "truth.npz",
        face_id=np.concatenate([old["face_id"], np.array(fids)]),
        identity=np.concatenate([old["identity"], np.concatenate(truth)]),
    )
    return {"new_faces": len(det), "albums": len(chosen), "detections": rel}


def _bytes_since(root: Path, t0: float) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                s = p.stat()
            except FileNotFoundError:
                continue
            if s.st_mtime >= t0:
                total += s.st_size
    return total


def run_stage(
    store: str, run_id: str, detections: str | None, use_ray: bool | None
) -> dict[str, Any]:
    """The label stage of one run in this process: seconds, bytes written, peak RSS."""
    from faceloop.config import Settings
    from storage.objectstore import open_store
    from tasks.label import label_run

    settings = Settings(store=store)
    st = open_store(store)
    t0 = time.time()
    t = time.perf_counter()
    res = label_run(settings, st, run_id, detections, [], use_ray=use_ray)
    label_s = time.perf_counter() - t
    st.delete_prefix(f"staging/{run_id}")
    out = {
        "label_seconds": round(label_s, 3),
        "label_bytes_written": _bytes_since(Path(store), t0 - 1),
        "label_driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "new_faces": res.new_faces,
        "changed_faces": res.changed_faces,
        "albums_clustered": res.albums_clustered,
        "albums_decided": res.albums_decided,
        "units_merged": res.units_merged,
        "groups_rewritten": res.groups_rewritten,
    }
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    return out


def run_publish(store: str, run_id: str) -> dict[str, Any]:
    """The publish stage in this process: seconds, bytes written, peak RSS."""
    from faceloop.config import Settings
    from storage.objectstore import open_store
    from tasks.publish import publish_dataset

    st = open_store(store)
    t0 = time.time()
    t = time.perf_counter()
    manifest = publish_dataset(Settings(store=store), st, run_id, [])
    return {
        "publish_seconds": round(time.perf_counter() - t, 3),
        "publish_bytes_written": _bytes_since(Path(store), t0 - 1),
        "publish_driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "published_rows": manifest["num_rows"] if manifest else 0,
    }


def _stage(
    store: str, run_id: str, detections: str | None, ray_arg: list[str], log: Path
) -> dict[str, Any]:
    """Label then publish, each in a child process; their figures and the sums."""
    lab = _child(["stage", store, run_id, *([detections] if detections else []), *ray_arg], log)
    pub = _child(["publish", store, run_id], log)
    return (
        lab
        | pub
        | {
            "seconds": round(lab["label_seconds"] + pub["publish_seconds"], 3),
            "bytes_written": lab["label_bytes_written"] + pub["publish_bytes_written"],
            "driver_peak_rss_bytes": max(
                lab["label_driver_peak_rss_bytes"], pub["publish_driver_peak_rss_bytes"]
            ),
        }
    )


def scores(store: str, work: Path) -> dict[str, float]:
    """Pairwise precision / recall of the merge against the truth: faces that are members of
    an identity (in a per-album cluster, with an identity id) by identity; every other face
    is a class of its own (review proposals for unclustered faces are not labels)."""
    from evaluation.synthetic import pair_scores
    from storage.objectstore import open_store
    from storage.tables import iter_faces

    t = np.load(work / "truth.npz")
    pos = {f: i for i, f in enumerate(t["face_id"].tolist())}
    truth = t["identity"]
    pred = np.full(len(truth), -1, np.int64)
    names: dict[str, int] = {}
    for part in iter_faces(
        open_store(store), columns=["face_id", "identity_id", "cluster_id"], kinds=["album"]
    ):
        for f, ident, cluster in zip(
            *(part.column(c).to_pylist() for c in ("face_id", "identity_id", "cluster_id")),
            strict=True,
        ):
            if ident is not None and cluster is not None:
                pred[pos[f]] = names.setdefault(ident, len(names))
    loose = pred < 0
    pred[loose] = len(names) + np.arange(int(loose.sum()))
    s = pair_scores(pred, truth)
    return {"precision": round(s["precision"], 6), "recall": round(s["recall"], 6)}


def _child(args: list[str], log: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scale", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if log is not None:
        with open(log, "a") as f:
            f.write(out.stderr[-20000:])
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def bench_scale(
    sizes: list[int],
    work: Path,
    *,
    seed: int = 0,
    use_ray: bool | None = None,
    new_albums: int = NEW_ALBUMS,
    progress: Any = None,
) -> dict[str, Any]:
    """Every size in its own store under ``work``; one result dict (see the module docstring)."""
    say = progress or (lambda msg: None)
    per: dict[str, Any] = {}
    ray_arg = [] if use_ray is None else ["--ray" if use_ray else "--no-ray"]
    for n in sizes:
        d = work / f"scale-{n}"
        d.mkdir(parents=True, exist_ok=True)
        store = str(d / "store")
        log = d / "log.txt"
        say(f"scale {n:,}: writing the synthetic store")
        built = _child(["build", store, str(d), str(n), "--seed", str(seed)], log)
        say(f"scale {n:,}: full label + publish")
        full = _stage(store, "scale-full", None, ray_arg, log)
        full_scores = _child(["scores", store, str(d)], log)
        added = _child(
            [
                "add",
                store,
                str(d),
                "scale-incr",
                str(n),
                "--seed",
                str(seed),
                "--albums",
                str(new_albums),
            ],
            log,
        )
        say(f"scale {n:,}: +{added['new_faces']:,} faces in {added['albums']} albums, incremental")
        incr = _stage(store, "scale-incr", added["detections"], ray_arg, log)
        incr_scores = _child(["scores", store, str(d)], log)
        per[str(n)] = {
            "store": built,
            "full": full | full_scores,
            "added": {k: added[k] for k in ("new_faces", "albums")},
            "incremental": incr | incr_scores,
            "full_seconds": full["seconds"],
            "incremental_seconds": incr["seconds"],
            "bytes_written_full": full["bytes_written"],
            "bytes_written_incremental": incr["bytes_written"],
            "driver_peak_rss_bytes": max(
                full["driver_peak_rss_bytes"], incr["driver_peak_rss_bytes"]
            ),
            "label_driver_peak_rss_bytes": max(
                full["label_driver_peak_rss_bytes"], incr["label_driver_peak_rss_bytes"]
            ),
            "precision": min(full_scores["precision"], incr_scores["precision"]),
            "recall": min(full_scores["recall"], incr_scores["recall"]),
        }
        say(f"scale {n:,}: full {full['seconds']:.1f} s, incremental {incr['seconds']:.1f} s")
    lo, hi = str(min(sizes)), str(max(sizes))
    return {
        "sizes": per,
        "max_faces": max(sizes),
        "full_build_seconds_at_max": per[hi]["full_seconds"],
        "incremental_vs_full_ratio": round(
            per[hi]["incremental_seconds"] / per[hi]["full_seconds"], 4
        ),
        "incremental_growth_ratio": round(
            per[hi]["incremental_seconds"] / per[lo]["incremental_seconds"], 3
        ),
        "driver_rss_growth_ratio": round(
            per[hi]["driver_peak_rss_bytes"] / per[lo]["driver_peak_rss_bytes"], 3
        ),
        # The label stage alone (issue 10 point 2) beside label + publish above.
        "label_incremental_vs_full_ratio": round(
            per[hi]["incremental"]["label_seconds"] / per[hi]["full"]["label_seconds"], 4
        ),
        "label_incremental_growth_ratio": round(
            per[hi]["incremental"]["label_seconds"] / per[lo]["incremental"]["label_seconds"], 3
        ),
        "label_driver_rss_growth_ratio": round(
            per[hi]["label_driver_peak_rss_bytes"] / per[lo]["label_driver_peak_rss_bytes"], 3
        ),
        "merge_precision_min": min(p["precision"] for p in per.values()),
        "merge_recall_min": min(p["recall"] for p in per.values()),
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("store")
    b.add_argument("work")
    b.add_argument("n", type=int)
    b.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("add")
    a.add_argument("store")
    a.add_argument("work")
    a.add_argument("run_id")
    a.add_argument("n", type=int)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--albums", type=int, default=NEW_ALBUMS)
    s = sub.add_parser("stage")
    s.add_argument("store")
    s.add_argument("run_id")
    s.add_argument("detections", nargs="?")
    s.add_argument("--ray", dest="use_ray", action="store_true", default=None)
    s.add_argument("--no-ray", dest="use_ray", action="store_false")
    pb = sub.add_parser("publish")
    pb.add_argument("store")
    pb.add_argument("run_id")
    c = sub.add_parser("scores")
    c.add_argument("store")
    c.add_argument("work")
    args = p.parse_args(argv)
    if args.cmd == "build":
        out = build_store(args.store, Path(args.work), args.n, args.seed)
    elif args.cmd == "add":
        out = add_faces(args.store, Path(args.work), args.run_id, args.n, args.seed, args.albums)
    elif args.cmd == "stage":
        out = run_stage(args.store, args.run_id, args.detections, args.use_ray)
    elif args.cmd == "publish":
        out = run_publish(args.store, args.run_id)
    else:
        out = scores(args.store, Path(args.work))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
