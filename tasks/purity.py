"""Purity checks that every machine label passes before it may be accepted (pure, no I/O).

Every face ends with a :class:`Decision`: status ``auto`` (goes to training sets), ``review``
(a human decides in Label Studio) or ``rejected`` (not worth anyone's time), and a reason that
starts with a stable code (``summarise`` counts by it). Human labels (status ``human``) are never
passed through here by the caller.

Thresholds (cosine similarities, :class:`faceloop.config.PolicyThresholds`):

- ``cohesion_min``: an identity's faces must be, on average, at least this similar to their
  identity centroid (each face measured against the centroid of the *other* faces, so small
  identities are not flattered by their own contribution). Below it the identity probably mixes
  people: every face goes to review, ``low_cohesion``.
- ``outlier``: a face less similar than this to the centroid of the other faces of its identity
  goes to review, ``outlier``.
- ``duplicate``: two identities whose centroids are at least this similar are probably one
  person (the cross-album merge, at the higher ``merge`` threshold, kept them apart): the
  smaller one (both when equal in size) goes to review, ``possible_duplicate_of <id>``; the
  larger one's labels are right whatever the answer. On a refresh the flag stays with the
  identity that carries it until that one outgrows the other by ``DUP_KEEP_RATIO``
  (:func:`flagged_in_pair`).

Other settings: identities with fewer than ``ClusterSettings.min_identity_faces`` faces go to
review (``too_few_faces``); faces with quality below ``QualitySettings.min_quality`` are
rejected and below ``auto_min_quality`` go to review (``low_quality``).

A person is in a photo once: when an identity would auto-label two or more faces of one photo
(twins side by side, a look-alike behind the subject), only the largest stays ``auto``; the
others go to review, ``same_photo``, with the identity proposed (:func:`one_face_per_photo`).

Faces in no identity (HDBSCAN noise nobody attached): a stranger seen once in one album is not
worth an annotator's minute, so it is ``rejected`` with ``unclustered_singleton``; if it is at
least ``outlier``-similar to some identity's centroid it may be that person, so it goes to
``review`` with ``unclustered_near_identity <id>`` and that identity proposed.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from faceloop.arrays import l2_normalize
from faceloop.config import ClusterSettings, PolicyThresholds, QualitySettings
from faceloop.vocab import (
    SAME_PHOTO,
    Reason,
    Status,
    compared,
    join_reasons,
    render_reason,
    threshold_text,
)

log = logging.getLogger(__name__)

# Neighbours fetched per identity centroid for the duplicate check (itself included); the
# search is tasks.cluster.knn, exact up to FLAT_MAX centroids and IVF beyond, never all-pairs.
_DUP_K = 4


@dataclass(frozen=True)
class Decision:
    """The machine's verdict on one face.

    ``identity_id`` is the label (auto) or the proposed label (review), None when there is none.
    ``score`` is the similarity the decision rests on (None when no similarity applies).
    ``code`` is the stable reason code (stored in ``reason_code``), ``detail`` the human-readable
    rest; ``reason`` renders both (:func:`faceloop.vocab.render_reason`).
    """

    face_id: str
    status: Status
    identity_id: str | None
    code: str
    detail: str = ""
    score: float | None = None

    @property
    def reason(self) -> str:
        """The rendered reason stored in the ``reason`` column."""
        return render_reason(self.code, self.detail)

    @classmethod
    def of(
        cls,
        face_id: str,
        status: Status,
        identity_id: str | None,
        reason: Reason,
        score: float | None = None,
    ) -> Decision:
        """A decision from a :class:`faceloop.vocab.Reason`."""
        return cls(face_id, status, identity_id, reason.code, reason.detail, score)


def summarise(decisions: Iterable[Decision]) -> dict[str, dict[str, int]]:
    """``{"status": {status: count}, "reason": {reason code: count}}``, keys sorted."""
    status: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for d in decisions:
        status[d.status] += 1
        codes[d.code] += 1
    return {"status": dict(sorted(status.items())), "reason": dict(sorted(codes.items()))}


# A look-alike flag moves to the other identity of its pair only when the one carrying it has
# grown past this many times the other's size (see flagged_in_pair).
DUP_KEEP_RATIO = 2.0


def flagged_in_pair(size: int, other: int, carried: bool, other_carried: bool) -> bool:
    """Whether, of two look-alike identities, the one of ``size`` faces is the one held back
    (``possible_duplicate_of`` the ``other``-sized one). ``carried`` / ``other_carried``: which
    of them carried the pair's flag before this run (both: a tie; neither: a new pair).

    A new pair flags the smaller one (both when equal). An existing flag stays where it is
    until the identity carrying it has grown past ``DUP_KEEP_RATIO`` times the other: either
    way exactly one of a look-alike pair is auto-labelled (ties: neither), and without that
    margin every refresh that adds a few faces of a person near a look-alike's size would move
    the flag -- every face of one of them out of the training set and the other's in, back and
    forth, with no new evidence that either label was wrong."""
    if carried and size <= DUP_KEEP_RATIO * other:
        return True
    if other_carried and other <= DUP_KEEP_RATIO * size:
        return False
    return size <= other


def _duplicate_of(
    cents: np.ndarray, sizes: np.ndarray, threshold: float, before: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each centroid, the most similar *other* centroid at cosine >= ``threshold`` that
    holds it back (index, cosine; :func:`flagged_in_pair`: without history, one at least as
    large); -1 / -inf if none among its ``_DUP_K`` nearest. Looking past the nearest neighbour
    matters: a small identity's nearest may be another small one while a large look-alike sits
    just behind it. ``before``: each identity's look-alike index before this run (-1: none)."""
    from tasks.cluster import knn  # same exact/IVF switch as the cross-album merge

    n = len(cents)
    idx = np.full(n, -1, np.int64)
    sim = np.full(n, -np.inf, np.float32)
    if n < 2:
        return idx, sim
    sims, nbrs = knn(np.ascontiguousarray(cents), _DUP_K)
    for i in range(n):
        for s, j in zip(sims[i].tolist(), nbrs[i].tolist(), strict=False):
            if j < 0 or j == i or s < threshold:
                continue
            if (
                sizes[i] <= sizes[j]
                if before is None
                else flagged_in_pair(
                    int(sizes[i]), int(sizes[j]), bool(before[i] == j), bool(before[j] == i)
                )
            ):
                idx[i], sim[i] = j, s
                break
    return idx, sim


