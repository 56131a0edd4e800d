"""ID-card subjects: does the person in the live photos match the person on the ID photo?

A subject is one ID photo (tight crop of an ID document) plus one or more live photos, all
claimed to show one person, ``subject_id``. Pure function of embeddings and face metadata.

Rules (thresholds are cosine similarities from :class:`faceloop.config.PolicyThresholds`):

- ID photo with no face: nothing to compare with, the subject is broken input: every live face is
  ``quarantined`` with ``idcard_no_face_in_id_photo``; when the caller knows the ID photo is
  missing or unusable (empty, corrupt, unreadable, a copy), with that reason instead
  (``idcard_no_id_photo``, passed as ``no_id_photo``).
- Several ID photos in one subject folder (``id.jpg`` and ``id.png``): tasks/label.relabel sends
  the subject's faces to review (``idcard_several_id_photos``), each photo's largest face too;
  this function, given their faces pooled, would take the smaller photo's holder for a ghost.
- ID photo with several faces: many ID documents print a small second "ghost" portrait of the
  holder, so when the largest face is clearly dominant (area >= ``DOMINANT_AREA_RATIO`` x the
  next), or every other face is the same person (cosine >= ``idcard_accept`` to it: a large
  ghost), it is the ID face and the others are ``rejected`` (``idcard_secondary_face_in_id_photo``).
  A ghost is the holder: a second face of judgeable quality (>= ``idcard_min_quality``), whole
  inside the photo (a face cut by its edge is a bystander in a tight crop), that is
  *not* the main face's person (cosine < ``idcard_accept``) is what a substituted portrait (the
  forger's face over the holder's, the ghost left as it was) or a selfie holding someone else's
  card looks like: nothing of the subject is auto then; the ID faces and every live face that
  would have been auto go to ``review`` (``idcard_id_faces_disagree``).
  Otherwise we cannot tell whose ID it is: all ID faces and live faces go to ``review``
  (``idcard_multiple_faces_in_id_photo``) with the best similarity as score, except live faces
  that match none of them (< ``idcard_review``), which are rejected (``idcard_mismatch``).
- In a live photo the claimed person is the largest face that reaches the pair's auto
  threshold; failing that, the largest face that *matches* the ID face (cosine >=
  ``idcard_review`` and quality >= ``idcard_min_quality``); failing that, the largest face (ties:
  higher det_score, then smaller face_id). A bystander nearer the camera, matching or scoring
  in the review band by chance, does not hide the subject. Other faces are ``rejected``:
  ``not_the_largest_face_in_live_photo`` when the claimed face is the largest,
  ``not_the_matching_face_in_live_photo`` when a smaller face matched.
  Every face of the photo is compared, so an impostor photo gets as many tries as it has faces
  (the per-photo false-accept rate is at most that many times the per-pair rate).
- cosine(ID face, live face) >= ``idcard_accept``: ``auto`` with identity ``subject_id``;
  ``idcard_review`` <= cosine < ``idcard_accept``: ``review``; below: ``rejected``.
- Quality (``quality.idcard_*``, apart from the album gates): a pair whose ID face or live face
  is below ``idcard_low_quality`` is auto only at
  ``idcard_accept_low_quality`` (a stricter threshold calibrated at the same false-accept rate
  on low-quality pairs alone, whose impostor scores spread wider; None: never auto). Short of
  it, a live face below ``idcard_min_quality`` is rejected (``low_quality``) and one above goes to
  review (``idcard_low_quality``), as does a pair whose ID face is the poor one.
- Several live photos: a claimed live face in the review band (good quality both sides) is
  ``auto`` when it matches, at ``idcard_live_match`` or above, the claimed face of another live
  photo of the subject that was auto on its own (None: off). Calibrated so that the impostor
  faces it lets through, with a genuine accepted photo beside them, keep the ID pairs' FAR.
- The ID face itself: ``auto`` when at least one live face is auto, ``review`` otherwise
  (``idcard_unconfirmed`` / ``idcard_no_live_face``): an unmatched ID is worth a human's look.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from faceloop.config import PolicyThresholds, QualitySettings
from faceloop.vocab import Reason, Status, compared
from tasks.purity import Decision

log = logging.getLogger(__name__)

# The largest ID-photo face counts as the holder when its bbox area is at least this many times
# the next largest (2x area ~ 1.4x side; ghost portraits are typically a quarter of the area).
DOMINANT_AREA_RATIO = 2.0


@dataclass(frozen=True)
class FaceInfo:
    """One detected face: what the ID-card rules need."""

    face_id: str
    embedding: np.ndarray  # (d,) L2-normalised float32
    area: float  # bbox area in pixels
    quality: float
    det_score: float
    # The box touches the photo's edge: a face cut by the frame (a bystander half in a tight
    # crop), not a portrait printed on the document.
    cut: bool = False


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)


def _corroborate(
    live_out: list[Decision],
    claimed: list[tuple[int, FaceInfo]],
    live_match: float,
    ref: FaceInfo,
    auto_min: float,
) -> bool:
    """Several live photos of one person vouch for each other: a claimed live face in the review
    band (``idcard_review`` decision: between review and accept, both faces of good quality)
    becomes auto when it matches, at ``live_match`` or above, the claimed face of another live
    photo that was auto on its own. Changes ``live_out`` in place; True when any changed."""
    anchors = [f for i, f in claimed if live_out[i].status == Status.AUTO]
    changed = False
    for i, face in claimed:
        d = live_out[i]
        if d.code != "idcard_review" or min(face.quality, ref.quality) < auto_min:
            continue
        best = max(
            (_cos(face.embedding, a.embedding) for a in anchors if a.face_id != face.face_id),
            default=-1.0,
        )
        if best >= live_match:
            live_out[i] = Decision(
                face.face_id,
                Status.AUTO,
                d.identity_id,
                "idcard_accept",
                f"cosine {d.score:.2f} to the ID, corroborated by an accepted live photo "
                f"(cosine {compared(best, '>=', live_match)})",
                d.score,
            )
            changed = True
    return changed


# ---- A live photo that is the ID picture re-photographed (a phone photo of the card, a screen)
#
# Such a photo embeds like a capture of the person (cosine 0.8-0.99 to the ID face) and was
# auto-accepted; what gives it away is that it is the same picture: the aligned crops match pixel
# by pixel, up to a small shift and turn (the re-photo's perspective), where another capture of
# the person differs in expression, light and pose. The score (docs/QUALITY.md, "A live photo
# that is the ID picture re-photographed"): the normalised cross-correlation of the two crops'
# band-passed grey images (difference of Gaussians, sigma 1 - 3) over the inner face region,
# on the ID crop's pixels that lie inside its photo (alignment pads a tight chip with black),
# the best over shifts of +-3 px and turns of +-3 degrees of the live crop. On lfw-dev (150
# people, 1,164 genuine pairs, 573 simulated re-photos): genuine pairs 0.02-0.79 (99% below
# 0.69, same-session near-duplicates at the top), re-photos median 0.91; at REPHOTO_SCORE 3
# genuine pairs of 1,164 reach it and 78% of the re-photos the cosine alone accepted do.
REPHOTO_SCORE = 0.75
_INNER = (slice(16, 108), slice(16, 96))  # rows, columns of the 112 x 112 crop
_SEARCH_PX = 3
_SEARCH_DEG = (-3, -2, -1, 0, 1, 2, 3)


def _dog(g: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(g, (0, 0), 1.0) - cv2.GaussianBlur(g, (0, 0), 3.0)


def inside_mask(landmarks: np.ndarray, width: int, height: int, erode: int) -> np.ndarray:
    """The pixels of a face's aligned 112 x 112 crop that come from inside its photo (the
    alignment pads beyond the photo's edge), eroded by ``erode`` pixels."""
    import cv2

    from tasks.align import alignment_matrix

    m = cv2.warpAffine(
        np.ones((int(height), int(width)), np.float32),
        alignment_matrix(np.asarray(landmarks, np.float64).reshape(5, 2)),
        (112, 112),
    )
    v: np.ndarray = (m > 0.999).astype(np.uint8)
    if erode:
        v = np.asarray(cv2.erode(v, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)))
    return v.astype(bool)


