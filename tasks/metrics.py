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
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Sequence

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
    cells = Counter(zip(p, truth))
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
    cells = Counter(zip(p, truth))
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
    for t, p in zip(truth, pred):
        if p is not None:
            ids[t].add(p)
            counts[t] += 1
    eligible = [t for t, c in counts.items() if c >= 2]
    return sum(1 for t in eligible if len(ids[t]) > 1), len(eligible)


def mixed_identities(truth: Sequence[Hashable], pred: Sequence[Hashable | None]) -> tuple[int, int]:
    """(identity ids that hold faces of more than one truth person, identity ids)."""
    _check(truth, pred)
    people: dict[Hashable, set[Hashable]] = defaultdict(set)
    for t, p in zip(truth, pred):
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


def score_albums(truth: Sequence[Hashable], pred: Sequence[Hashable | None],
                 status: Sequence[str | None] | None = None) -> AlbumScores:
    """All album figures at once. ``status`` (face status per item, ``None`` when the face was
    not detected) only feeds ``review_share``; without it that share is 0."""
    _check(truth, pred)
    n = len(truth)
    pw = pairwise_prf(truth, pred)
    bc = bcubed_prf(truth, pred)
    tcount = Counter(truth)
    recurring = [p for t, p in zip(truth, pred) if tcount[t] >= 2]
    split, split_den = split_identities(truth, pred)
    mixed, mixed_den = mixed_identities(truth, pred)
    reviewed = sum(1 for s in (status or []) if s == "review")
    return AlbumScores(
        faces=n,
        pairwise_precision=pw.precision, pairwise_recall=pw.recall, pairwise_f=pw.f,
        bcubed_precision=bc.precision, bcubed_recall=bc.recall, bcubed_f=bc.f,
        coverage=_ratio(sum(p is not None for p in pred), n, 0.0),
        coverage_recurring=_ratio(sum(p is not None for p in recurring), len(recurring), 0.0),
        review_share=_ratio(reviewed, n, 0.0),
        split_persons=split, split_share=_ratio(split, split_den, 0.0),
        mixed_ids=mixed, mixed_share=_ratio(mixed, mixed_den, 0.0),
    )


@dataclass(frozen=True)
class PairScores:
    """ID-card pair figures. Rates are shares of the genuine (or impostor) pairs."""

    genuine: int
    impostor: int
    tar: float  # genuine pairs auto-accepted
    far: float  # impostor pairs auto-accepted
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
    acc_g = sum(1 for x, y in zip(g, d) if x and y == ACCEPT)
    acc_i = sum(1 for x, y in zip(g, d) if not x and y == ACCEPT)
    rev_g = sum(1 for x, y in zip(g, d) if x and y == REVIEW)
    rev_i = sum(1 for x, y in zip(g, d) if not x and y == REVIEW)
    return PairScores(
        genuine=n_g, impostor=n_i,
        tar=_ratio(acc_g, n_g, 0.0), far=_ratio(acc_i, n_i, 0.0),
        genuine_review=_ratio(rev_g, n_g, 0.0), impostor_review=_ratio(rev_i, n_i, 0.0),
        review_share=_ratio(rev_g + rev_i, len(g), 0.0),
    )