def apply_purity(
    identity_members: Mapping[str, Sequence[int] | np.ndarray],
    emb: np.ndarray,
    quality: np.ndarray,
    th: PolicyThresholds,
    cluster_settings: ClusterSettings,
    quality_settings: QualitySettings,
    face_ids: Sequence[str] | None = None,
) -> list[Decision]:
    """One decision per face ``0..n-1`` of ``emb`` (returned in that order).

    ``identity_members`` maps identity_id to row indices of ``emb`` / ``quality``; a row may
    belong to at most one identity; rows in none are unclustered. ``face_ids`` names the rows
    (default: the row index as a string). A face is ``auto`` only when every check passes; its
    reason is then ``auto_identity``, naming the check passed, not the figures (they drift as
    the identity grows; the similarity is in ``score``). Otherwise the reason lists every failed
    check, the deciding one (rejection before review) first. Deterministic.
    """
    x = l2_normalize(emb) if len(emb) else np.zeros((0, 1), np.float32)
    n = len(x)
    q = np.asarray(quality, dtype=np.float32)
    if len(q) != n:
        raise ValueError(f"quality has {len(q)} rows, embeddings {n}")
    fids = [str(i) for i in range(n)] if face_ids is None else list(face_ids)
    if len(fids) != n:
        raise ValueError(f"face_ids has {len(fids)} entries, embeddings {n}")

    owner = np.full(n, -1, np.int64)
    names = sorted(identity_members)
    members: list[np.ndarray] = []
    for k, name in enumerate(names):
        idx = np.unique(np.asarray(identity_members[name], dtype=np.int64))
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"identity {name}: member index out of range")
        if (owner[idx] >= 0).any():
            raise ValueError(f"identity {name}: a face belongs to two identities")
        owner[idx] = k
        members.append(idx)

    # Per identity: centroid, leave-one-out similarity of each member, cohesion.
    d = x.shape[1]
    cents = np.zeros((len(names), d), np.float32)
    loo_sim = np.full(n, np.nan, np.float32)
    cohesion = np.zeros(len(names), np.float32)
    for k, idx in enumerate(members):
        if len(idx) == 0:
            continue
        total = x[idx].sum(axis=0)
        cents[k] = total / max(float(np.linalg.norm(total)), 1e-12)
        if len(idx) == 1:
            loo_sim[idx] = 1.0  # nothing to compare with; too_few_faces decides
            cohesion[k] = 1.0
            continue
        loo = total[None, :] - x[idx]
        s = np.einsum("ij,ij->i", x[idx], loo) / np.maximum(np.linalg.norm(loo, axis=1), 1e-12)
        loo_sim[idx] = s
        cohesion[k] = float(s.mean())
    dup_idx, dup_sim = _duplicate_of(cents, np.array([len(m) for m in members]), th.duplicate)

    identity_problems = [
        problems_of_identity(
            len(idx),
            float(cohesion[k]),
            names[dup_idx[k]] if dup_idx[k] >= 0 else None,
            float(dup_sim[k]),
            th,
            cluster_settings,
        )
        for k, idx in enumerate(members)
    ]

    # Unclustered faces: nearest identity centroid, for a proposal.
    unclustered = np.nonzero(owner < 0)[0]
    near_k = np.full(n, -1, np.int64)
    near_s = np.full(n, -np.inf, np.float32)
    near_k[unclustered], near_s[unclustered] = nearest_centroid(x[unclustered], cents)

    out: list[Decision] = []
    for i in range(n):
        k = int(owner[i])
        kk = int(near_k[i])
        out.append(
            decide_face(
                fids[i],
                float(q[i]),
                names[k] if k >= 0 else None,
                len(members[k]) if k >= 0 else 0,
                float(loo_sim[i]),
                identity_problems[k] if k >= 0 else [],
                names[kk] if kk >= 0 else None,
                float(near_s[i]),
                th,
                quality_settings,
            )
        )
    log.info("purity: %s", summarise(out)["status"])
    return out


