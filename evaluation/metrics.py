"""Label-quality metrics: how well predicted identities and ID-pair decisions match the truth.

Pure functions over plain sequences, so they can be checked against hand-computed cases.

Conventions (the same for every labeller scored, so comparisons are fair):

- An *item* is one truth face (one benchmark image's labelled face). ``pred`` holds the identity
  a labeller gave it, or ``None`` when it was not auto-labelled (sent to review, rejected, not
  detected). Unlabelled items count as singletons: they claim no pair, and they miss every true
  pair they belong to.
- Degenerate cases: a precision with nothing claimed is 1.0 (nothing wrong was said); a recall
  with nothing to find is 1.0; F is 0.0 when precision + recall is 0.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from faceloop.vocab import Status

# Decisions on one ID-card pair (ID photo vs one live photo).
ACCEPT, REVIEW, REJECT = "accept", "review", "reject"


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def _ratio(num: float, den: float, empty: float = 1.0) -> float:
    return num / den if den else empty


def f_score(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall; 0.0 when both are 0."""
    s = precision + recall
    return 2.0 * precision * recall / s if s > 0 else 0.0


def _singletonise(pred: Sequence[Hashable | None]) -> list[Hashable]:
    """Replace ``None`` labels by unique singleton labels (unlabelled items stand alone)."""
    return [p if p is not None else ("__single__", i) for i, p in enumerate(pred)]


