"""Does training on faceloop's labels make the recognizer better on people it has never seen?

The pure parts of ``faceloop loop-eval`` (faceloop/commands/loop_eval.py runs the refreshes and
the training around them):

- :func:`split_people`: a labelled folder's people, split *by person* (seeded) into train and
  test people, so no test person's face is ever in the training set;
- :func:`build_split`: album benchmarks (evaluation/benchmark.py) from each side, no ID cards;
- :func:`verification`: TAR at fixed false-accept rates on the test people's faces — every pair
  of labelled faces, genuine when both show the same person; the threshold at each FAR is read
  off that model's own impostor scores (evaluation/calibrate.threshold_at_far), so each model is
  judged at its own operating point;
- :func:`score_side`: verification plus the clustering figures of the faces table (pairwise
  precision/recall, coverage) that ``faceloop eval`` reports;
- :func:`format_table`: base and trained side by side.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.benchmark import (
    BenchmarkParams,
    Truth,
    build_benchmark,
    central_face_index,
    scan_labelled,
)
from evaluation.calibrate import pair_scores, tar_at, threshold_at_far
from evaluation.metrics import _rel_path, score_benchmark

SPLIT_FILE = "split.json"
SPLIT_FORMAT = "faceloop.loop_split/1"
FARS = (1e-3, 1e-4)
# Clustering figures shown in the table (all of score_albums' figures go to the JSON).
CLUSTER_KEYS = (
    "pairwise_precision",
    "pairwise_recall",
    "pairwise_f",
    "coverage",
    "coverage_recurring",
    "review_share",
    "split_share",
    "mixed_ids",
)


@dataclass(frozen=True)
class SplitParams:
    """How the labelled folder becomes train and test album benchmarks."""

    seed: int = 0
    test_share: float = 0.3  # share of the people (not of the images) kept for testing
    train_albums: int = 40
    test_albums: int = 20
    people_per_album: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def benchmark(self, side: str) -> BenchmarkParams:
        albums = self.train_albums if side == "train" else self.test_albums
        return BenchmarkParams(
            seed=self.seed,
            n_albums=albums,
            people_per_album=self.people_per_album,
            n_id_subjects=0,
        )


@dataclass
class Split:
    """Which people went where (as counts and the benchmarks' truth files; names stay in the
    benchmark folders, never in output)."""

    params: dict[str, Any]
    train_people: int
    test_people: int
    train_truth: Truth
    test_truth: Truth
    roots: dict[str, str] = field(default_factory=dict)

    def album_images(self, side: str) -> int:
        truth = self.train_truth if side == "train" else self.test_truth
        return sum(1 for r in truth.images.values() if r["kind"] == "album")

    def album_people(self, side: str) -> int:
        truth = self.train_truth if side == "train" else self.test_truth
        return len({r["person"] for r in truth.images.values() if r["kind"] == "album"})


def split_people(
    people: dict[str, list[Path]], seed: int, test_share: float
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(train people, test people): every person lands on exactly one side; the draw depends
    only on the sorted names and ``seed``. Both sides get people with one image and people with
    several in the same proportion."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    rng = random.Random(seed)
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Path]] = {}
    for group in (
        sorted(p for p, imgs in people.items() if len(imgs) >= 2),
        sorted(p for p, imgs in people.items() if len(imgs) < 2),
    ):
        rng.shuffle(group)
        k = round(test_share * len(group))
        for i, person in enumerate(group):
            (test if i < k else train)[person] = people[person]
    return train, test


def build_split(labelled: str | Path, out: str | Path, params: SplitParams) -> Split:
    """``out/train/bench`` and ``out/test/bench`` (album benchmarks from disjoint people) and
    ``out/split.json``. An ``out`` that already holds a split with the same parameters is
    reused as it is; one with other parameters is refused (``FileExistsError``)."""
    out = Path(out)
    roots = {side: str(out / side / "bench") for side in ("train", "test")}
    marker = out / SPLIT_FILE
    if marker.exists():
        data = json.loads(marker.read_text())
        if data.get("format") != SPLIT_FORMAT or data.get("params") != params.to_dict():
            raise FileExistsError(f"{out} holds a split with other parameters; use a fresh --out")
        return Split(
            params=data["params"],
            train_people=data["train_people"],
            test_people=data["test_people"],
            train_truth=Truth.load(roots["train"]),
            test_truth=Truth.load(roots["test"]),
            roots=roots,
        )
    people = scan_labelled(labelled)
    train, test = split_people(people, params.seed, params.test_share)
    truths = {}
    for side, members in (("train", train), ("test", test)):
        bench = Path(roots[side])
        if bench.exists():  # a build interrupted before split.json: start that side again
            import shutil

            shutil.rmtree(bench)
        truths[side] = build_benchmark(labelled, bench, params.benchmark(side), people=members)
    marker.write_text(
        json.dumps(
            {
                "format": SPLIT_FORMAT,
                "params": params.to_dict(),
                "train_people": len(train),
                "test_people": len(test),
            },
            indent=1,
        )
    )
    return Split(params.to_dict(), len(train), len(test), truths["train"], truths["test"], roots)


def disjoint(split: Split) -> bool:
    """True when no person has an image in both benchmarks."""

    def persons(t: Truth) -> set[str]:
        return {r["person"] for r in t.images.values()}

    return not persons(split.train_truth) & persons(split.test_truth)


def central_faces(faces: list[dict], truth: Truth, root: str) -> dict[str, dict | None]:
    """Album image (benchmark-relative path) -> its labelled face's row (the detection nearest
    the image centre, as ``faceloop eval`` scores it), or None when it was not detected."""
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for f in faces:
        by_rel[_rel_path(f["image_uri"], root)].append(f)
    out: dict[str, dict | None] = {}
    for rel, rec in sorted(truth.images.items()):
        if rec["kind"] != "album":
            continue
        cands = by_rel.get(rel, [])
        k = central_face_index([c["bbox"] for c in cands], rec["size"], frame=rec.get("frame"))
        out[rel] = cands[k] if k is not None else None
    return out


def verification(
    faces: list[dict], truth: Truth, root: str, fars: tuple[float, ...] = FARS
) -> dict[str, Any]:
    """TAR at each FAR over all pairs of the test people's labelled faces that have an
    embedding. Returns counts, and per FAR the threshold (from this model's impostor scores),
    how it was estimated and the TAR."""
    central = central_faces(faces, truth, root)
    rows = [
        (truth.images[rel]["person"], np.asarray(f["embedding"], np.float32))
        for rel, f in central.items()
        if f is not None and f.get("embedding") is not None
    ]
    if len(rows) < 2:
        raise ValueError("fewer than two test faces with an embedding: nothing to verify")
    persons = [p for p, _ in rows]
    emb = np.stack([e for _, e in rows])
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    genuine, impostor = pair_scores(emb, persons)
    out: dict[str, Any] = {
        "faces": len(rows),
        "people": len(set(persons)),
        "genuine_pairs": int(genuine.size),
        "impostor_pairs": int(impostor.size),
        "genuine_mean": float(genuine.mean()) if genuine.size else None,
        "impostor_mean": float(impostor.mean()) if impostor.size else None,
    }
    for far in fars:
        est = threshold_at_far(impostor, far)
        out[f"far_{far:g}"] = {
            "threshold": est.threshold,
            "method": est.method,
            "far_measured": est.far_measured,
            "tar": tar_at(genuine, est.threshold),
        }
    return out


def score_side(faces: list[dict], truth: Truth, root: str) -> dict[str, Any]:
    """Verification and clustering figures of one model's faces table on the test people."""
    scored = score_benchmark(faces, truth.images, truth.pairs, root, baseline=False)["faceloop"]
    return {
        "verification": verification(faces, truth, root),
        "clustering": scored["albums"],
        "detection": scored["detection"],
    }


def table_rows(results: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(figure, base, trained, trained - base) rows."""
    sides = ("base", "trained")
    rows: list[tuple[Any, ...]] = []

    def add(name: str, get: Any) -> None:
        vals = [get(results[s]) if s in results else None for s in sides]
        a, b = vals
        delta = b - a if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append((name, *vals, delta))

    add("genuine pairs", lambda r: r["verification"]["genuine_pairs"])
    add("impostor pairs", lambda r: r["verification"]["impostor_pairs"])
    for far in FARS:
        key = f"far_{far:g}"
        mark = " *" if _extrapolated(results, key) else ""
        add(f"TAR @ FAR {far:g}{mark}", lambda r, k=key: r["verification"][k]["tar"])
        add(f"  threshold @ FAR {far:g}", lambda r, k=key: r["verification"][k]["threshold"])
    add("genuine cosine, mean", lambda r: r["verification"]["genuine_mean"])
    add("impostor cosine, mean", lambda r: r["verification"]["impostor_mean"])
    for k in CLUSTER_KEYS:
        add(f"albums {k}", lambda r, k=k: r["clustering"][k])
    return rows


def _extrapolated(results: dict[str, dict[str, Any]], key: str) -> bool:
    """Whether a side's threshold at that FAR is an extrapolation (too few impostor pairs to
    measure it: :func:`evaluation.calibrate.threshold_at_far`)."""
    return any(r["verification"][key]["method"] != "empirical" for r in results.values())


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Base and trained figures side by side, with the difference; a footnote for TARs at
    thresholds extrapolated from too few impostor pairs."""
    rows = table_rows(results)
    width = max(len(r[0]) for r in rows)
    head = f"{'figure (test people only)':<{width}}  {'base':>10}  {'trained':>10}  {'delta':>10}"
    lines = [head]
    for name, *vals in rows:
        cells = []
        for i, v in enumerate(vals):
            if v is None:
                cells.append(f"{'-':>10}")
            elif isinstance(v, float):
                cells.append(f"{v:>+10.4f}" if i == len(vals) - 1 else f"{v:>10.4f}")
            else:
                cells.append(f"{v:>10}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    if any(_extrapolated(results, f"far_{far:g}") for far in FARS):
        lines.append(
            "* threshold extrapolated from the impostor scores' tail (fewer impostor pairs "
            "than the FAR can be measured on): an estimate, not a measurement"
        )
    return "\n".join(lines)
