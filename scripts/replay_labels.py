"""Replay the label stage on a finished `faceloop eval` folder with other settings, and score it.

    PYTHONPATH=$PWD .venv/bin/python scripts/replay_labels.py OUT CONFIGS.json [BENCH_ROOT]

OUT is an eval's --out folder (its store and bench); CONFIGS.json maps a name to settings
overrides, e.g. ``{"main": {}, "repair 0.35": {"cluster": {"repair": 0.35}}}``. Every album
and every ID-card subject is relabelled from the stored detections and embeddings (no model
work, nothing written) and scored against the benchmark truth: how the ablations in
docs/QUALITY.md were measured. With the settings the eval ran with, the figures equal the
eval's own. ID-card figures: genuine pairs auto-accepted (TAR, count) and impostors accepted.
BENCH_ROOT: where the benchmark lay when the eval ran, if the folder was moved since (image
URIs are absolute). Each setting gets a second line, "+ review": the same figures after one
review round answered from the truth (evaluation/review_round.py) and the tasks it took, so a
change to what goes to review is judged by what annotators would recover and at what cost.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from evaluation.benchmark import Truth
from evaluation.metrics import score_benchmark
from evaluation.review_round import COLUMNS as ROUND_COLUMNS
from evaluation.review_round import face_persons, review_round
from faceloop.config import load_settings
from faceloop.schema import FACES_SCHEMA
from storage.objectstore import open_store
from storage.tables import read_faces
from tasks.label import relabel

FIGURES = ("pairwise_precision", "pairwise_recall", "coverage", "coverage_recurring")
ID_FIGURES = ("tar", "genuine_accepted", "impostors_accepted")


def main(argv: list[str]) -> int:
    logging.disable(logging.INFO)
    out = Path(argv[0])
    configs = json.loads(Path(argv[1]).read_text())
    root = argv[2] if len(argv) > 2 else str(out / "bench")
    base = load_settings(None, store=str(out / "store"))
    cols = [c for c in FACES_SCHEMA.names if c != "aligned_jpeg"]
    faces = read_faces(open_store(base.store), columns=cols)
    kinds = faces.column("source_kind").to_pylist()
    groups = faces.column("source_group").to_pylist()
    affected = set(zip(kinds, groups, strict=True))
    scored = ["face_id", "image_uri", "source_kind", "bbox", "det_score", "embedding"]
    rows0 = faces.select(list(dict.fromkeys([*scored, *ROUND_COLUMNS]))).to_pylist()
    truth = Truth.load(out / "bench")
    person = face_persons(rows0, truth.images, root)
    has_albums = "album" in kinds
    if not has_albums:  # an `--part idcards` eval
        truth.images = {r: rec for r, rec in truth.images.items() if rec["kind"] != "album"}
    names = (FIGURES if has_albums else ()) + ID_FIGURES
    print(f"{'settings':<28} " + " ".join(f"{f:>18}" for f in names))
    for name, overrides in configs.items():
        t0 = time.perf_counter()
        settings = base.model_copy(deep=True)
        for section, values in overrides.items():
            target = getattr(settings, section)
            for key, value in values.items():
                if isinstance(target, dict):  # policy: {backend: {threshold: value}}
                    for field, v in value.items():
                        setattr(target[key], field, v)
                else:
                    setattr(target, key, value)
        decisions, _ = relabel(settings, faces, affected)
        rows = [dict(r) for r in rows0]
        for r in rows:
            d = decisions.get(r["face_id"])
            if d is not None:
                r["status"], r["identity_id"] = str(d.status), d.identity_id
                r["reason"], r["reason_code"], r["score"] = d.reason, d.code, d.score
        rnd = review_round(rows, person, settings)
        for label, table in ((name, rows), ("  + review", rnd.faces)):
            res = score_benchmark(table, truth.images, truth.pairs, root, baseline=False)
            values = [res["faceloop"]["albums"][f] for f in FIGURES] if has_albums else []
            values += [res["faceloop"]["idcards"][f] for f in ID_FIGURES]
            figures = " ".join(
                f"{v:>18.4f}" if isinstance(v, float) else f"{v:>18}" for v in values
            )
            print(f"{label:<28} {figures}", flush=True)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(rnd.tasks_by_kind.items()))
        print(f"{'':<28} {rnd.tasks} tasks ({kinds})  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
