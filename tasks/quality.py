"""Face quality: measurable properties of one detection and one combined score in [0, 1].

``quality_score`` multiplies four factors, each 1 for a face good enough for training and
falling towards 0 as that property gets worse (see :class:`faceloop.config.QualitySettings`):

- size: 0 below ``min_face_px`` (shorter bbox side), rising linearly to 1 at ``good_face_px``.
- sharpness: variance of the Laplacian of the aligned gray crop at the face's own resolution
  (:func:`sharpness`), ``min(1, blur / blur_good)`` under a square root, so a mildly soft crop
  is not punished as hard as a smear.
- pose: ``cos``-shaped fall-off of the larger of |yaw| and |pitch| (pitch is weighted less,
  its landmark estimate is coarser), reaching 0 at ``max_yaw_deg``.
- detector: the detector's confidence, rescaled so ``det_score >= 0.9`` counts as 1.

The product means one bad property is enough to make a face unusable, which is the meaning
a training set needs: ``q < min_quality`` rejects, ``q < auto_min_quality`` sends to review.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from faceloop.config import QualitySettings
from faceloop.vocab import Reason, compared

# Nose tip's position between eye line (0) and mouth line (1) in the ArcFace template.
NOSE_DEPTH = (71.7366 - 51.5989) / (92.2848 - 51.5989)
# How far the nose tip stands in front of the eye plane, in half inter-ocular distances
# (anthropometric average: ~2.5 cm from pupil plane to nose tip vs ~3.1 cm half-IOD).
NOSE_PROTRUSION = 0.8


def face_size(bbox: np.ndarray) -> float:
    """Shorter side of an x1,y1,x2,y2 box, in pixels."""
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    return max(0.0, min(x2 - x1, y2 - y1))


def sharpness(aligned_bgr: np.ndarray, scale: float = 1.0) -> float:
    """Variance of the Laplacian of the gray aligned crop (higher = sharper), at the face's own
    resolution.

    ``scale``: crop pixels per image pixel of the alignment (:func:`tasks.align.alignment_scale`).
    A face at or above the template's size (``scale <= 1``) is measured on the 112x112 crop, so
    values compare across face sizes. A smaller face was enlarged by the alignment, and an
    enlarged crop is smooth however sharp the photo was: read at 112 px, a crisp 25 px face
    scored like a smeared one, so small faces were punished twice (the size factor already
    counts their size). Such a crop is shrunk back to the face's own resolution and read there,
    divided by ``scale ** 2``: read at its own resolution alone, a blur of a few pixels on a
    small face (most of its detail) counted no more than on a large one. For smooth content,
    enlarging divides the variance by about ``scale ** 4``; this takes half of that (in log),
    continuous at ``scale`` 1. On t1.jpg's frontal face (432 at full size) shrunk 4x: 47 read
    on the enlarged crop, 69 here, and 8 after a 1.5 px blur (tests/test_models.py).
    """
    gray = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    if scale <= 1.0:
        return float(cv2.Laplacian(gray, cv2.CV_64F).var())
    side = max(8, round(gray.shape[0] / scale))
    gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var()) / scale**2


def pose_from_landmarks(landmarks5: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees, a rough estimate from the 5 landmarks.

    Approximation (no 3-D model): in a frontal face the nose tip lies midway between the eyes;
    as the head turns it moves towards one eye. The nose tip stands ~``NOSE_PROTRUSION`` half
    inter-ocular distances in front of the eye plane, so in projection its offset from the eye
    midpoint over the (foreshortened) half inter-ocular distance is ``r = NOSE_PROTRUSION *
    tan(yaw)`` (measured along the eye axis, so in-plane roll does not count), giving ``yaw =
    atan(r / NOSE_PROTRUSION)``. An ``asin(r)`` model saturates at r = 1 (~45 degrees of real
    turn): on LFW it called ordinary three-quarter views 90-degree profiles and zeroed their
    quality. Pitch does the same vertically: the nose normally sits ~49% of the way from the eye
    line to the mouth line (as in the ArcFace template); its deviation from that, over half the
    eye-mouth distance, gives the angle. Sign: positive yaw = nose towards the image's right;
    positive pitch = nose lower than usual (head down). Good to ~10-15 degrees near frontal.
    """
    lm = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    le, re, nose, ml, mr = lm
    eye_mid = (le + re) / 2.0
    mouth_mid = (ml + mr) / 2.0
    eye_vec = re - le
    iod = float(np.hypot(*eye_vec))
    if iod < 1e-6:
        return 0.0, 0.0
    x_axis = eye_vec / iod
    y_axis = np.array([-x_axis[1], x_axis[0]])  # perpendicular, pointing "down" the face
    rel = nose - eye_mid
    r_yaw = float(rel @ x_axis) / (iod / 2.0)
    yaw = math.degrees(math.atan(r_yaw / NOSE_PROTRUSION))
    em = float((mouth_mid - eye_mid) @ y_axis)
    if em < 1e-6:
        return yaw, 0.0
    r_pitch = (float(rel @ y_axis) - NOSE_DEPTH * em) / (em / 2.0)
    pitch = math.degrees(math.atan(r_pitch / NOSE_PROTRUSION))
    return yaw, pitch


class Gate(NamedTuple):
    """Why a face is rejected before it is compared with any other: the reason (code and
    detail) and the decision's score (the quality for ``low_quality``; none for ``too_small``)."""

    why: Reason
    score: float | None

    @property
    def reason(self) -> str:
        """The rendered reason."""
        return self.why.text


def gate(source_kind: str, face_px: float, quality: float, q: QualitySettings) -> Gate | None:
    """The one rule for faces rejected before any comparison, or None for a face that goes on:
    ``too_small`` below ``min_face_px`` whatever its source; ``low_quality`` below
    ``min_quality`` for album faces (an ID-card live face's quality is weighed with its cosine,
    tasks/idcard.py). The face stage does not embed a gated face (its embedding would never be
    used) and the label stage rejects it, both through this function."""
    if face_px < q.min_face_px:
        return Gate(Reason("too_small", f"face {face_px:.0f} px < {q.min_face_px} px"), None)
    if source_kind == "album" and quality < q.min_quality:
        return Gate(Reason("low_quality", compared(quality, "<", q.min_quality)), float(quality))
    return None


def size_factor(face_px: float, q: QualitySettings) -> float:
    if face_px < q.min_face_px:
        return 0.0
    if face_px >= q.good_face_px:
        return 1.0
    return (face_px - q.min_face_px) / max(1.0, q.good_face_px - q.min_face_px)


def sharpness_factor(blur: float, q: QualitySettings) -> float:
    return math.sqrt(max(0.0, min(1.0, blur / q.blur_good)))


def pose_factor(yaw: float, pitch: float, q: QualitySettings) -> float:
    angle = max(abs(yaw), 0.75 * abs(pitch))
    if angle >= q.max_yaw_deg:
        return 0.0
    return math.cos(math.pi / 2.0 * angle / q.max_yaw_deg)


def det_factor(det_score: float) -> float:
    return max(0.0, min(1.0, det_score / 0.9))


def quality_score(
    face_px: float, blur: float, yaw: float, pitch: float, det_score: float, q: QualitySettings
) -> float:
    """Combined quality in [0, 1]: size * sharpness * pose * detector factors (module doc)."""
    value = (
        size_factor(face_px, q)
        * sharpness_factor(blur, q)
        * pose_factor(yaw, pitch, q)
        * det_factor(det_score)
    )
    return float(max(0.0, min(1.0, value)))