def one_face_per_photo(
    decisions: Iterable[Decision],
    photo_of: Mapping[str, str | None],
    size_of: Mapping[str, float],
) -> list[Decision]:
    """``decisions`` (in their order) with at most one ``auto`` face per identity and photo.

    ``photo_of`` maps a face id to its photo (the image's sha256; faces without one are left
    alone), ``size_of`` to its size in pixels (``face_px``). One person appears in a photo once,
    so when an identity holds two or more auto faces of one photo, at least one of them is
    someone else. The largest stays auto -- the photo's subject, as the ID check's live photos
    assume (two faces that both pass the identity's checks are alike: twins side by side, a
    look-alike behind the subject, and similarity cannot tell which is the person the identity
    was built from); ties go to the more similar (``score``), then the smaller face id. The
    others go to review with reason ``same_photo`` and the identity proposed, for an annotator
    to say who they are."""
    out = list(decisions)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k, d in enumerate(out):
        photo = photo_of.get(d.face_id)
        if d.status == Status.AUTO and d.identity_id is not None and photo:
            groups[(d.identity_id, photo)].append(k)

    def size(k: int) -> float:
        return float(size_of.get(out[k].face_id, 0.0))

    def score(k: int) -> float:
        v = out[k].score
        return -2.0 if v is None else float(v)  # a cosine is >= -1

    for (ident, _), ks in groups.items():
        if len(ks) < 2:
            continue
        ranked = sorted(ks, key=lambda k: (-size(k), -score(k), out[k].face_id))
        kept = size(ranked[0])
        for k in ranked[1:]:
            d = out[k]
            out[k] = Decision(
                d.face_id,
                Status.REVIEW,
                ident,
                SAME_PHOTO,
                f"a larger face of this photo ({kept:.0f} px against {size(k):.0f}) is {ident}",
                d.score,
            )
    return out


# Rows of the face x centroid product taken at once in nearest_centroid: the product streams
# every centroid through memory once per block (one product per album of ~1 unclustered face
# against 50,000 centroids was most of the label stage's decide pass at 10^6 faces), and a
# block stays ~64 MB.
_NEAR_CELLS = 16 << 20