def _check(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> None:
    if len(truth) != len(pred):
        raise ValueError(f"truth has {len(truth)} items, pred has {len(pred)}")


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f: float


def pairwise_prf(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> PRF:
    """Pairwise precision / recall / F over all item pairs.

    precision = pairs put together that share a truth person / pairs put together;
    recall = pairs put together that share a truth person / pairs that share a truth person.
    """
    _check(truth, pred)
    p = _singletonise(pred)
    cells = Counter(zip(p, truth, strict=False))
    tp = sum(_pairs(n) for n in cells.values())
    pred_pairs = sum(_pairs(n) for n in Counter(p).values())
    true_pairs = sum(_pairs(n) for n in Counter(truth).values())
    precision = _ratio(tp, pred_pairs)
    recall = _ratio(tp, true_pairs)
    return PRF(precision, recall, f_score(precision, recall))


def bcubed_prf(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> PRF:
    """BCubed precision / recall / F (Bagga & Baldwin), averaged over items.

    For item i with predicted cluster C and truth class L: precision_i = |C ∩ L| / |C|,
    recall_i = |C ∩ L| / |L|. Unlabelled items are singleton clusters (precision 1).
    """
    _check(truth, pred)
    if not truth:
        return PRF(1.0, 1.0, 1.0)
    p = _singletonise(pred)
    cells = Counter(zip(p, truth, strict=False))
    csize = Counter(p)
    lsize = Counter(truth)
    n = len(truth)
    # Each cell (C, L) holds m items, each with the same per-item precision and recall.
    precision = sum(m * m / csize[c] for (c, _), m in cells.items()) / n
    recall = sum(m * m / lsize[t] for (_, t), m in cells.items()) / n
    return PRF(precision, recall, f_score(precision, recall))


def split_identities(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> tuple[int, int]:
    """(persons whose auto-labelled faces carry more than one identity id,
    persons with at least two auto-labelled faces) — the second is the denominator."""
    _check(truth, pred)
    ids: dict[Hashable, set[Hashable]] = defaultdict(set)
    counts: Counter[Hashable] = Counter()
    for t, p in zip(truth, pred, strict=False):
        if p is not None:
            ids[t].add(p)
            counts[t] += 1
    eligible = [t for t, c in counts.items() if c >= 2]
    return sum(1 for t in eligible if len(ids[t]) > 1), len(eligible)


def mixed_identities(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> tuple[int, int]:
    """(identity ids that hold faces of more than one truth person, identity ids)."""
    _check(truth, pred)
    people: dict[Hashable, set[Hashable]] = defaultdict(set)
    for t, p in zip(truth, pred, strict=False):
        if p is not None:
            people[p].add(t)
    return sum(1 for s in people.values() if len(s) > 1), len(people)


@dataclass(frozen=True)
class AlbumScores:
    """Figures of one labeller on the album benchmark (see module docstring for conventions)."""

    faces: int  # truth faces scored (benchmark album images)
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    coverage: float  # share of truth faces auto-labelled
    coverage_recurring: float  # same, among faces whose person appears at least twice
    review_share: float  # share of truth faces sent to review
    split_persons: int
    split_share: float
    mixed_ids: int
    mixed_share: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def score_albums(
    truth: Sequence[Hashable],
    pred: Sequence[Hashable | None],
    status: Sequence[str | None] | None = None,
) -> AlbumScores:
    """All album figures at once. ``status`` (face status per item, ``None`` when the face was
    not detected) only feeds ``review_share``; without it that share is 0."""
    _check(truth, pred)
    n = len(truth)
    pw = pairwise_prf(truth, pred)
    bc = bcubed_prf(truth, pred)
    tcount = Counter(truth)
    recurring = [p for t, p in zip(truth, pred, strict=False) if tcount[t] >= 2]
    split, split_den = split_identities(truth, pred)
    mixed, mixed_den = mixed_identities(truth, pred)
    reviewed = sum(1 for s in (status or []) if s == Status.REVIEW)
    return AlbumScores(
        faces=n,
        pairwise_precision=pw.precision,
        pairwise_recall=pw.recall,
        pairwise_f=pw.f,
        bcubed_precision=bc.precision,
        bcubed_recall=bc.recall,
        bcubed_f=bc.f,
        coverage=_ratio(sum(p is not None for p in pred), n, 0.0),
        coverage_recurring=_ratio(sum(p is not None for p in recurring), len(recurring), 0.0),
        review_share=_ratio(reviewed, n, 0.0),
        split_persons=split,
        split_share=_ratio(split, split_den, 0.0),
        mixed_ids=mixed,
        mixed_share=_ratio(mixed, mixed_den, 0.0),
    )


@dataclass(frozen=True)
class PairScores:
    """ID-card pair figures. Rates are shares of the genuine (or impostor) pairs."""

    genuine: int
    impostor: int
    genuine_accepted: int  # genuine pairs auto-accepted (count)
    impostors_accepted: int  # impostor pairs auto-accepted (count)
    tar: float  # genuine pairs auto-accepted (share)
    far: float  # impostor pairs auto-accepted (share)
    genuine_review: float
    impostor_review: float
    review_share: float  # all pairs sent to review

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def score_pairs(genuine: Iterable[bool], decision: Iterable[str]) -> PairScores:
    """Score ID-pair decisions (``accept`` | ``review`` | ``reject``; anything else, such as a
    missing face, counts as not accepted and not reviewed) against genuine/impostor truth."""
    g = list(genuine)
    d = list(decision)
    if len(g) != len(d):
        raise ValueError(f"{len(g)} truths vs {len(d)} decisions")
    n_g = sum(g)
    n_i = len(g) - n_g
    acc_g = sum(1 for x, y in zip(g, d, strict=False) if x and y == ACCEPT)
    acc_i = sum(1 for x, y in zip(g, d, strict=False) if not x and y == ACCEPT)
    rev_g = sum(1 for x, y in zip(g, d, strict=False) if x and y == REVIEW)
    rev_i = sum(1 for x, y in zip(g, d, strict=False) if not x and y == REVIEW)
    return PairScores(
        genuine=n_g,
        impostor=n_i,
        genuine_accepted=acc_g,
        impostors_accepted=acc_i,
        tar=_ratio(acc_g, n_g, 0.0),
        far=_ratio(acc_i, n_i, 0.0),
        genuine_review=_ratio(rev_g, n_g, 0.0),
        impostor_review=_ratio(rev_i, n_i, 0.0),
        review_share=_ratio(rev_g + rev_i, len(g), 0.0),
    )


# --- Scoring a faces table against a benchmark truth -------------------------------------------


def _rel_path(uri: str, root: str) -> str:
    """Benchmark-relative path of an image URI (local path or ``file://`` URI)."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    path = unquote(urlparse(uri).path) if uri.startswith("file://") else uri
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path


def central_faces(
    faces: Sequence[Mapping[str, Any]], truth_images: Mapping[str, dict], root: str
) -> tuple[dict[str, Mapping[str, Any] | None], int]:
    """Each truth image's scored face (the detection nearest its centre,
    :func:`evaluation.benchmark.central_face_index`; None when it was missed) and how many other
    faces (background people) the truth images hold."""
    from evaluation.benchmark import central_face_index

    by_rel: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for f in faces:
        by_rel[_rel_path(f["image_uri"], root)].append(f)
    central: dict[str, Mapping[str, Any] | None] = {}
    background = 0
    for rel, rec in truth_images.items():
        cands = by_rel.get(rel, [])
        k = central_face_index([c["bbox"] for c in cands], rec["size"], frame=rec.get("frame"))
        central[rel] = cands[k] if k is not None else None
        background += len(cands) - (k is not None)
    return central, background


def score_claims(
    faces: Iterable[Mapping[str, Any]], truth_images: Mapping[str, Mapping]
) -> dict | None:
    """Duplicate claims (issue 14 point 3) against the truth: ``subjects_sharing_a_photo`` are
    the ID-card subjects one of whose ID or live photos was made from the same source photo as
    another subject's (identical, re-encoded, or with a stranger pasted in); ``claimed`` the
    subjects with a face in review as ``duplicate_claim``; ``caught`` / ``missed`` / ``false``
    compare the two. None when the truth does not record sources (a benchmark built before)."""
    from faceloop.vocab import DUPLICATE_CLAIM, row_reason_code

    by_source: dict[str, set[str]] = defaultdict(set)
    for rec in truth_images.values():
        if rec.get("kind") in ("id", "live") and rec.get("source"):
            by_source[rec["source"]].add(rec["group"])
    if not by_source:
        return None
    expected = {g for groups in by_source.values() if len(groups) > 1 for g in groups}
    claimed = {
        f["source_group"]
        for f in faces
        if f.get("source_kind") == "idcard" and row_reason_code(f) == DUPLICATE_CLAIM
    }
    return {
        "subjects_sharing_a_photo": len(expected),
        "claimed": len(claimed),
        "caught": len(expected & claimed),
        "missed": len(expected - claimed),
        "false": len(claimed - expected),
    }


# An ID pair's auto threshold from its two faces' qualities (None: the pair is never auto).
AcceptRule = Callable[[float, float], float | None]


def cross_match(
    central: Mapping[str, Mapping[str, Any] | None],
    truth_pairs: Sequence[Mapping[str, Any]],
    rule: AcceptRule,
) -> dict[str, float | int]:
    """Every subject's ID face against the live faces of the other subjects' pairs whose person
    is not the ID's (the eval's ~140 impostor pairs cannot tell a FAR of 1e-5 from 1e-4; this
    set is ~1,000 times larger): how many such impostor pairs score at or above the threshold
    ``rule`` gives them (a face without a quality counts as good). Central faces only (the
    ones the truth scores)."""
    import numpy as np

    ids: dict[str, tuple[str, np.ndarray, float]] = {}
    lives: dict[str, tuple[str, np.ndarray, float]] = {}
    for p in truth_pairs:
        for rel, person, out in (
            (p["id"], p["id_person"], ids),
            (p["live"], p["live_person"], lives),
        ):
            face = central.get(rel)
            if face is not None and face.get("embedding") is not None and rel not in out:
                e = np.asarray(face["embedding"], np.float32)
                q = face.get("quality")
                out[rel] = (
                    person,
                    e / max(float(np.linalg.norm(e)), 1e-12),
                    1.0 if q is None else q,
                )
    if not ids or not lives:
        return {"impostor_pairs": 0, "accepted": 0, "far": 0.0}
    id_rows, live_rows = list(ids.values()), list(lives.values())
    sims = np.stack([e for _, e, _ in id_rows]) @ np.stack([e for _, e, _ in live_rows]).T
    n = accepted = 0
    for i, (person_i, _, q_i) in enumerate(id_rows):
        for j, (person_j, _, q_j) in enumerate(live_rows):
            if person_i == person_j:
                continue
            n += 1
            th = rule(q_i, q_j)
            accepted += th is not None and bool(sims[i, j] >= th)
    return {"impostor_pairs": n, "accepted": accepted, "far": _ratio(accepted, n, 0.0)}


def score_benchmark(
    faces: list[dict],
    truth_images: dict[str, dict],
    truth_pairs: list[dict],
    root: str,
    baseline: bool = True,
    accept_rule: AcceptRule | None = None,
) -> dict[str, dict[str, Any]]:
    """Score faceloop's labels (and, with ``baseline``, the Immich-style anchor run on the same
    detections) against a benchmark truth.

    ``faces``: faces-table rows (``face_id, image_uri, source_kind, bbox, det_score, embedding,
    status, identity_id``). Each truth image's person is matched to the detection nearest the
    image centre (:func:`evaluation.benchmark.central_face_index`); other faces are background
    people
    and are not scored, but they do take part in clustering. A truth image without a central
    detection counts as an unlabelled face (album) or a ``no_face`` decision (ID pair).
    Returns ``{labeller: {"albums": {...}, "idcards": {...}, "detection": {...}}}``, and with
    ``accept_rule`` (faceloop's ID auto threshold) ``"idcards_cross"`` for each labeller: the
    impostor pairs of every ID against every other person's live photo over its threshold
    (:func:`cross_match`; the anchor's is its own 0.28).
    """
    import numpy as np

    from evaluation.baseline import cluster_albums, idcard_decision

    central, background = central_faces(faces, truth_images, root)

    base_ids: dict[str, str | None] = {}
    album = [f for f in faces if f["source_kind"] == "album" and f.get("embedding") is not None]
    if baseline and album:
        base_ids = cluster_albums(
            [f["face_id"] for f in album],
            np.asarray([f["embedding"] for f in album], dtype=np.float32).reshape(len(album), -1),
            [f["det_score"] for f in album],
        )

    album_rels = sorted(r for r, rec in truth_images.items() if rec["kind"] == "album")
    truth = [truth_images[r]["person"] for r in album_rels]
    fl_pred, fl_status, bl_pred = [], [], []
    for r in album_rels:
        c = central[r]
        ok = (
            c is not None
            and c["status"] in (Status.AUTO, Status.HUMAN)
            and c.get("identity_id") is not None
        )
        fl_pred.append(c["identity_id"] if ok and c is not None else None)
        fl_status.append(c["status"] if c is not None else None)
        bl_pred.append(base_ids.get(c["face_id"]) if c is not None else None)

    genuine, fl_dec, bl_dec = [], [], []
    for pair in truth_pairs:
        idf, live = central.get(pair["id"]), central.get(pair["live"])
        genuine.append(bool(pair["genuine"]))
        if live is None:
            fl_dec.append("no_face")
        else:
            fl_dec.append(
                {Status.AUTO: ACCEPT, Status.HUMAN: ACCEPT, Status.REVIEW: REVIEW}.get(
                    live["status"], REJECT
                )
            )
        bl_dec.append(
            idcard_decision(
                idf.get("embedding") if idf is not None else None,
                live.get("embedding") if live is not None else None,
            )
        )

    detected = sum(1 for c in central.values() if c is not None)
    detection = {
        "truth_images": len(central),
        "central_face_found": detected,
        "central_face_missed": len(central) - detected,
        "background_faces": background,
    }
    out: dict[str, dict[str, Any]] = {
        "faceloop": {
            "albums": score_albums(truth, fl_pred, fl_status).to_dict(),
            "idcards": score_pairs(genuine, fl_dec).to_dict(),
            "detection": detection,
        }
    }
    if accept_rule is not None:
        out["faceloop"]["idcards_cross"] = cross_match(central, truth_pairs, accept_rule)
    claims = score_claims(faces, truth_images)
    if claims is not None:
        out["faceloop"]["claims"] = claims
    if baseline:
        out["baseline"] = {
            "albums": score_albums(truth, bl_pred).to_dict(),
            "idcards": score_pairs(genuine, bl_dec).to_dict(),
            "detection": detection,
        }
        if accept_rule is not None:
            from evaluation.baseline import BaselineParams

            at = BaselineParams().idcard_accept
            out["baseline"]["idcards_cross"] = cross_match(central, truth_pairs, lambda qi, ql: at)
        if claims is not None:  # the anchor has no such check: it claims nothing
            n = claims["subjects_sharing_a_photo"]
            out["baseline"]["claims"] = {
                "subjects_sharing_a_photo": n,
                "claimed": 0,
                "caught": 0,
                "missed": n,
                "false": 0,
            }
    return out