def same_picture_score(
    id_crop: np.ndarray, id_landmarks: np.ndarray, id_size: tuple[int, int], live_crop: np.ndarray
) -> float:
    """How much the live face's aligned crop is the ID face's picture (see REPHOTO_SCORE):
    crops are 112 x 112 BGR (or grey) uint8 as the faces table stores them; ``id_size`` is the ID
    photo's (width, height) and ``id_landmarks`` its face's five points, in that photo. The live
    crop is also compared mirrored: a front camera's photo of the card is the picture mirrored
    (the aligned crop of a mirrored face is the mirrored crop: the alignment template is
    symmetric to a fraction of a pixel), which scored like another capture. On the lfw-dev
    measurement the mirrored comparison of genuine pairs reached at most 0.68."""
    import cv2

    def grey(c: np.ndarray) -> np.ndarray:
        c = np.asarray(c)
        return (cv2.cvtColor(c, cv2.COLOR_BGR2GRAY) if c.ndim == 3 else c).astype(np.float32)

    ga, gb = grey(id_crop), grey(live_crop)
    rows, cols = _INNER
    mask = inside_mask(id_landmarks, id_size[0], id_size[1], 7)[rows, cols]
    if mask.sum() < 500:  # a chip cut close around the face: the lightly eroded mask
        mask = inside_mask(id_landmarks, id_size[0], id_size[1], 1)[rows, cols]
    if mask.sum() < 100:
        return 0.0
    t = _dog(ga)[rows, cols][mask]
    t = t - t.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn == 0:
        return 0.0
    best = -1.0
    r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
    for live, deg in ((g, d) for g in (gb, gb[:, ::-1].copy()) for d in _SEARCH_DEG):
        turn = cv2.getRotationMatrix2D((56, 56), deg, 1.0)
        fb = _dog(
            cv2.warpAffine(
                live, turn, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
        )
        for dy in range(-_SEARCH_PX, _SEARCH_PX + 1):
            for dx in range(-_SEARCH_PX, _SEARCH_PX + 1):
                w = fb[r0 + dy : r1 + dy, c0 + dx : c1 + dx][mask]
                w = w - w.mean()
                d = tn * float(np.sqrt((w * w).sum()))
                if d > 0:
                    best = max(best, float((t * w).sum()) / d)
    return best


def _secondary_why(face: FaceInfo, cos: float, th: PolicyThresholds, qs: QualitySettings) -> str:
    """Why a second face of a dominant ID photo is set aside: the holder's ghost, or, when it is
    not the main face's person, a face the disagreement check does not judge (cut by the photo's
    edge, or too poor); "the holder's" was said of all three."""
    if cos >= th.idcard_accept:
        return (
            "a smaller face on the ID (e.g. a ghost portrait), the holder's (cosine "
            f"{compared(cos, '>=', th.idcard_accept)})"
        )
    if face.cut:
        return (
            "a smaller face cut by the ID photo's edge (a bystander in a tight crop), not judged "
            f"(cosine {cos:.2f} to the main face)"
        )
    return (
        "a smaller face on the ID too poor to judge (quality "
        f"{compared(face.quality, '<', qs.idcard_min_quality)}; cosine {cos:.2f} to the main face)"
    )


def _reaches(score: float, threshold: float | None) -> bool:
    return threshold is not None and score >= threshold


def accept_threshold(
    th: PolicyThresholds, quality: QualitySettings, q_id: float, q_live: float
) -> float | None:
    """The auto threshold of an ID pair with these face qualities: ``idcard_accept``, or
    ``idcard_accept_low_quality`` (None: never auto) when either face is below
    ``quality.idcard_low_quality``."""
    low = min(q_id, q_live) < quality.idcard_low_quality
    return th.idcard_accept_low_quality if low else th.idcard_accept


def by_size(faces: Sequence[FaceInfo]) -> list[FaceInfo]:
    """Largest first; ties: higher detector score, then smaller face_id (deterministic)."""
    return sorted(faces, key=lambda f: (-f.area, -f.det_score, f.face_id))


def verify_subject(
    id_faces: Sequence[FaceInfo],
    live_images: Sequence[Sequence[FaceInfo]],
    th: PolicyThresholds,
    quality_settings: QualitySettings,
    subject_id: str,
    no_id_photo: Reason | None = None,
    same_picture: Callable[[str, str], float | None] | None = None,
) -> list[Decision]:
    """One decision for every face of the subject: ID-photo faces first (largest first), then the
    faces of each live image in the given order (largest first within an image). See the module
    docstring for the rules. Auto and review decisions carry ``subject_id``; rejected and
    quarantined ones carry None. ``no_id_photo``: why the subject has no usable ID photo (the
    caller knows from the images table); used for the live faces when there is no ID face.
    ``same_picture(id face_id, live face_id)``: :func:`same_picture_score` of the two faces'
    crops (None: not known); a live face that would be auto at or above REPHOTO_SCORE goes to
    review as ``idcard_live_rephotographed`` instead."""
    out: list[Decision] = []
    lives = [by_size(img) for img in live_images]
    ids = by_size(id_faces)

    if not ids:
        why = no_id_photo or Reason(
            "idcard_no_face_in_id_photo", "the ID photo has no detectable face"
        )
        for img in lives:
            out += [
                Decision(f.face_id, Status.QUARANTINED, None, why.code, why.detail) for f in img
            ]
        # Counts only: a subject id often names the person (explain shows it on request).
        log.info("an ID subject: %s, %d live faces quarantined", why.code, len(out))
        return out

    ref = ids[0]
    same = [_cos(ref.embedding, f.embedding) for f in ids[1:]]
    dominant = (
        len(ids) == 1
        or ids[0].area >= DOMINANT_AREA_RATIO * ids[1].area
        or all(c >= th.idcard_accept for c in same)
    )
    # A second face on the ID photo that is someone else (a substituted portrait beside the
    # holder's ghost, a card held up in a selfie): (face, cosine) of each.
    strangers = [
        (f, c)
        for f, c in zip(ids[1:], same, strict=True)
        if dominant
        and c < th.idcard_accept
        and f.quality >= quality_settings.idcard_min_quality
        and not f.cut
    ]
    auto_min = quality_settings.idcard_low_quality

    def accept_at(face: FaceInfo) -> float | None:
        """The auto threshold of the pair (ID face, ``face``): stricter when either is poor."""
        return accept_threshold(th, quality_settings, ref.quality, face.quality)

    live_out: list[Decision] = []
    rephoto = ""  # why a live face that matched is the ID picture re-photographed
    claimed_faces: list[tuple[int, FaceInfo]] = []  # (index in live_out, face), one per photo
    any_auto = False
    best_live = -np.inf
    for img in lives:
        if not img:
            continue
        if dominant:
            scores = [_cos(ref.embedding, f.embedding) for f in img]
        else:
            scores = [max(_cos(i.embedding, f.embedding) for i in ids) for f in img]
        matching = [
            k
            for k, f in enumerate(img)
            if scores[k] >= th.idcard_review
            and (
                f.quality >= quality_settings.idcard_min_quality
                or _reaches(scores[k], accept_at(f))
            )
        ]
        # A face that reaches its auto threshold is claimed before one that only reaches the
        # review band: a larger bystander that scores in the band (1 in 100 strangers does, by
        # calibration) must not hide the subject who matches outright.
        accepting = [k for k in matching if dominant and _reaches(scores[k], accept_at(img[k]))]
        k_claimed = accepting[0] if accepting else matching[0] if matching else 0
        claimed, score = img[k_claimed], scores[k_claimed]
        others = [f for k, f in enumerate(img) if k != k_claimed]
        best_live = max(best_live, score)
        s = f"{score:.2f}"
        threshold = accept_at(claimed)
        # The auto threshold the pair reaches (None: it reaches none).
        reached = threshold if dominant and threshold is not None and score >= threshold else None
        picture = (
            same_picture(ref.face_id, claimed.face_id)
            if reached is not None and same_picture is not None
            else None
        )
        if picture is not None and picture >= REPHOTO_SCORE:
            rephoto = (
                "the live face is the ID picture itself, pixel for pixel "
                f"({compared(picture, '>=', REPHOTO_SCORE)}): a photo of the card or of a "
                "screen, not a capture "
                f"(cosine {s})"
            )
            d = Decision(
                claimed.face_id,
                Status.REVIEW,
                subject_id,
                "idcard_live_rephotographed",
                rephoto,
                score,
            )
        elif reached is not None:
            low = min(claimed.quality, ref.quality) < auto_min
            d = Decision(
                claimed.face_id,
                Status.AUTO,
                subject_id,
                "idcard_accept",
                f"cosine {compared(score, '>=', reached)}" + (" (low-quality pair)" if low else ""),
                score,
            )
            any_auto = True
        elif claimed.quality < quality_settings.idcard_min_quality:
            d = Decision(
                claimed.face_id,
                Status.REJECTED,
                None,
                "low_quality",
                compared(claimed.quality, "<", quality_settings.idcard_min_quality),
                score,
            )
        elif score < th.idcard_review:
            d = Decision(
                claimed.face_id,
                Status.REJECTED,
                None,
                "idcard_mismatch",
                f"cosine {compared(score, '<', th.idcard_review)}",
                score,
            )
        elif not dominant:
            d = Decision(
                claimed.face_id,
                Status.REVIEW,
                subject_id,
                "idcard_multiple_faces_in_id_photo",
                f"{len(ids)} faces of similar size, best cosine {s}",
                score,
            )
        elif score < th.idcard_accept:
            d = Decision(
                claimed.face_id,
                Status.REVIEW,
                subject_id,
                "idcard_review",
                f"cosine {compared(score, '<', th.idcard_accept)}",
                score,
            )
        else:
            poor, q = (
                ("live", claimed.quality) if claimed.quality < auto_min else ("ID", ref.quality)
            )
            cos = s if threshold is None else compared(score, "<", threshold)
            d = Decision(
                claimed.face_id,
                Status.REVIEW,
                subject_id,
                "idcard_low_quality",
                f"{poor} face quality {compared(q, '<', auto_min)} (cosine {cos})",
                score,
            )
        claimed_faces.append((len(live_out), claimed))
        live_out.append(d)
        other_why = (
            Reason("not_the_largest_face_in_live_photo", "another face in this photo is larger")
            if k_claimed == 0
            else Reason(
                "not_the_matching_face_in_live_photo",
                f"another face of this photo matches the ID (cosine {s})",
            )
        )
        live_out += [
            Decision(f.face_id, Status.REJECTED, None, other_why.code, other_why.detail, None)
            for f in others
        ]

    if dominant and th.idcard_live_match is not None:
        any_auto |= _corroborate(live_out, claimed_faces, th.idcard_live_match, ref, auto_min)
    best = None if best_live == -np.inf else float(best_live)
    if not dominant:
        ratio = ids[0].area / max(ids[1].area, 1e-9)
        out += [
            Decision(
                f.face_id,
                Status.REVIEW,
                subject_id,
                "idcard_multiple_faces_in_id_photo",
                f"{len(ids)} faces, largest only "
                f"{ratio:.1f}x the next (< {DOMINANT_AREA_RATIO:.1f}x)",
                best,
            )
            for f in ids
        ]
    else:
        if any_auto:
            out.append(
                Decision(
                    ref.face_id,
                    Status.AUTO,
                    subject_id,
                    "idcard_accept",
                    f"matched by a live face (best cosine {best:.2f})",
                    best,
                )
            )
        elif rephoto:
            # What matched is the ID picture itself: the person's look is for that, not for an
            # "is it the same person" question that its own picture would answer yes to.
            out.append(
                Decision(
                    ref.face_id,
                    Status.REVIEW,
                    subject_id,
                    "idcard_live_rephotographed",
                    rephoto,
                    best,
                )
            )
        elif best is None:
            out.append(
                Decision(
                    ref.face_id,
                    Status.REVIEW,
                    subject_id,
                    "idcard_no_live_face",
                    "no live photo has a face",
                    None,
                )
            )
        else:
            out.append(
                Decision(
                    ref.face_id,
                    Status.REVIEW,
                    subject_id,
                    "idcard_unconfirmed",
                    f"no live face accepted (best cosine {best:.2f})",
                    best,
                )
            )
        odd = {f.face_id for f, _ in strangers}
        disagree = ""
        if strangers:
            worst = min(c for _, c in strangers)
            disagree = (
                "another face on the ID photo is not its main face's person (cosine "
                f"{compared(worst, '<', th.idcard_accept)}): a substituted portrait, or someone "
                "else's card held up"
            )
        out += [
            Decision(f.face_id, Status.REVIEW, subject_id, "idcard_id_faces_disagree", disagree, c)
            if f.face_id in odd
            else Decision(
                f.face_id,
                Status.REJECTED,
                None,
                "idcard_secondary_face_in_id_photo",
                _secondary_why(f, c, th, quality_settings),
                c,
            )
            for f, c in zip(ids[1:], same, strict=True)
        ]
        if strangers:
            # Nothing of the subject is auto while its ID photo shows two people.
            def held(d: Decision) -> Decision:
                return Decision(
                    d.face_id,
                    Status.REVIEW,
                    subject_id,
                    "idcard_id_faces_disagree",
                    disagree,
                    d.score,
                )

            out = [
                held(d) if d.status == Status.AUTO or d.face_id == ref.face_id else d for d in out
            ]
            live_out = [held(d) if d.status == Status.AUTO else d for d in live_out]
    out += live_out
    return out
