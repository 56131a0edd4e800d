"""Play careful annotators against a running Label Studio, answering from a ground truth.

For each task that faceloop pushed (``<store>/tables/reviews/tasks``) and nobody answered yet,
the script reads the task from Label Studio (its data and the model's prediction), looks up
the faces it covers in the store's task record, maps every shown face to its TRUE person and
submits the answer a careful annotator would give, through label-studio-sdk 2.x exactly as a
person's click would arrive (``annotations.create``):

- ``idcard_pair``: same person -> ``same_person``; different -> ``different_person``; a face
  whose person is unknown -> ``not_usable``.
- ``cluster_check``: the majority person of the grid is the identity; every face whose person
  differs (an ``unknown`` background face included) is ticked, verdict
  ``marked_do_not_belong``; nothing to tick -> ``all_belong``. A grid with no known person
  is skipped (a person could not tell either; counted, left unanswered).
- ``duplicate``: majority person of grid A vs of grid B -> ``same_person`` /
  ``different_person`` (no known person on a side -> skipped).

Truth for an album built from a labelled folder (LFW: ``<album>/<file>`` symlinks to
``<root>/<Person_Name>/<file>``): the person of an image is the folder name of the symlink
target; within the image the face nearest the centre is that person
(:func:`evaluation.benchmark.central_face_index`, the rule faceloop's eval uses), other faces are
``unknown``. Pass another ``image_uri -> person`` function to :func:`simulate` for other data.

Prints counts only; never crops, embeddings or image data.

    .venv/bin/python examples/simulate_annotators.py --store var/lfw-review/store \\
        --data-dir var/lfw-review/ls --url http://127.0.0.1:8080 [--limit N] [--error-rate 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image
from pydantic import SecretStr

from annotate import render, server
from annotate import review as rv
from annotate.client import ReviewClient
from annotate.records import read_task_records
from annotate.sync import ls_key
from evaluation.benchmark import central_face_index
from faceloop.config import load_settings
from storage.objectstore import open_store
from storage.tables import read_faces

UNKNOWN = "unknown"


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def lfw_person(image_uri: str) -> str | None:
    """The person of an album image that links into a labelled folder: the folder name of the
    symlink target (``.../<Person_Name>/<Person_Name>_0001.jpg``)."""
    p = _path(image_uri)
    try:
        return p.resolve(strict=True).parent.name
    except OSError:
        return None


def face_truth(
    faces: Sequence[Mapping[str, Any]], person_of_image: Callable[[str], str | None] = lfw_person
) -> dict[str, str]:
    """face_id -> true person (``unknown`` for background faces and unlabelled images), by the
    central-face rule: per image, the detection nearest the centre shows the image's person."""
    by_image: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for f in faces:
        by_image[f["image_uri"]].append(f)
    truth: dict[str, str] = {}
    for uri, group in by_image.items():
        person = person_of_image(uri)
        central = None
        if person and all(f.get("bbox") is not None for f in group):
            try:
                with Image.open(_path(uri)) as im:
                    size = im.size  # header only
            except OSError:
                size = None
            if size:
                central = central_face_index([f["bbox"] for f in group], size)
        for i, f in enumerate(group):
            truth[f["face_id"]] = person if (person and i == central) else UNKNOWN
    return truth


def _majority(persons: Sequence[str]) -> str | None:
    known = Counter(p for p in persons if p != UNKNOWN)
    if not known:
        return None
    return known.most_common(1)[0][0]


