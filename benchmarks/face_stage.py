"""The refresh's face stage on one onnxruntime provider, and CPU vs GPU labels compared.

``python -m benchmarks.face_stage run cuda|cpu IMAGES OUT [--batch 64] [--workers 4]
[--det-batch 32] [--embed-batch 256]`` runs
:class:`tasks.faces.FaceProcessor` (what each Ray face actor runs: decode, detect, quality gate,
align, embed) over a folder of photos in ``workers`` processes and writes
``OUT/faces_<provider>.parquet`` (one row per face, embeddings included) and a JSON of timings
and session providers. ``--det-batch`` / ``--embed-batch`` set ``models.det_batch`` /
``models.embed_batch`` (images per detector call, faces per recognizer call; calls are padded
to them on CUDA, ``models.fixed_shapes``). It needs no Ray, Prefect, faiss nor hdbscan, so it
runs on a GPU machine that has only onnxruntime-gpu and the face stage's own packages.

``python -m benchmarks.face_stage compare CPU.parquet GPU.parquet [--truth DIR]`` clusters the
faces of each album (20 consecutive photos by name) with :func:`tasks.cluster.cluster_album` on
each side's embeddings and reports how many albums got identical labels; with ``--truth``, a
folder per person whose files hold the same bytes as the photos, each side's pairwise precision
and recall too (a background face counts as its photo's person).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

KEEP = ["image_uri", "face_index", "bbox", "det_score", "quality", "embedding", "face_id"]
ALBUM_PHOTOS = 20


def _work(
    job: tuple[str, list[str], int, int, int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    provider, files, batch, det_batch, embed_batch = job
    from faceloop.config import Settings
    from faceloop.hashing import sha256_file
    from faceloop.ort_providers import CPU, CUDA
    from tasks.faces import FaceProcessor

    s = Settings()  # the backend fills and verifies the model folder itself
    s.models.det_batch = det_batch
    s.models.embed_batch = embed_batch
    providers = [CUDA, CPU] if provider == "cuda" else None
    t0 = time.perf_counter()
    fp = FaceProcessor(s.model_dump(), providers)
    load_s = time.perf_counter() - t0
    rows = [
        {
            "image_uri": f,
            "image_sha256": sha256_file(f),
            "source_kind": "album",
            "role": "",
            "size_bytes": Path(f).stat().st_size,
        }
        for f in files
    ]
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        cols = fp({k: [r[k] for r in chunk] for k in chunk[0]})
        for j in range(len(cols["image_uri"])):
            r = {k: cols[k][j] if k in cols else None for k in KEEP}
            r["image_uri"] = Path(str(r["image_uri"])).name
            out.append(r)
    wall = time.perf_counter() - t0
    backend: Any = fp.backend
    sessions = [m.session.get_providers() for m in (backend.detector, backend.recognizer)]
    return out, {
        "wall_s": wall,
        "load_s": load_s,
        "timings": fp.timings,
        "session_providers": sessions,
        "models": [backend.detector_tag, backend.recognizer_tag],
    }


def run(
    provider: str,
    images: Path,
    out_dir: Path,
    batch: int,
    workers: int,
    det_batch: int = 1,
    embed_batch: int = 8,
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in images.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no files in {images}")
    parts = [files[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        results = [_work((provider, parts[0], batch, det_batch, embed_batch))]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_work, [(provider, p, batch, det_batch, embed_batch) for p in parts])
    wall = time.perf_counter() - t0
    rows = [r for res in results for r in res[0]]
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / f"faces_{provider}.parquet")
    info = {
        "provider": provider,
        "images": len(files),
        "workers": workers,
        "batch": batch,
        "det_batch": det_batch,
        "embed_batch": embed_batch,
        "faces_embedded": sum(1 for r in rows if r.get("embedding") is not None),
        "face_rows": sum(1 for r in rows if r.get("face_index") is not None),
        "wall_s_incl_load": wall,
        "images_per_s_incl_load": len(files) / wall,
        "per_worker": [res[1] for res in results],
    }
    (out_dir / f"faces_{provider}.json").write_text(json.dumps(info, indent=1))
    return info


def _faces(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    import pyarrow.parquet as pq

    return {
        (r["image_uri"], r["face_index"]): r
        for r in pq.read_table(path).to_pylist()
        if r["embedding"] is not None
    }


def _truth(photos: set[str], truth: Path, images: Path) -> dict[str, str]:
    from faceloop.hashing import sha256_file

    by_hash = {sha256_file(p): p.parent.name for p in truth.rglob("*") if p.is_file()}
    out = {}
    for name in photos:
        who = by_hash.get(sha256_file(images / name))
        if who is None:
            raise SystemExit(f"--truth: no file with the bytes of {name}")
        out[name] = who
    return out


def compare(
    cpu_path: Path, gpu_path: Path, truth: Path | None = None, images: Path | None = None
) -> dict[str, Any]:
    import numpy as np

    from faceloop.arrays import l2_normalize
    from faceloop.config import Settings
    from tasks.cluster import cluster_album

    cpu, gpu = _faces(cpu_path), _faces(gpu_path)
    if set(cpu) != set(gpu):
        raise SystemExit(f"the two runs embedded different faces ({len(cpu)} vs {len(gpu)})")
    keys = sorted(cpu)
    cos = (
        l2_normalize([cpu[k]["embedding"] for k in keys])
        * l2_normalize([gpu[k]["embedding"] for k in keys])
    ).sum(axis=1)
    photos = sorted({k[0] for k in keys})
    who = _truth(set(photos), truth, images or truth) if truth else {}
    album = {p: i // ALBUM_PHOTOS for i, p in enumerate(photos)}
    by_album: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for k in keys:
        by_album[album[k[0]]].append(k)
    s = Settings()
    same = 0
    tp = {"cpu": 0, "gpu": 0}
    fp = {"cpu": 0, "gpu": 0}
    pos = 0
    for ks in by_album.values():
        lab = {}
        for side, faces in (("cpu", cpu), ("gpu", gpu)):
            emb = np.array([faces[k]["embedding"] for k in ks], np.float32)
            q = np.array([faces[k]["quality"] for k in ks], np.float32)
            lab[side] = cluster_album(emb, q, s.cluster, s.thresholds)
        same += int(np.array_equal(lab["cpu"], lab["gpu"]))
        if not who:
            continue
        for i in range(len(ks)):
            for j in range(i + 1, len(ks)):
                t = who[ks[i][0]] == who[ks[j][0]]
                pos += t
                for side in ("cpu", "gpu"):
                    c = bool(lab[side][i] >= 0 and lab[side][i] == lab[side][j])
                    tp[side] += c and t
                    fp[side] += c and not t
    res: dict[str, Any] = {
        "faces": len(keys),
        "embedding_cosine_min": round(float(cos.min()), 6),
        "embedding_cosine_mean": round(float(cos.mean()), 6),
        "albums": len(by_album),
        "albums_with_identical_labels": same,
    }
    if who:
        for side in ("cpu", "gpu"):
            res[f"{side}_pairwise_precision"] = round(tp[side] / max(1, tp[side] + fp[side]), 4)
            res[f"{side}_pairwise_recall"] = round(tp[side] / max(1, pos), 4)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.face_stage", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the face stage over a folder on one provider")
    r.add_argument("provider", choices=("cuda", "cpu"))
    r.add_argument("images", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--batch", type=int, default=64, help="photos per FaceProcessor call")
    r.add_argument("--workers", type=int, default=1, help="processes")
    r.add_argument("--det-batch", type=int, default=1, help="images per detector call")
    r.add_argument(
        "--embed-batch", type=int, default=8, help="faces per recognizer call (CPU default: 8)"
    )
    c = sub.add_parser("compare", help="CPU vs GPU faces: embeddings and album labels")
    c.add_argument("cpu", type=Path)
    c.add_argument("gpu", type=Path)
    c.add_argument("--truth", type=Path, help="folder per person holding the same photos")
    c.add_argument("--images", type=Path, help="the photos the runs read (with --truth)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        info = run(
            args.provider,
            args.images,
            args.out,
            args.batch,
            args.workers,
            args.det_batch,
            args.embed_batch,
        )
        print(json.dumps({k: v for k, v in info.items() if k != "per_worker"}))
    else:
        print(json.dumps(compare(args.cpu, args.gpu, args.truth, args.images), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