def nearest_centroid(x: np.ndarray, cents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the most similar row of ``cents`` per row of ``x`` (-1 without centroids) and
    its cosine (-inf); exact, in blocks of rows (_NEAR_CELLS)."""
    near_k = np.full(len(x), -1, np.int64)
    near_s = np.full(len(x), -np.inf, np.float32)
    if len(x) and len(cents):
        step = max(1, _NEAR_CELLS // len(cents))
        for lo in range(0, len(x), step):
            sims = x[lo : lo + step] @ cents.T
            k = sims.argmax(axis=1)
            near_k[lo : lo + step] = k
            near_s[lo : lo + step] = sims[np.arange(len(k)), k]
    return near_k, near_s


def problems_of_identity(
    size: int,
    cohesion: float,
    dup_name: str | None,
    dup_sim: float,
    th: PolicyThresholds,
    cluster_settings: ClusterSettings,
) -> list[Reason]:
    """Why none of an identity's faces may be auto-labelled (empty: nothing against it).

    ``size`` is its member count, ``cohesion`` the mean leave-one-out similarity, ``dup_name`` /
    ``dup_sim`` the larger look-alike identity found by the duplicate check (None: none)."""
    probs: list[Reason] = []
    if size < cluster_settings.min_identity_faces:
        probs.append(Reason("too_few_faces", f"{size} < {cluster_settings.min_identity_faces}"))
    if size > 1 and cohesion < th.cohesion_min:
        probs.append(
            Reason(
                "low_cohesion",
                f"mean similarity to centroid {compared(cohesion, '<', th.cohesion_min)}",
            )
        )
    # Two identities that may be one person: only one is held back -- the smaller when the
    # pair is first seen (ties: both), and it stays so until it outgrows the other twice
    # (flagged_in_pair). The larger one's labels are right either way -- "same person" folds
    # the smaller into it, "different" changes nothing -- while the smaller one, auto-labelled,
    # would put one person under two labels. (LFW: George W. Bush, 524 faces, vs Jeb Bush, 12.)
    if dup_name is not None:
        probs.append(
            Reason(
                "possible_duplicate_of",
                f"{dup_name}: centroid similarity {compared(dup_sim, '>=', th.duplicate)}",
            )
        )
    return probs


def loo_similarity(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Each unit row of ``x`` against the normalised ``total`` of its identity without itself
    (``total`` is the sum of all the identity's unit rows); 1.0 for an identity of one face."""
    loo = total[None, :] - x
    s = np.einsum("ij,ij->i", x, loo) / np.maximum(np.linalg.norm(loo, axis=1), 1e-12)
    return np.asarray(s, np.float32)


def decide_face(
    face_id: str,
    quality: float,
    identity: str | None,
    identity_size: int,
    loo_sim: float,
    identity_problems: Sequence[Reason],
    near_identity: str | None,
    near_sim: float,
    th: PolicyThresholds,
    quality_settings: QualitySettings,
) -> Decision:
    """The decision on one face: ``identity`` is the identity it belongs to (None: unclustered),
    ``identity_size`` its member count, ``loo_sim`` its similarity to the identity's centroid
    without itself, ``identity_problems`` (:func:`problems_of_identity`); for an unclustered face
    ``near_identity`` / ``near_sim`` are the nearest identity centroid (None: no identities)."""
    rejects: list[Reason] = []
    reviews: list[Reason] = []
    if quality < quality_settings.min_quality:
        rejects.append(Reason("low_quality", compared(quality, "<", quality_settings.min_quality)))
    elif quality < quality_settings.auto_min_quality:
        reviews.append(
            Reason(
                "low_quality",
                f"{quality:.2f} < auto minimum {quality_settings.auto_min_quality:.2f}",
            )
        )
    score: float | None
    if identity is None:
        if near_identity is not None and near_sim >= th.outlier:
            reviews.insert(
                0,
                Reason(
                    "unclustered_near_identity",
                    f"{near_identity}: similarity {compared(near_sim, '>=', th.outlier)}",
                ),
            )
            ident, score = near_identity, near_sim
        else:
            best = f"best {near_sim:.2f}" if near_identity is not None else "no identities"
            rejects.append(
                Reason(
                    "unclustered_singleton",
                    f"no identity within {threshold_text(th.outlier)} ({best})",
                )
            )
            ident, score = None, (near_sim if near_identity is not None else None)
    else:
        ident, score = identity, loo_sim
        reviews += identity_problems
        if identity_size > 1 and loo_sim < th.outlier:
            reviews.append(
                Reason(
                    "outlier",
                    f"similarity to identity centroid {compared(loo_sim, '<', th.outlier)}",
                )
            )
    if rejects:
        return Decision.of(
            face_id,
            Status.REJECTED,
            ident if identity is not None else None,
            join_reasons(rejects + reviews),
            score,
        )
    if reviews:
        return Decision.of(face_id, Status.REVIEW, ident, join_reasons(reviews), score)
    # The auto reason names the check passed, not the figures: the face's similarity (in
    # ``score``) and its identity's size drift as the identity grows, and a reason restating
    # them would change -- and rewrite the face's group file -- on every refresh that adds a
    # face of that person anywhere, although nothing about the decision changed.
    return Decision(
        face_id,
        Status.AUTO,
        ident,
        "auto_identity",
        f"similarity to centroid >= {threshold_text(th.outlier)}",
        score,
    )