def decide(rec: Mapping[str, Any], truth: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The careful answer for one task record: (decision, ticked numbers 1..N) or (None, [])
    when a person could not tell from the truth either."""
    shown = list(rec["shown"])
    persons = [truth.get(f, UNKNOWN) for f in shown]
    kind = rec["kind"]
    if kind == "idcard_pair":
        id_p, live_p = persons[0], persons[1]
        if UNKNOWN in (id_p, live_p):
            return rv.NOT_USABLE, []
        return (rv.SAME if id_p == live_p else rv.DIFFERENT), []
    if kind == "cluster_check":
        top = _majority(persons)
        if top is None:
            return None, []
        ticked = [str(i + 1) for i, p in enumerate(persons) if p != top]
        return (rv.REMOVE_MARKED if ticked else rv.CONFIRM), ticked
    # duplicate: the same split as annotate.render.build_task
    half = len(shown) // 2 or 1
    a, b = _majority(persons[:half]), _majority(persons[half:] or persons[:1])
    if a is None or b is None:
        return None, []
    return (rv.SAME if a == b else rv.DIFFERENT), []


def _flip(
    kind: str, decision: str, ticked: list[str], n: int, rng: random.Random
) -> tuple[str, list[str]]:
    """A plausible mistake: the other binary answer, or one face ticked/unticked."""
    if kind == "cluster_check":
        i = str(rng.randint(1, n))
        ticked = sorted(set(ticked) ^ {i}, key=int)
        return (rv.REMOVE_MARKED if ticked else rv.CONFIRM), ticked
    if kind == "idcard_pair":
        return (rv.DIFFERENT if decision == rv.SAME else rv.SAME), ticked
    return (rv.DIFFERENT if decision == rv.SAME else rv.SAME), ticked


def result_for(kind: str, decision: str, ticked: list[str]) -> list[dict[str, Any]]:
    """The annotation result Label Studio stores for a click on the task view."""
    if kind == "idcard_pair":
        return [render.choice("decision", "live_face", [decision])]
    if kind == "cluster_check":
        out = [render.choice("verdict", "grid", [decision])]
        if ticked:
            out.insert(0, render.choice("outliers", "grid", ticked))
        return out
    return [render.choice("decision", "grid_a", [decision])]


def _prediction_choice(task: Any) -> str | None:
    for p in task.predictions or []:
        p = p if isinstance(p, dict) else p.dict()
        for r in p.get("result") or []:
            if r.get("from_name") in ("decision", "verdict"):
                return ((r.get("value") or {}).get("choices") or [None])[0]
    return None


def simulate(
    client: ReviewClient,
    store: Any,
    *,
    limit: int | None = None,
    error_rate: float = 0.0,
    seed: int = 0,
    person_of_image: Callable[[str], str | None] = lfw_person,
) -> dict[str, Any]:
    rng = random.Random(seed)
    records = [r for r in read_task_records(store).to_pylist() if r["task_id"] is not None]
    faces = read_faces(store, columns=["face_id", "image_uri", "bbox"]).to_pylist()
    # Truth only for images that tasks show (all faces of those images, for the centre rule).
    shown_ids = {f for r in records for f in r["shown"]}
    uris = {f["image_uri"] for f in faces if f["face_id"] in shown_ids}
    truth = face_truth([f for f in faces if f["image_uri"] in uris], person_of_image)

    stats: dict[str, Any] = {
        "answered": Counter(),
        "skipped_no_truth": Counter(),
        "already_answered": Counter(),
        "decisions": Counter(),
        "agrees_with_prediction": Counter(),
        "errors_injected": 0,
        "faces_ticked": 0,
        "shown_unknown": 0,
        "shown_known": 0,
    }
    by_project: dict[int, dict[int, Any]] = {}
    for pid in sorted({r["project_id"] for r in records}):
        by_project[pid] = {
            int(t.id): t
            for t in client.call(
                "list tasks", lambda pid=pid: list(client.sdk.tasks.list(project=pid, fields="all"))
            )
        }
    t0 = time.monotonic()
    n = 0
    for rec in sorted(records, key=lambda r: (r["kind"], r["key"])):
        if limit is not None and n >= limit:
            break
        task = by_project[rec["project_id"]].get(rec["task_id"])
        # Tasks carry the key's pseudonym (annotate.sync.ls_key), not the key.
        if task is None or (task.data or {}).get(render.KEY_FIELD) != ls_key(store, rec["key"]):
            raise SystemExit(f"task {rec['task_id']} does not carry key {rec['key']}")
        kind = rec["kind"]
        if (task.total_annotations or 0) > 0:
            stats["already_answered"][kind] += 1
            continue
        persons = [truth.get(f, UNKNOWN) for f in rec["shown"]]
        stats["shown_unknown"] += persons.count(UNKNOWN)
        stats["shown_known"] += len(persons) - persons.count(UNKNOWN)
        decision, ticked = decide(rec, truth)
        if decision is None:
            stats["skipped_no_truth"][kind] += 1
            continue
        if error_rate > 0 and rng.random() < error_rate:
            decision, ticked = _flip(kind, decision, ticked, len(rec["shown"]), rng)
            stats["errors_injected"] += 1
        result = result_for(kind, decision, ticked)
        client.call(
            "annotate",
            lambda tid=rec["task_id"], result=result: client.sdk.annotations.create(
                id=tid, result=result, lead_time=1.0
            ),
        )
        n += 1
        stats["answered"][kind] += 1
        stats["decisions"][f"{kind}:{decision}"] += 1
        stats["faces_ticked"] += len(ticked)
        pred = _prediction_choice(task)
        stats["agrees_with_prediction"][f"{kind}:{'yes' if pred == decision else 'no'}"] += 1
    stats["seconds"] = round(time.monotonic() - t0, 2)
    stats["tasks_seen"] = len(records)
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--data-dir", default=None, help="Label Studio data dir (reads admin-token)")
    p.add_argument("--url", default=None, help="Label Studio URL (default: review.url setting)")
    p.add_argument("--limit", type=int, default=None, help="answer at most N tasks")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of answers made wrong")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    review: dict[str, Any] = {}
    if args.url:
        review["url"] = args.url
    token = os.environ.get("FACELOOP_REVIEW__TOKEN") or server.read_token(
        args.data_dir or server.DEFAULT_DATA_DIR
    )
    if token:
        review["token"] = SecretStr(token)
    settings = load_settings(args.config, store=args.store)
    settings.review = settings.review.model_copy(update=review)
    client = ReviewClient(settings.review)
    out = simulate(
        client,
        open_store(settings.store),
        limit=args.limit,
        error_rate=args.error_rate,
        seed=args.seed,
    )
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
